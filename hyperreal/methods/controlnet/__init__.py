"""Method 3: ControlNet (arXiv 2302.05543), a trainable copy of the UNet's encoder joined to the frozen UNet by
zero-initialised convolutions, conditioned on edge or pose maps (``conditions``). See
``hyperreal/methods/__init__.py`` for what each file holds."""
from .conditions import condition_map, make_condition
from .files import (choices_for, describe, list_controlnets, load_controlnet, loads_in_line, read_header,
                    resolve_source, save_controlnet)
from .runtime import MAX_SCALE, cached_controlnet, check_job_controlnet, controlnet_pipeline, generate
from .spec import WHAT_LEARNS, EXTRACTOR_KINDS, conditioning_channels_for, new_controlnet, zero_convolutions
from .train import ControlNetLearner, TrainRequest, dataset_examples, make_learner

__all__ = ["EXTRACTOR_KINDS", "MAX_SCALE", "WHAT_LEARNS", "ControlNetLearner", "TrainRequest", "cached_controlnet",
           "check_job_controlnet", "choices_for", "condition_map", "conditioning_channels_for",
           "controlnet_pipeline", "dataset_examples", "describe", "generate", "list_controlnets", "load_controlnet",
           "loads_in_line", "make_condition", "make_learner", "new_controlnet", "read_header", "resolve_source",
           "save_controlnet", "zero_convolutions"]
