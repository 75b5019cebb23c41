"""Method 3: ControlNet (arXiv 2302.05543): a trainable copy of the UNet's encoder joined to the frozen UNet by
zero-initialised convolutions, conditioned on an edge or pose map.

One module holds the method:
- building: :func:`new_controlnet` (``ControlNetModel.from_unet``, its conditioning embedding sized to the base's
  VAE factor);
- training: :class:`ControlNetData` (cached VAE latents, text embeddings and condition maps) and
  :class:`ControlNetLearner`, a ``training.Trainable`` for :func:`hyperreal.training.train`; :func:`make_learner`
  turns a :class:`TrainRequest` into one (the CLI and the app both use it);
- files: :func:`save_controlnet` writes a diffusers folder and a single ``.safetensors`` (config in its header);
  :func:`load_controlnet` reads those, embedded names, local diffusers folders and hub ids;
- inference: :func:`controlnet_pipeline`, :func:`generate`, and the job hooks :func:`check_job_controlnet` /
  :func:`apply_job_controlnet` (``generation.METHOD_KEYS``);
- measuring: :func:`edge_f1` and :func:`benchmark`, the shapes-world figures behind ``eval controlnet``.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import json
import math
import random
import re
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .datasets import fit_image
from .errors import HyperrealError

WHAT_LEARNS = ("ControlNet trains a copy of the UNet's encoder and middle block (initialised from the base) that "
               "reads a condition map; it joins the frozen UNet through zero-initialised 1x1 convolutions, so it "
               "starts as an exact no-op. The UNet, VAE and text encoder stay frozen, bit for bit; the loss is "
               "measured through the frozen UNet.")
EXTRACTOR_KINDS = ("canny", "softedge", "pose", "given")
PREPROCESS_KINDS = ("none", "canny", "softedge", "pose")
# SD1.5 ControlNets a GPU user will want first (hub ids; downloaded on first use)
HUB_DEFAULTS = {"canny": "lllyasviel/control_v11p_sd15_canny", "openpose": "lllyasviel/control_v11p_sd15_openpose"}
DIFFUSERS_SUBFOLDER = "controlnet"
MAX_SCALE = 2.0
MAX_CACHED = 4  # ControlNets kept loaded per base between jobs


# --- building -----------------------------------------------------------------------------------------------

def conditioning_channels_for(vae_scale_factor: int) -> tuple[int, ...]:
    """The conditioning embedding must downsample the map by the VAE factor: one entry per halving, plus one.

    diffusers' default ``(16, 32, 96, 256)`` fits SD's factor 8; the tiny base's factor 4 needs three entries.
    """
    f = int(vae_scale_factor)
    n = int(round(math.log2(f))) if f > 0 else -1
    if f < 1 or 2 ** n != f:
        raise HyperrealError(f"the base's VAE factor {vae_scale_factor} is not a power of two; ControlNet cannot "
                             "match its latent size")
    default = (16, 32, 96, 256)
    return default[:n + 1] if n + 1 <= len(default) else default + (256,) * (n + 1 - len(default))


def new_controlnet(pipe, conditioning_channels: tuple[int, ...] | None = None):
    """A fresh ControlNet for the pipeline's UNet: the encoder copied, every zero convolution at zero (fp32)."""
    from diffusers import ControlNetModel

    chans = tuple(conditioning_channels or conditioning_channels_for(pipe.vae_scale_factor))
    from .adapters import plain

    cn = ControlNetModel.from_unet(plain(pipe.unet), conditioning_embedding_out_channels=chans)
    return cn.to(device=pipe.unet.device, dtype=torch.float32)


def zero_convolutions(controlnet) -> dict[str, torch.nn.Parameter]:
    """The parameters of the zero-initialised convolutions (the down/mid blocks' and the embedding's output)."""
    return {n: p for n, p in controlnet.named_parameters()
            if n.startswith(("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out."))}


def check_fits(controlnet, unet, source: str) -> None:
    """A ControlNet only fits the UNet family it was copied from."""
    a, b = controlnet.config, unet.config
    mismatch = [k for k in ("block_out_channels", "cross_attention_dim", "in_channels", "layers_per_block")
                if list(np.atleast_1d(getattr(a, k, None))) != list(np.atleast_1d(getattr(b, k, None)))]
    if mismatch:
        raise HyperrealError(
            f"ControlNet '{source}' was made for another base (its {', '.join(mismatch)} differ from this base's "
            f"UNet: {', '.join(f'{k}={getattr(a, k, None)} vs {getattr(b, k, None)}' for k in mismatch)}). Use a "
            "ControlNet trained for this base (on tiny: tiny-canny), or switch the base.")


# --- training data ------------------------------------------------------------------------------------------

def extractor_params(kind: str, canny_low: int = 100, canny_high: int = 200, softedge_model: str = "hed",
                     annotators: str | None = None) -> dict:
    if kind == "canny":
        return {"low": canny_low, "high": canny_high}
    if kind == "softedge":
        return {"model": softedge_model, "annotators": annotators}
    if kind == "pose":
        return {"annotators": annotators}
    return {}


def condition_map(kind: str, image: Image.Image, width: int, height: int, resize_mode: str = "just resize",
                  **params) -> Image.Image:
    """One condition map (RGB, white-on-black for edges) through ``conditions.make_condition``."""
    from .conditions import make_condition

    if kind in ("none", "given", "uploaded"):
        return make_condition("uploaded", image, width, height, resize_mode,
                              polarity=params.get("polarity", "auto")).image
    return make_condition(kind, image, width, height, resize_mode, **params).image


def map_tensor(maps: list[Image.Image]) -> torch.Tensor:
    """Maps as uint8 N x 3 x H x W (the ControlNet sees them in [0, 1], as the pipeline's image processor gives)."""
    return torch.from_numpy(np.stack([np.asarray(m.convert("RGB"), dtype=np.uint8) for m in maps])).permute(0, 3, 1, 2)


class ControlNetData:
    """Latents, text embeddings and condition maps of a dataset, each computed once.

    ``examples`` are (image, caption, condition map) with the map already at the training size.
    """

    def __init__(self, pipe, examples: list[tuple[Image.Image, str, Image.Image]], width: int, height: int,
                 caption_dropout: float = 0.5):
        from .datasets import encode_images, encode_prompts, image_tensor

        if not 0 <= caption_dropout < 1:
            raise HyperrealError(f"--caption-dropout must be in [0, 1), got {caption_dropout}")
        if not examples:
            raise HyperrealError("the dataset has no examples")
        self.width, self.height, self.caption_dropout = width, height, caption_dropout
        self.latents = encode_images(pipe.vae, [image_tensor(img, width, height) for img, _, _ in examples])
        self.maps = map_tensor([m for _, _, m in examples])
        self.captions = [t for _, t, _ in examples]
        self.texts = sorted(set(self.captions) | {""})
        self.text_index = torch.tensor([self.texts.index(t) for t in self.captions])
        self.empty = self.texts.index("")
        self.embeddings = encode_prompts(pipe, self.texts)

    def __len__(self) -> int:
        return len(self.captions)

    def map_image(self, i: int) -> Image.Image:
        return Image.fromarray(self.maps[i].permute(1, 2, 0).numpy())

    def batches(self, batch_size: int, seed: int, num_train_timesteps: int) -> Iterator[dict]:
        """Endless and deterministic in ``seed``: shuffled epochs, caption dropout, noise and timesteps."""
        g = torch.Generator().manual_seed(seed)
        queue: list[int] = []
        while True:
            while len(queue) < batch_size:
                queue += torch.randperm(len(self), generator=g).tolist()
            idx, queue = torch.tensor(queue[:batch_size]), queue[batch_size:]
            text = self.text_index[idx].clone()
            if self.caption_dropout:
                text[torch.rand(batch_size, generator=g) < self.caption_dropout] = self.empty
            latents = self.latents[idx]
            yield {"latents": latents, "text": self.embeddings[text], "cond": self.maps[idx],
                   "noise": torch.randn(latents.shape, generator=g),
                   "timesteps": torch.randint(0, num_train_timesteps, (batch_size,), generator=g)}


def dataset_examples(data: str | Path, extractor: str, width: int, height: int,
                     **params) -> list[tuple[Image.Image, str, Image.Image]]:
    """(image, caption, map) triples: maps computed by the extractor, or read from ``conditioning_image``."""
    from .datasets import load_examples

    if extractor not in EXTRACTOR_KINDS:
        raise HyperrealError(f"--extractor must be one of {', '.join(EXTRACTOR_KINDS)}, got {extractor!r}")
    examples = load_examples(data)
    if extractor == "given":
        missing = [e.image.name for e in examples if e.conditioning_image is None]
        if missing:
            raise HyperrealError(
                f"--extractor given needs a conditioning_image for every example (metadata.jsonl with file_name, "
                f"text and conditioning_image); {len(missing)} have none, e.g. {', '.join(missing[:3])}. Or pick "
                "an extractor (canny, softedge, pose) to compute the maps from the images.")
    out = []
    for e in examples:
        img = fit_image(Image.open(e.image), width, height)
        try:
            if extractor == "given":
                # a map given with the data is used as the user made it (no polarity guess), aligned the same way
                m = condition_map("given", fit_image(Image.open(e.conditioning_image), width, height), width, height,
                                  polarity="keep")
            else:
                m = condition_map(extractor, img, width, height, **params)
        except HyperrealError as err:
            raise HyperrealError(f"'{e.image.name}': {err}") from None
        out.append((img, e.text, m))
    return out


# --- the Trainable ------------------------------------------------------------------------------------------

class ControlNetLearner:
    """Train a ControlNet against the frozen base (``training.Trainable``)."""

    def __init__(self, pipe, data: ControlNetData, controlnet=None, info: dict | None = None,
                 sample_prompts: list[str] | None = None, sample_maps: list[Image.Image] | None = None,
                 sample_steps: int = 20, sample_guidance: float = 5.0, sample_seed: int = 0,
                 gradient_checkpointing: bool = False, name: str = "controlnet"):
        from .training import DenoisingObjective

        self.pipe, self.data, self.name = pipe, data, name
        self.info = dict(info or {})
        for part in (pipe.unet, pipe.vae, pipe.text_encoder):  # frozen, whatever the caller did before
            part.requires_grad_(False).eval()
        self.controlnet = controlnet if controlnet is not None else new_controlnet(pipe)
        self.controlnet.train().requires_grad_(True)
        self.gradient_checkpointing = gradient_checkpointing
        self._unet_checkpointing_was = bool(getattr(pipe.unet, "is_gradient_checkpointing", False))
        if gradient_checkpointing:
            # activations are recomputed in the backward pass: of the copy, and of the frozen UNet the loss
            # runs through (a flag only, no weight changes; :meth:`release` puts the shared UNet's flag back)
            self.controlnet.enable_gradient_checkpointing()
            pipe.unet.enable_gradient_checkpointing()
        self.objective = DenoisingObjective(pipe.scheduler.config)
        self.prediction_type = self.objective.prediction_type  # recorded in the model card
        n = len(sample_maps) if sample_maps else min(2, len(data))
        self.sample_maps = list(sample_maps) if sample_maps else [data.map_image(i) for i in range(n)]
        prompts = list(sample_prompts or [])
        self.sample_prompts = [(prompts[i % len(prompts)] if prompts else data.captions[i % len(data)])
                               for i in range(len(self.sample_maps))]
        self.sample_steps, self.sample_guidance, self.sample_seed = sample_steps, sample_guidance, sample_seed
        self.steps_done = 0

    # Trainable
    def trainable_parameters(self) -> list:
        return [p for p in self.controlnet.parameters() if p.requires_grad]

    def batches(self, batch_size: int, seed: int) -> Iterator:
        return self.data.batches(batch_size, seed, self.objective.num_train_timesteps)

    def loss(self, batch) -> torch.Tensor:
        unet = self.pipe.unet
        dev, dtype = unet.device, unet.dtype
        cdtype = next(self.controlnet.parameters()).dtype
        latents, noise, t = batch["latents"].to(dev), batch["noise"].to(dev), batch["timesteps"].to(dev)
        noisy = self.objective.noisy(latents, noise, t)
        text = batch["text"].to(dev)
        cond = batch["cond"].to(dev).float() / 255.0
        down, mid = self.controlnet(noisy.to(cdtype), t, text.to(cdtype), controlnet_cond=cond.to(cdtype),
                                    return_dict=False)
        pred = unet(noisy.to(dtype), t, text.to(dtype),
                    down_block_additional_residuals=[d.to(dtype) for d in down],
                    mid_block_additional_residual=mid.to(dtype)).sample.float()
        return F.mse_loss(pred, self.objective.target(latents, noise, t))

    def after_step(self, step: int) -> None:
        self.steps_done = step

    def validate(self) -> tuple[list, list[str]]:
        """Fixed seeds through the same pipeline generation uses; each image is map | output side by side."""
        self.controlnet.eval()
        try:
            outs = generate(self.pipe, self._inference_controlnet(), self.sample_prompts, self.sample_maps,
                            [self.sample_seed + i for i in range(len(self.sample_maps))], self.sample_steps,
                            self.sample_guidance)
        finally:
            self.controlnet.train()
        images = []
        for m, o in zip(self.sample_maps, outs):
            m = m.convert("RGB").resize(o.size)
            pair = Image.new("RGB", (o.width * 2, o.height))
            pair.paste(m, (0, 0))
            pair.paste(o, (o.width, 0))
            images.append(pair)
        return images, [f"{p} (seed {self.sample_seed + i}; left: map, right: output)"
                        for i, p in enumerate(self.sample_prompts)]

    def _inference_controlnet(self):
        if next(self.controlnet.parameters()).dtype != self.pipe.unet.dtype:  # half-precision bases on a GPU
            return copy.deepcopy(self.controlnet).to(self.pipe.unet.dtype)
        return self.controlnet

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.controlnet.state_dict().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.controlnet.load_state_dict(state)

    def release(self) -> None:
        """Give the shared base back as it was (the loop's last call, ``save``, does this)."""
        if self.gradient_checkpointing and not self._unet_checkpointing_was:
            self.pipe.unet.disable_gradient_checkpointing()

    def save(self, out: Path) -> list[Path]:
        self.release()
        return save_controlnet(self.controlnet, out, {**self.info, "steps_done": self.steps_done}, name=self.name)

    def trained_parameter_count(self) -> int:
        return sum(p.numel() for p in self.controlnet.parameters())


@dataclass
class TrainRequest:
    """Everything a ControlNet training run needs besides the loop's own settings (``training.TrainConfig``)."""

    data: str  # folder or .zip: metadata.jsonl (file_name, text[, conditioning_image]) or NAME.txt beside images
    extractor: str = "canny"  # canny | softedge | pose | given (the dataset's conditioning_image)
    canny_low: int = 100
    canny_high: int = 200
    softedge_model: str = "hed"  # hed | pidinet (a labelled Sobel fallback without annotator weights)
    annotators: str | None = None  # folder holding annotator weights (HED/PiDiNet/OpenPose)
    caption_dropout: float = 0.5  # as the paper: half the captions replaced by the empty string
    gradient_checkpointing: bool = False
    conditioning_channels: tuple[int, ...] | None = None  # None: from the base's VAE factor
    sample_prompts: list[str] = field(default_factory=list)  # default: the captions of the first examples
    sample_maps: list[str] = field(default_factory=list)  # condition-map image files used as-is (default: the data's)
    name: str = "controlnet"
    seed: int = 0

    def check(self) -> None:
        if self.extractor not in EXTRACTOR_KINDS:
            raise HyperrealError(f"--extractor must be one of {', '.join(EXTRACTOR_KINDS)}, got {self.extractor!r}")
        if not 0 <= self.canny_low <= self.canny_high:
            raise HyperrealError(f"Canny thresholds need 0 <= low <= high, got {self.canny_low}/{self.canny_high}")
        if not 0 <= self.caption_dropout < 1:
            raise HyperrealError(f"--caption-dropout must be in [0, 1), got {self.caption_dropout}")
        if not re.fullmatch(r"[\w.-]+", self.name or ""):
            raise HyperrealError(f"--name must be a plain file name (letters, digits, _ . -), got {self.name!r}")
        for m in self.sample_maps:
            if not Path(m).is_file():
                raise HyperrealError(f"sample map '{m}' is not a file")


def make_learner(base, req: TrainRequest, out: str | Path, info: dict | None = None) -> ControlNetLearner:
    """Data (maps, cached latents and embeddings) plus a fresh ControlNet, ready for ``training.train``."""
    req.check()
    width, height = base.defaults["width"], base.defaults["height"]
    params = extractor_params(req.extractor, req.canny_low, req.canny_high, req.softedge_model, req.annotators)
    examples = dataset_examples(req.data, req.extractor, width, height, **params)
    data = ControlNetData(base.pipe, examples, width, height, req.caption_dropout)
    maps = [condition_map("none", Image.open(m), width, height) for m in req.sample_maps]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(req.seed)
        cn = new_controlnet(base.pipe, req.conditioning_channels)
    info = {"base": base.name, "extractor": req.extractor, "extractor_params": {k: v for k, v in params.items()
                                                                                if k != "annotators"},
            "images": len(examples), "resolution": f"{width}x{height}", "caption_dropout": req.caption_dropout,
            **(info or {})}
    return ControlNetLearner(base.pipe, data, cn, info=info, sample_prompts=req.sample_prompts, sample_maps=maps,
                             sample_steps=base.defaults["steps"], sample_guidance=base.defaults["guidance"],
                             sample_seed=req.seed, gradient_checkpointing=req.gradient_checkpointing, name=req.name)


# --- files --------------------------------------------------------------------------------------------------

def save_controlnet(controlnet, out: str | Path, info: dict | None = None, name: str = "controlnet",
                    dtype: torch.dtype | None = None) -> list[Path]:
    """``OUT/controlnet/`` (diffusers: ``ControlNetModel.from_pretrained`` loads it) and ``OUT/NAME.safetensors``
    (diffusers keys; the config and the training info in its JSON header). The folder comes first."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = controlnet if dtype is None else copy.deepcopy(controlnet).to(dtype)
    folder = out / DIFFUSERS_SUBFOLDER
    model.save_pretrained(folder, safe_serialization=True)
    info = {k: v for k, v in (info or {}).items() if _jsonable(v)}
    single = out / f"{name}.safetensors"
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, single, metadata={"format": "pt", "hyperreal_kind": "controlnet",
                                    "hyperreal_config": json.dumps(dict(model.config)),
                                    "hyperreal_info": json.dumps(info)})
    (out / "controlnet.json").write_text(json.dumps({
        "kind": "controlnet", "files": {"diffusers": DIFFUSERS_SUBFOLDER, "single_file": single.name},
        "loads_in": {DIFFUSERS_SUBFOLDER: "diffusers (ControlNetModel.from_pretrained), hyperreal",
                     single.name: "hyperreal (diffusers keys; config in the header)"}, **info}, indent=2) + "\n")
    return [folder, single]


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def read_header(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise HyperrealError(f"'{path}' is not a readable .safetensors file ({type(e).__name__})") from None


def _is_diffusers_folder(p: Path) -> bool:
    return (p / "config.json").is_file() and any(p.glob("diffusion_pytorch_model*.safetensors"))


def resolve_source(source: str) -> tuple[str, str]:
    """NAME | DIR | FILE | hub id -> ('folder', path) | ('file', path) | ('hub', id); never touches the network."""
    from .registry import find_embedded

    if not isinstance(source, str) or not source.strip():
        raise HyperrealError("a ControlNet 'path' must be a non-empty string (embedded name, folder, file or hub id)")
    source = source.strip()
    art = find_embedded(source, "controlnet")
    p = art.path if art is not None else Path(source).expanduser()
    if p.is_dir():
        for cand in (p, p / DIFFUSERS_SUBFOLDER):
            if _is_diffusers_folder(cand):
                return "folder", str(cand)
        files = sorted(p.glob("*.safetensors"))
        if len(files) == 1:
            return "file", str(files[0])
        raise HyperrealError(f"ControlNet folder '{source}' holds no diffusers ControlNet (config.json + "
                             "diffusion_pytorch_model.safetensors) and no single .safetensors file")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise HyperrealError(f"ControlNet '{source}': only .safetensors files are read (no pickled .bin/.ckpt/.pth)")
        return "file", str(p)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith((".", "/", "~")):
        return "hub", source
    names = [a.name for a in list_controlnets()]
    raise HyperrealError(f"ControlNet '{source}' is not an embedded name ({', '.join(names) or 'none'}), an "
                         "existing folder or .safetensors file, or a hub id like lllyasviel/control_v11p_sd15_canny")


def load_controlnet(source: str, device=None, dtype: torch.dtype | None = None):
    """A ControlNetModel from an embedded name, a diffusers folder, one of our single files, or a hub id."""
    from diffusers import ControlNetModel
    from diffusers.utils import logging as dlog

    how, where = resolve_source(source)
    verbosity = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        if how == "file":
            model = _load_single_file(where, source)
        else:
            model = ControlNetModel.from_pretrained(where, use_safetensors=True)
    except HyperrealError:
        raise
    except Exception as err:
        raise HyperrealError(_explain(source, how, err)) from None
    finally:
        dlog.set_verbosity(verbosity)
    model.requires_grad_(False).eval()
    return model.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else model


def _load_single_file(path: str, source: str):
    from diffusers import ControlNetModel
    from safetensors.torch import load_file

    meta = read_header(path)
    if "hyperreal_config" not in meta:
        raise HyperrealError(f"ControlNet file '{source}' has no hyperreal config in its header; single files are "
                             "read when hyperreal wrote them. Use the diffusers folder of another tool's ControlNet "
                             "(config.json + diffusion_pytorch_model.safetensors) or its hub id")
    config = {k: v for k, v in json.loads(meta["hyperreal_config"]).items() if not k.startswith("_")}
    model = ControlNetModel.from_config(config)
    sd = load_file(path)
    res = model.load_state_dict(sd, strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise HyperrealError(f"ControlNet file '{source}' does not match its own config "
                             f"({len(res.missing_keys)} missing, {len(res.unexpected_keys)} unexpected tensors)")
    return model.to(next(iter(sd.values())).dtype)


def _explain(source: str, how: str, err: Exception) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    low = text.lower()
    if how == "hub":
        if any(k in low for k in ("cached locally", "offline", "connect", "resolve", "network", "localentrynotfound",
                                  "outgoing traffic", "timed out")):
            why = ("it is not in the local Hugging Face cache and the hub cannot be reached (or the id is misspelt); "
                   "connect once to download it, or pass a local diffusers folder")
        elif "safetensors" in low:
            why = "it has no .safetensors weights (pickled weights are never loaded)"
        elif "404" in low or "not found" in low or "repositorynotfound" in low:
            why = "no such repository on the hub; check the id"
        else:
            why = text.splitlines()[0][:300]
        return f"could not load ControlNet '{source}': {why}"
    return f"could not load ControlNet '{source}': {text.splitlines()[0][:300]}"


def list_controlnets() -> list:
    """Embedded ControlNets (``registry.Artifact``: name, kind, path, info)."""
    from .registry import embedded_artifacts

    return [a for a in embedded_artifacts() if a.kind == "controlnet"]


def choices_for(base) -> list[str]:
    """What a ControlNet picker offers on this base: embedded ones made for it, SD1.5 hub defaults otherwise."""
    names = [a.name for a in list_controlnets() if a.info.get("base", "tiny") == base.name]
    return names if names else list(HUB_DEFAULTS.values())


def describe(source: str) -> dict:
    """What a saved ControlNet says about itself (for a UI: base, extractor, steps, measured figures)."""
    how, where = resolve_source(source)
    info: dict = {"source": source, "how": how, "path": where}
    if how == "file":
        info.update(json.loads(read_header(where).get("hyperreal_info", "{}")))
    elif how == "folder":
        for meta in (Path(where) / "hyperreal.json", Path(where).parent / "hyperreal.json",
                     Path(where).parent / "controlnet.json"):
            if meta.is_file():
                info.update(json.loads(meta.read_text()))
                break
    return info


# --- inference ----------------------------------------------------------------------------------------------

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def cached_controlnet(base, source: str):
    """Load once per base (a small LRU keyed by the file's identity), on the base's device and dtype."""
    how, where = resolve_source(source)
    key = where
    if how != "hub":
        stamp = max((f.stat().st_mtime_ns for f in Path(where).rglob("*") if f.is_file()), default=0) \
            if Path(where).is_dir() else Path(where).stat().st_mtime_ns
        key = f"{Path(where).resolve()}@{stamp}"
    unet = base.pipe.unet
    cache = _CACHE.setdefault(unet, collections.OrderedDict())
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    model = load_controlnet(source, device=unet.device, dtype=unet.dtype)
    check_fits(model, unet, source)
    cache[key] = model
    while len(cache) > MAX_CACHED:
        cache.popitem(last=False)
    return model


def controlnet_pipeline(pipe, controlnets):
    """``StableDiffusionControlNetPipeline`` around the pipeline's own (possibly adapted) components."""
    from diffusers import MultiControlNetModel, StableDiffusionControlNetPipeline

    cns = list(controlnets) if isinstance(controlnets, (list, tuple)) else [controlnets]
    cn = cns[0] if len(cns) == 1 else MultiControlNetModel(cns)
    comps = {k: v for k, v in pipe.components.items() if k != "controlnet"}
    out = StableDiffusionControlNetPipeline(**comps, controlnet=cn, requires_safety_checker=False)
    out.set_progress_bar_config(disable=True)
    return out


@torch.no_grad()
def generate(pipe, controlnets, prompts: list[str], maps: list, seeds: list[int], steps: int, guidance: float,
             scale: float | list[float] = 1.0, start: float | list[float] = 0.0, end: float | list[float] = 1.0,
             guess_mode: bool = False, batch: int = 16, negative_prompt: str | None = None) -> list[Image.Image]:
    """Images for (prompt, map(s), seed) triples; ``maps[i]`` is one map, or a list with one per ControlNet."""
    cpipe = controlnet_pipeline(pipe, controlnets)
    multi = type(cpipe.controlnet).__name__ == "MultiControlNetModel"
    images = []
    for i in range(0, len(prompts), batch):
        ps, ms, ss = prompts[i:i + batch], maps[i:i + batch], seeds[i:i + batch]
        if multi:  # diffusers' nested form: per prompt, one map per ControlNet
            image = [list(m) for m in ms]
        else:
            image = [m[0] if isinstance(m, (list, tuple)) else m for m in ms]
        gens = [torch.Generator(device="cpu").manual_seed(s) for s in ss]
        w, h = (image[0][0] if multi else image[0]).size
        out = cpipe(ps, image=image, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                    width=w, height=h, negative_prompt=[negative_prompt] * len(ps) if negative_prompt else None,
                    controlnet_conditioning_scale=scale, control_guidance_start=start, control_guidance_end=end,
                    guess_mode=guess_mode, output_type="pil")
        images.extend(out.images)
    return images


# --- generation jobs -----------------------------------------------------------------------------------------

_UNIT_KEYS = {"path", "image", "scale", "start", "end", "preprocess", "resize_mode", "guess_mode", "canny_low",
              "canny_high"}
EXAMPLE_UNIT = '{"path": "tiny-canny", "image": "edges.png", "scale": 1.0, "start": 0.0, "end": 1.0}'


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_job_controlnet(items, where: str = "job") -> list[dict]:
    """Validate a job's ``"controlnet"`` list and fill in the defaults.

    Each unit: ``path`` (embedded name, folder, .safetensors file or hub id), ``image`` (a file; relative paths
    are relative to the current directory), ``scale`` 0-2 (1), ``start``/``end`` 0-1 (0/1, start < end), and
    optionally ``preprocess`` (none: the image is the map; canny | softedge | pose: computed from a photo),
    ``resize_mode`` (crop and resize | just resize | resize and fill), ``canny_low``/``canny_high``,
    ``guess_mode`` (true on any unit applies guess mode to the job).
    """
    from .conditions import resize_mode_of

    def bad(i, msg):
        return HyperrealError(f"{where}: controlnet[{i}] {msg}")

    if not isinstance(items, list) or not items:
        raise HyperrealError(f"{where}: 'controlnet' must be a non-empty list like [{EXAMPLE_UNIT}]")
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            raise bad(i, f"must be an object like {EXAMPLE_UNIT}")
        unknown = sorted(set(it) - _UNIT_KEYS)
        if unknown:
            raise bad(i, f"has unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(_UNIT_KEYS))}")
        if not isinstance(it.get("path"), str) or not it["path"].strip():
            raise bad(i, "needs a \"path\": an embedded ControlNet (e.g. tiny-canny), a folder, a .safetensors file "
                         "or a hub id")
        try:
            resolve_source(it["path"])
        except HyperrealError as e:
            raise bad(i, str(e)) from None
        img = it.get("image")
        if not isinstance(img, str) or not img.strip():
            raise bad(i, "needs an \"image\": the condition map (or a photo with \"preprocess\") as a file path")
        p = Path(img).expanduser()
        if not p.is_file():
            raise bad(i, f"image '{img}' does not exist (relative paths are read from the current directory "
                         f"{Path.cwd()})")
        try:
            with Image.open(p) as im:
                im.verify()
        except Exception:
            raise bad(i, f"image '{img}' is not a readable image") from None
        unit = {"path": it["path"].strip(), "image": img}
        for k, default, lo, hi in (("scale", 1.0, 0.0, MAX_SCALE), ("start", 0.0, 0.0, 1.0), ("end", 1.0, 0.0, 1.0)):
            v = it.get(k, default)
            if not _num(v) or not lo <= v <= hi:
                raise bad(i, f"'{k}' must be a number between {lo:g} and {hi:g}, got {json.dumps(v)}")
            unit[k] = float(v)
        if unit["start"] >= unit["end"]:
            raise bad(i, f"'start' ({unit['start']:g}) must be below 'end' ({unit['end']:g})")
        pre = it.get("preprocess", "none")
        if pre not in PREPROCESS_KINDS:
            raise bad(i, f"'preprocess' must be one of {', '.join(PREPROCESS_KINDS)}, got {json.dumps(pre)}")
        if pre != "none":
            unit["preprocess"] = pre
        if "resize_mode" in it:
            try:
                unit["resize_mode"] = resize_mode_of(it["resize_mode"])
            except HyperrealError as e:
                raise bad(i, str(e)) from None
        for k in ("canny_low", "canny_high"):
            if k in it:
                if isinstance(it[k], bool) or not isinstance(it[k], int) or not 0 <= it[k] <= 1000:
                    raise bad(i, f"'{k}' must be an integer between 0 and 1000, got {json.dumps(it[k])}")
                unit[k] = it[k]
        if unit.get("canny_low", 100) > unit.get("canny_high", 200):
            raise bad(i, "'canny_low' must not exceed 'canny_high'")
        if "guess_mode" in it:
            if not isinstance(it["guess_mode"], bool):
                raise bad(i, f"'guess_mode' must be true or false, got {json.dumps(it['guess_mode'])}")
            unit["guess_mode"] = it["guess_mode"]
        out.append(unit)
    return out


def unit_map(unit: dict, width: int, height: int) -> Image.Image:
    """The condition map a job unit asks for, at the generation size."""
    pre = unit.get("preprocess", "none")
    params = extractor_params(pre, unit.get("canny_low", 100), unit.get("canny_high", 200)) if pre != "none" else {}
    with Image.open(Path(unit["image"]).expanduser()) as im:
        img = im.convert("RGB")
    return condition_map(pre, img, width, height, unit.get("resize_mode", "crop and resize"), **params)


@contextlib.contextmanager
def job_controlnet(base, units: list[dict] | None, call):
    """Swap ``call.pipe`` for a ControlNet pipeline around the same components for one job; restore on exit.

    Adapters (applied before, in the UNet's weights) and the bridge (prompt embeddings in ``call.kwargs`` or the
    UNet's attention processors) are kept: the new pipeline shares the call's own components and keyword args.
    """
    if not units:
        yield call
        return
    width, height = call.kwargs.get("width"), call.kwargs.get("height")
    nets = [cached_controlnet(base, u["path"]) for u in units]
    maps = [unit_map(u, width, height) for u in units]
    single = len(units) == 1
    added = {
        "image": maps[0] if single else maps,
        "controlnet_conditioning_scale": units[0]["scale"] if single else [u["scale"] for u in units],
        "control_guidance_start": units[0]["start"] if single else [u["start"] for u in units],
        "control_guidance_end": units[0]["end"] if single else [u["end"] for u in units],
        "guess_mode": any(u.get("guess_mode", False) for u in units),
    }
    old_pipe = call.pipe
    old = {k: call.kwargs[k] for k in added if k in call.kwargs}
    call.pipe = controlnet_pipeline(old_pipe, nets)
    call.kwargs.update(added)
    try:
        yield call
    finally:
        call.pipe = old_pipe
        for k in added:
            call.kwargs.pop(k, None)
        call.kwargs.update(old)


def apply_job_controlnet(base, value, call):
    """The ``controlnet`` job key (generation.METHOD_KEYS)."""
    return job_controlnet(base, value, call)


# --- measuring ----------------------------------------------------------------------------------------------

def edge_map(image: Image.Image, low: int = 100, high: int = 200) -> np.ndarray:
    """Boolean Canny edges of an image (on RGB, as the extractor)."""
    import cv2

    return cv2.Canny(np.asarray(image.convert("RGB")), low, high) > 0


def edge_f1(output_edges: np.ndarray, condition_edges: np.ndarray, tolerance: int = 1) -> dict:
    """Precision/recall/F1 of edge pixels, a match being within ``tolerance`` pixels (a square neighbourhood)."""
    from scipy import ndimage

    out, ref = np.asarray(output_edges, bool), np.asarray(condition_edges, bool)
    k = np.ones((2 * tolerance + 1,) * 2, bool)
    ref_near, out_near = ndimage.binary_dilation(ref, k), ndimage.binary_dilation(out, k)
    n_out, n_ref = int(out.sum()), int(ref.sum())
    precision = float((out & ref_near).sum() / n_out) if n_out else (1.0 if not n_ref else 0.0)
    recall = float((ref & out_near).sum() / n_ref) if n_ref else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


EVAL_SEED = 9000  # layouts and noise of the ControlNet benchmark (training scenes use other seeds and captions)


def held_out_scenes(n: int = 64, seed: int = EVAL_SEED) -> list[dict]:
    """Scenes the ControlNet never saw: held-out captions (never in any training set), fresh layouts and seeds.

    Half one-object, half two-object captions; each is rendered by the shapes world with its own layout seed."""
    from .shapes.world import all_captions, is_held_out, render_caption

    rng = random.Random(seed)
    one = [c for c in all_captions(n_objects=1) if is_held_out(c)]
    two = [c for c in all_captions(n_objects=2) if is_held_out(c)]
    rng.shuffle(one)
    rng.shuffle(two)
    scenes = []
    for i in range(n):
        pool = one if i % 2 == 0 else two
        text = pool[(i // 2) % len(pool)]
        layout_seed = seed * 1000 + i
        scenes.append({"caption": text, "layout_seed": layout_seed, "seed": seed + i,
                       "scene": render_caption(text, layout_seed)})
    return scenes


def benchmark(base, source: str = "tiny-canny", n: int = 64, seed: int = EVAL_SEED, scale: float = 1.0,
              steps: int | None = None, guidance: float | None = None, canny_low: int = 100, canny_high: int = 200,
              log=print) -> dict:
    """Edge F1 (Canny of the output vs the condition map, 1-px tolerance) and colour+shape accuracy, for the
    ControlNet and for the base alone on the same captions and seeds."""
    from .shapes import evaluator
    from .shapes.benchmark import generate_batch

    steps = steps or base.defaults["steps"]
    guidance = base.defaults["guidance"] if guidance is None else guidance
    scenes = held_out_scenes(n, seed)
    w, h = base.defaults["width"], base.defaults["height"]
    maps = [condition_map("canny", s["scene"], w, h, low=canny_low, high=canny_high) for s in scenes]
    refs = [np.asarray(m)[..., 0] > 127 for m in maps]
    prompts, seeds = [s["caption"] for s in scenes], [s["seed"] for s in scenes]
    cn = cached_controlnet(base, source)
    with base.lock:
        controlled = generate(base.pipe, cn, prompts, maps, seeds, steps, guidance, scale=scale)
        plain = generate_batch(base.pipe, list(zip(prompts, seeds)), steps, guidance)
        # one image at a time, best of 3 after the runs above warmed up (as ``eval base`` times the base)
        best = float("inf")
        for r in range(3):
            t0 = time.perf_counter()
            generate(base.pipe, cn, prompts[r:r + 1], maps[r:r + 1], seeds[r:r + 1], steps, guidance, scale=scale)
            best = min(best, time.perf_counter() - t0)
    figures: dict = {"controlnet": source, "base": base.name, "scenes": n, "seed": seed, "steps": steps,
                     "guidance": guidance, "scale": scale, "canny": [canny_low, canny_high], "tolerance_px": 1}
    for name, imgs in (("controlnet_figures", controlled), ("base_figures", plain)):
        f1s = [edge_f1(edge_map(img, canny_low, canny_high), ref) for img, ref in zip(imgs, refs)]
        acc = evaluator.accuracy(imgs, prompts)
        figures[name] = {"edge_f1": float(np.mean([f["f1"] for f in f1s])),
                         "edge_precision": float(np.mean([f["precision"] for f in f1s])),
                         "edge_recall": float(np.mean([f["recall"] for f in f1s])),
                         "colour_shape": acc["colour_shape"], "position": acc["position"], "count": acc["count"]}
    c, b = figures["controlnet_figures"], figures["base_figures"]
    figures["edge_f1"] = round(c["edge_f1"], 4)
    figures["base_edge_f1"] = round(b["edge_f1"], 4)
    figures["colour_shape"] = c["colour_shape"]
    figures["base_colour_shape"] = b["colour_shape"]
    figures["accuracy_change_points"] = round(100 * (c["colour_shape"] - b["colour_shape"]), 1)
    figures["seconds_per_image"] = round(best, 3)
    figures["targets"] = {"edge_f1": 0.60, "accuracy_within_points": 5.0}
    figures["targets_met"] = {"edge_f1>=0.60": c["edge_f1"] >= 0.60,
                              "accuracy_within_5_points": figures["accuracy_change_points"] >= -5.0}
    figures["images"] = {"controlnet": controlled, "base": plain, "maps": maps}
    return figures
