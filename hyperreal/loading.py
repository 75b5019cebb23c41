"""Base-model loading: embedded names, hub ids and local diffusers folders, with errors a person can act on."""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import HyperrealError
from .registry import find_embedded

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
BASE_ENV = "HYPERREAL_BASE"
# what a base gets when its folder carries no hyperreal.json (SD1.5's own recommendations)
HUB_DEFAULTS = {"steps": 30, "guidance": 7.5, "width": 512, "height": 512}


def pick_device() -> tuple[str, torch.dtype]:
    """CUDA in half precision when present (bf16 where supported), else CPU fp32; HYPERREAL_DEVICE overrides."""
    want = os.environ.get("HYPERREAL_DEVICE", "").strip().lower()
    if want == "cpu" or (not want and not torch.cuda.is_available()):
        return "cpu", torch.float32
    if want and want.startswith("cuda") and not torch.cuda.is_available():
        raise HyperrealError(f"HYPERREAL_DEVICE={want} but no CUDA device is visible; unset it to run on the CPU.")
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return want or "cuda", dtype


def resolve_base(base: str | None) -> str:
    """``auto`` (the default) means SD1.5 where CUDA is available and ``tiny`` otherwise."""
    base = (base or os.environ.get(BASE_ENV) or "auto").strip()
    if base == "auto":
        return SD15 if torch.cuda.is_available() else "tiny"
    return base


@dataclass
class BaseModel:
    """A loaded, frozen base pipeline and what the UI/CLI need to know about it."""

    name: str
    source: str  # folder or hub id it came from
    pipe: object
    defaults: dict = field(default_factory=lambda: dict(HUB_DEFAULTS))
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def device(self) -> torch.device:
        return self.pipe.device


def _explain(name: str, err: Exception) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    low = text.lower()
    offline = ("cached locally", "outgoing traffic", "offline", "connect", "resolve", "network", "timed out",
               "localentrynotfound")
    if "gated" in low or "401" in low or "403" in low:
        cause, fix = "the repository is gated or private", "accept its licence on the hub and log in (`hf auth login`)"
    elif any(k in low for k in offline):
        cause = "it is not in the local Hugging Face cache and the hub cannot be reached (or the id is misspelt)"
        fix = "check the id, connect to the internet once to download it, or pass a local diffusers folder"
    elif "not found" in low or "404" in low or "repositorynotfound" in low or "repo id" in low or "hfvalidation" in low:
        cause, fix = "no such model on the hub", "check the spelling of the id"
    elif "safetensors" in low:
        cause, fix = ("it has no safetensors weights (hyperreal never loads pickled .bin/.ckpt files)",
                      "use a repository or folder with .safetensors weights")
    else:
        cause, fix = text.splitlines()[0][:300], "check that it is a Stable Diffusion 1.x model in the diffusers layout"
    return (f"Could not load base model '{name}': {cause}. Fix: {fix}, or use the embedded model with `--base tiny`"
            " (or a local diffusers folder containing model_index.json).")


def load_base(base: str | None = None, device: str | None = None, dtype: torch.dtype | None = None) -> BaseModel:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlog

    name = resolve_base(base)
    dev, dt = pick_device()
    device, dtype = device or dev, dtype or dt
    art = find_embedded(name, "base")
    path = Path(name).expanduser()
    if art is not None:
        source = str(art.path)
    elif path.is_dir():
        if not (path / "model_index.json").is_file():
            raise HyperrealError(
                f"Could not load base model '{name}': the folder has no model_index.json, so it is not a diffusers "
                "pipeline folder. Fix: point --base at the folder that holds model_index.json (saved with "
                "`save_pretrained`), a hub id, or use `--base tiny`.")
        source = str(path)
    elif path.suffix in {".safetensors", ".ckpt"} or name.startswith((".", "/", "~")):
        raise HyperrealError(
            f"Could not load base model '{name}': no such folder. Single-file checkpoints are not supported; pass a "
            "diffusers folder, a hub id like stable-diffusion-v1-5/stable-diffusion-v1-5, or `--base tiny`.")
    else:
        source = name
    verbosity = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(source, torch_dtype=dtype, use_safetensors=True)
    except HyperrealError:
        raise
    except Exception as err:  # every loading failure becomes one actionable sentence
        raise HyperrealError(_explain(name, err)) from err
    finally:
        dlog.set_verbosity(verbosity)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False).eval()
    defaults = dict(HUB_DEFAULTS)
    meta = Path(source) / "hyperreal.json"
    if meta.is_file():
        defaults.update({k: v for k, v in json.loads(meta.read_text()).items() if k in HUB_DEFAULTS})
    return BaseModel(name=name, source=source, pipe=pipe, defaults=defaults)
