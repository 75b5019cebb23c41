"""Base models: embedded names, hub ids and local diffusers folders, their per-base defaults, and errors a person
can act on."""
from __future__ import annotations

import contextlib
import copy
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.peft_utils import recurse_remove_peft_layers
from peft.tuners.tuners_utils import BaseTunerLayer

from . import single_file, sources
from .errors import HyperrealError
from .registry import find_embedded
from .safety import as_path
from .training.memory import half_dtype

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# SD1.5's own configs (JSON, no weights) and CLIP tokenizer, for loading single files offline and for building
# SD1.5-shaped models in tests
SD15_CONFIGS = single_file.SD15_CONFIGS
BASE_ENV = "HYPERREAL_BASE"
VAE_ENV = "HYPERREAL_VAE"  # read by the CLI's and the app's --vae defaults, not by load_base
# What a base gets when its folder carries no hyperreal.json: SD1.5's own recommendations and recipes. A base's
# hyperreal.json overrides any of these keys (the tiny model's does); method code reads what differs per base here.
HUB_DEFAULTS = {
    "steps": 30, "guidance": 7.5, "width": 512, "height": 512,
    # the guidance a job gets when an adapter is on and it sets none (None: "guidance"). An adapter taught a new
    # word leans on it harder than the base leans on its own words; at the tiny base's guidance 5 its stars came
    # out in fragments of several colours, at 2 whole and of the colour asked (README, "Guidance with an adapter on")
    "adapter_guidance": None,
    "examples": ["a photo of an astronaut riding a horse on mars"],
    "example_caption": "a photo of sks person",  # the Train panels' caption for images without one
    "world": None,  # a procedural world the base was trained on (the tiny base: "shapes")
    # groups of [prompt, seed] the base draws well and never trained on: prompts without a trigger whose drift
    # an adapter is measured on (empty: the captions without the trigger)
    "drift_prompts": [],
    # prompts the base is known to draw well: adapters' prior preservation holds the base to its own predictions
    # on them (empty: DreamBooth's class prompt, the captions without the trigger, which is right for SD1.5)
    "prior_prompts": [],
    "bridge_encoder": "facebook/bart-base",  # width 768 = SD1.5's cross-attention width
    "controlnets": ["lllyasviel/control_v11p_sd15_canny", "lllyasviel/control_v11p_sd15_openpose"],
    # Training recipes for when a person sets nothing (the app's knobs start from them too); a VRAM preset
    # (training.memory) then fits the batch size to the card. SD1.5's come from the field: diffusers'
    # examples/dreambooth README (LoRA: lr 1e-4, batch 1 at 512 px, 500 steps; DreamBooth with prior preservation:
    # prior loss weight 1.0, 200 class images, a full fine-tune at lr 5e-6), kohya's SD1.5 LoRA lr 1e-4, the
    # ControlNet paper's lr 1e-5, and IP-Adapter's lr 1e-4 for decoupled cross-attention (the bridge's fuse mode)
    "adapter_train": {"steps": 800, "batch_size": 1, "lr": 1e-4, "full_lr": 5e-6, "prior_weight": 1.0,
                      "class_images": 100, "sample_every": 100},
    "controlnet_train": {"steps": 1000, "batch_size": 4, "lr": 1e-5, "sample_every": 200},
    "bridge_train": {"swap": {"steps": 5000, "batch_size": 32, "lr": 1e-4},
                     "fuse": {"steps": 5000, "batch_size": 4, "lr": 1e-4}, "sample_every": 500},
    # decode a batch one image at a time, and large images in tiles: validation, class images and drift decode
    # many 512 px images at once (diffusers' AutoencoderKL.enable_slicing / enable_tiling)
    "vae_slicing": True,
    "vae_tiling": True,
}


def pick_device() -> tuple[str, torch.dtype]:
    """CUDA in half precision when present (bf16 where the card runs it natively), else CPU fp32;
    HYPERREAL_DEVICE overrides the device."""
    want = os.environ.get("HYPERREAL_DEVICE", "").strip().lower()
    if want == "cpu" or (not want and not torch.cuda.is_available()):
        return "cpu", torch.float32
    if want and want.startswith("cuda") and not torch.cuda.is_available():
        raise HyperrealError(f"HYPERREAL_DEVICE={want} but no CUDA device is visible; unset it to run on the CPU.")
    return want or "cuda", half_dtype()


def resolve_base(base: str | None) -> str:
    """``auto`` (the default) means SD1.5 where CUDA is available and ``tiny`` otherwise."""
    base = (base or os.environ.get(BASE_ENV) or "auto").strip()
    if base == "auto":
        return SD15 if torch.cuda.is_available() else "tiny"
    return base


@dataclass
class BaseModel:
    """A loaded, frozen base pipeline and what the UI/CLI need to know about it."""

    name: str  # what images and trained files record as the base (a single file: its file name)
    source: str  # folder, single file or hub id it came from
    pipe: object
    defaults: dict = field(default_factory=lambda: base_defaults(None))
    config: str | None = None  # a single file's config folder, when one was given
    vae: str | None = None  # the VAE override it was loaded with
    lock: threading.Lock = field(default_factory=threading.Lock)
    training: threading.Event = field(default_factory=threading.Event)  # a run has new modules on this pipe
    _twin: "BaseModel | None" = field(default=None, repr=False)
    _twin_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    @contextlib.contextmanager
    def in_training(self):
        """Marks the pipe as a training run's while it attaches, trains and takes off its modules."""
        self.training.set()
        try:
            yield self
        finally:
            self.training.clear()

    def for_generation(self) -> "BaseModel":
        """This base; or, while a training run has its pipe, a second copy of it (loaded once from the same source
        and kept), so that generation goes on beside training instead of waiting for it or seeing its modules."""
        if not self.training.is_set():
            return self
        with self._twin_lock:
            if self._twin is None:
                try:
                    twin = load_base(self.source, device=str(self.device), dtype=self.pipe.unet.dtype,
                                     config=self.config, vae=self.vae)
                except torch.OutOfMemoryError:
                    raise HyperrealError("A training run is using this base and there is no memory for a second "
                                         "copy to generate with; generate when the run ends.") from None
                self._twin = BaseModel(self.name, self.source, twin.pipe, self.defaults, self.config, self.vae)
        return self._twin


def base_defaults(folder: str | Path | None) -> dict:
    """:data:`HUB_DEFAULTS` with what the base's own ``hyperreal.json`` says instead."""
    defaults = copy.deepcopy(HUB_DEFAULTS)
    meta = Path(folder) / "hyperreal.json" if folder else None
    if meta is not None and meta.is_file():
        defaults.update({k: v for k, v in json.loads(meta.read_text()).items() if k in HUB_DEFAULTS})
    if defaults["adapter_guidance"] is None:
        defaults["adapter_guidance"] = defaults["guidance"]
    return defaults


def _base_source(name: str) -> tuple[str, str]:
    """("folder" | "file" | "hub", where) a base loads from: an embedded or local diffusers folder, one
    .safetensors checkpoint, or a hub id."""
    art = find_embedded(name, "base")
    path = art.path if art is not None else as_path(name, "base model")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise HyperrealError(
                f"Could not load base model '{name}': the folder has no model_index.json, so it is not a diffusers "
                "pipeline folder. Fix: point --base at the folder that holds model_index.json (saved with "
                "`save_pretrained`), a single SD1.5 .safetensors checkpoint, a hub id, or use `--base tiny`.")
        return "folder", str(path)
    if path.is_file() or path.suffix.lower() in (".safetensors", *single_file.PICKLED):
        single_file.check_file(path, name)  # pickles refused, a missing file named
        return "file", str(path.resolve())
    if name.startswith((".", "/", "~")) or not sources.is_hub_id(name):
        raise HyperrealError(
            f"Could not load base model '{name}': no such folder or file. Fix: pass a diffusers folder, a single "
            "SD1.5 .safetensors checkpoint, a hub id like stable-diffusion-v1-5/stable-diffusion-v1-5, or `--base tiny`.")
    return "hub", name  # whatever from_pretrained makes of it, explained if it fails


def load_base(base: str | None = None, device: str | None = None, dtype: torch.dtype | None = None, *,
              config: str | Path | None = None, vae: str | None = None) -> BaseModel:
    """A base by name (see :func:`resolve_base`): an embedded name, a diffusers folder, one SD1.x ``.safetensors``
    checkpoint in the original layout (``config``: its diffusers config folder; default ``NAME.config/`` beside the
    file, else SD1.5's shipped configs) or a hub id. ``vae``: a VAE file, folder or hub id used instead of the
    base's own (:func:`hyperreal.single_file.load_vae`)."""
    name = resolve_base(base)
    dev, dt = pick_device()
    device, dtype = device or dev, dtype or dt
    how, source = _base_source(name)
    if config is not None and how != "file":
        raise HyperrealError(f"a config folder is for single-file bases; '{name}' is a {how}")
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        folder = single_file.config_folder(source, config) if how == "file" else None
        override = single_file.load_vae(vae, folder or (source if how == "folder" else None), dtype) if vae else None
        if how == "file":
            pipe = single_file.load_pipeline(source, folder, override, dtype, shown=name)
        else:
            pipe = _from_pretrained(name, source, dtype, override)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False).eval()
    defaults = base_defaults(folder if how == "file" else source if how == "folder" else None)
    if defaults["vae_slicing"]:
        pipe.vae.enable_slicing()
    if defaults["vae_tiling"]:
        pipe.vae.enable_tiling()
    # a single file is known by its file name (images' "Model:", trained files' ss_sd_model_name), as in A1111
    return BaseModel(name=Path(source).name if how == "file" else name, source=source, pipe=pipe, defaults=defaults,
                     config=None if config is None else str(config), vae=vae)


def _from_pretrained(name: str, source: str, dtype: torch.dtype, vae=None):
    try:
        return StableDiffusionPipeline.from_pretrained(source, dtype=dtype, use_safetensors=True,
                                                       **({"vae": vae} if vae is not None else {}))
    except Exception as err:  # every loading failure becomes one actionable sentence
        cause, fix = sources.load_error("base model", name, err)
        fix = fix or "check that it is a Stable Diffusion 1.x model in the diffusers layout"
        raise HyperrealError(f"Could not load base model '{name}': {cause}. Fix: {fix}, or use the embedded model "
                             "with `--base tiny` (or a local diffusers folder containing model_index.json).") from err


def plain(model):
    """``model`` without PEFT wrappers: itself when it has none, else a copy holding only the base weights.

    The shared base keeps loaded adapters (switched off) for reuse between jobs; code that copies the base
    (``ControlNetModel.from_unet``, full fine-tuning) must copy the frozen weights alone, not the wrappers.
    """
    if not any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        return model
    clone = copy.deepcopy(model)
    for m in clone.modules():
        if isinstance(m, BaseTunerLayer) and m.merged:
            m.unmerge()
    recurse_remove_peft_layers(clone)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        with contextlib.suppress(AttributeError):
            delattr(clone, attr)
    return clone
