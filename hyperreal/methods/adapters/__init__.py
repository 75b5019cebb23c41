"""Method 2: small adapters (LoRA, DoRA, LoHa, LoKr, OFT through PEFT) beside the frozen base's layers; only they
learn. See ``hyperreal/methods/__init__.py`` for what each file holds; ``tokens`` adds trigger-word tokens."""
from .files import LOADS_IN, describe_file, kohya_state_dict, load_adapter, resolve_source, save_adapter
from .runtime import activate, adapters_disabled, check_job_adapters, fuse, job_adapters, unfuse
from .spec import (ALPHA_PRESETS, KINDS, TEXT_ENCODER_PLACEMENTS, UNET_PLACEMENTS, AdapterSpec, adapter_parameters,
                   adapter_tokens, attach, loaded, remove_adapter, remove_all, target_modules)
from .prior import captions_without_trigger
from .tokens import find_trigger, split_trigger_words
from .train import (DEFAULT_RANK, KINDS_AND_FULL, AdapterLearner,
                    FullFineTune, TrainRequest, default_drift_prompts, drift, drift_grid, images_array,
                    instance_examples, make_learner, mean_abs_difference)

__all__ = ["ALPHA_PRESETS", "DEFAULT_RANK", "KINDS_AND_FULL", "KINDS",
           "LOADS_IN", "TEXT_ENCODER_PLACEMENTS", "UNET_PLACEMENTS", "AdapterLearner",
           "AdapterSpec", "FullFineTune", "TrainRequest", "activate", "adapter_parameters", "adapter_tokens",
           "adapters_disabled", "attach", "captions_without_trigger", "check_job_adapters", "default_drift_prompts",
           "describe_file", "drift", "drift_grid", "find_trigger", "fuse", "images_array", "instance_examples", "job_adapters", "kohya_state_dict", "load_adapter",
           "loaded", "make_learner", "mean_abs_difference", "remove_adapter", "remove_all", "resolve_source",
           "save_adapter", "split_trigger_words", "target_modules", "unfuse"]
