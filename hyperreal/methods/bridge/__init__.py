"""Method 1: an extra pretrained text encoder joined to the frozen base (fuse: gated cross-attention; swap: a
translator into the base encoder's space); only the new side learns. See ``hyperreal/methods/__init__.py`` for
what each file holds; ``encoders`` loads the extra encoders."""
from .encoders import TextEncoder, encoder_aliases, encoder_lora_state, resolve_encoder
from .files import load_bridge, read_header, resolve_bridge_path, save_bridge
from .runtime import FuseAttnProcessor, check_job_bridge, generate, get_bridge, get_encoder
from .spec import MODES, WHAT_LEARNS, Bridge, BridgeSpec, LoadedBridge, new_spec
from .train import (BridgeData, TrainRequest, close, make_learners, read_captions, record_training_time,
                    run_training, train_stages)

__all__ = ["MODES", "WHAT_LEARNS", "Bridge", "BridgeData", "BridgeSpec", "FuseAttnProcessor",
           "LoadedBridge", "TextEncoder", "encoder_aliases", "TrainRequest", "close", "record_training_time", "train_stages", "check_job_bridge", "encoder_lora_state", "generate",
           "get_bridge", "get_encoder", "load_bridge", "make_learners", "new_spec", "read_captions", "read_header",
           "resolve_bridge_path", "resolve_encoder", "run_training", "save_bridge"]
