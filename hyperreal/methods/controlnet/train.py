"""Training a ControlNet: condition maps computed once (or given with the data), cached latents and text
embeddings, 50% caption dropout as in the paper, and the learner whose loss runs through the frozen UNet.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from ...datasets import encode_images, encode_prompts, fit_image, image_tensor, load_examples
from ...errors import HyperrealError
from ...images import open_image
from ...training import BesideTheBase, DenoisingObjective
from ...training.memory import check_resolution
from ...training.sampling import EpochQueue, drop_captions, noise_and_timesteps
from .conditions import condition_map, extractor_params
from .files import save_controlnet
from .runtime import generate
from .spec import EXTRACTOR_KINDS, new_controlnet


def map_tensor(maps: list[Image.Image]) -> torch.Tensor:
    """Maps as uint8 N x 3 x H x W (the ControlNet sees them in [0, 1], as the pipeline's image processor gives)."""
    return torch.from_numpy(np.stack([np.asarray(m.convert("RGB"), dtype=np.uint8) for m in maps])).permute(0, 3, 1, 2)


class ControlNetData:
    """Latents, text embeddings and condition maps of a dataset, each computed once.

    ``examples`` are (image, caption, condition map) with the map already at the training size.
    """

    def __init__(self, pipe, examples: list[tuple[Image.Image, str, Image.Image]], width: int, height: int,
                 caption_dropout: float = 0.5):
        if not 0 <= caption_dropout < 1:
            raise HyperrealError(f"--caption-dropout must be in [0, 1), got {caption_dropout}")
        if not examples:
            raise HyperrealError("the dataset has no examples")
        self.width, self.height, self.caption_dropout = width, height, caption_dropout
        self.latents = encode_images(pipe.vae, (image_tensor(img, width, height) for img, _, _ in examples))
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
        order = EpochQueue(list(range(len(self))), g)
        while True:
            idx = order.take(batch_size)
            text = self.text_index[idx].clone()
            drop_captions(text, self.caption_dropout, self.empty, g)
            yield {**noise_and_timesteps(self.latents[idx], num_train_timesteps, g),
                   "text": self.embeddings[text], "cond": self.maps[idx]}


def dataset_examples(data: str | Path, extractor: str, width: int, height: int,
                     **params) -> list[tuple[Image.Image, str, Image.Image]]:
    """(image, caption, map) triples: maps computed by the extractor, or read from ``conditioning_image``."""
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
        img = fit_image(open_image(e.image), width, height)
        try:
            if extractor == "given":
                # a map given with the data is used as the user made it (no polarity guess), aligned the same way
                m = condition_map("given", fit_image(open_image(e.conditioning_image), width, height), width, height,
                                  polarity="keep")
            else:
                m = condition_map(extractor, img, width, height, **params)
        except HyperrealError as err:
            raise HyperrealError(f"'{e.image.name}': {err}") from None
        out.append((img, e.text, m))
    return out


# --- the Trainable ------------------------------------------------------------------------------------------

class ControlNetLearner(BesideTheBase):
    """Train a ControlNet against the frozen base (``training.Trainable``)."""

    def __init__(self, pipe, data: ControlNetData, controlnet=None, info: dict | None = None,
                 sample_prompts: list[str] | None = None, sample_maps: list[Image.Image] | None = None,
                 sample_steps: int = 20, sample_guidance: float = 5.0, sample_seed: int = 0,
                 name: str = "controlnet"):
        self.pipe, self.data, self.name = pipe, data, name
        self.info = dict(info or {})
        for part in (pipe.unet, pipe.vae, pipe.text_encoder):  # frozen, whatever the caller did before
            part.requires_grad_(False).eval()
        self.controlnet = controlnet if controlnet is not None else new_controlnet(pipe)
        self.controlnet.train().requires_grad_(True)
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
    method = "controlnet"  # its VRAM presets (training.memory)

    def checkpointing_modules(self) -> list:
        # activations are recomputed in the backward pass: of the copy, and of the frozen UNet the loss runs through
        return [self.controlnet, self.pipe.unet]

    def trainable_parameters(self) -> list:
        return [p for p in self.controlnet.parameters() if p.requires_grad]

    def batches(self, batch_size: int, seed: int) -> Iterator:
        return self.data.batches(batch_size, seed, self.objective.num_train_timesteps)

    def loss(self, batch) -> torch.Tensor:
        unet = self.pipe.unet
        dev, dtype = unet.device, unet.dtype
        cdtype = next(self.controlnet.parameters()).dtype
        latents, noise, t, noisy = self.objective.on_device(batch, dev)
        text = batch["text"].to(dev)
        cond = batch["cond"].to(dev).float() / 255.0
        down, mid = self.controlnet(noisy.to(cdtype), t, text.to(cdtype), controlnet_cond=cond.to(cdtype),
                                    return_dict=False)
        pred = unet(noisy.to(dtype), t, text.to(dtype),
                    down_block_additional_residuals=[d.to(dtype) for d in down],
                    mid_block_additional_residual=mid.to(dtype)).sample.float()
        return self.objective.loss(pred, self.objective.target(latents, noise, t))

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

    def save(self, out: Path) -> list[Path]:
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
    conditioning_channels: tuple[int, ...] | None = None  # None: from the base's VAE factor
    sample_prompts: list[str] = field(default_factory=list)  # default: the captions of the first examples
    sample_maps: list[str] = field(default_factory=list)  # condition-map image files used as-is (default: the data's)
    resolution: int | None = None  # training images' side in pixels (None: the base's default size)
    name: str = "controlnet"
    seed: int = 0

    def check(self) -> None:
        if self.extractor not in EXTRACTOR_KINDS:
            raise HyperrealError(f"--extractor must be one of {', '.join(EXTRACTOR_KINDS)}, got {self.extractor!r}")
        if not 0 <= self.canny_low <= self.canny_high:
            raise HyperrealError(f"Canny thresholds need 0 <= low <= high, got {self.canny_low}/{self.canny_high}")
        if not 0 <= self.caption_dropout < 1:
            raise HyperrealError(f"--caption-dropout must be in [0, 1), got {self.caption_dropout}")
        check_resolution(self.resolution)
        if not re.fullmatch(r"[\w.-]+", self.name or ""):
            raise HyperrealError(f"--name must be a plain file name (letters, digits, _ . -), got {self.name!r}")
        for m in self.sample_maps:
            if not Path(m).is_file():
                raise HyperrealError(f"sample map '{m}' is not a file")


def make_learner(base, req: TrainRequest, out: str | Path, info: dict | None = None) -> ControlNetLearner:
    """Data (maps, cached latents and embeddings) plus a fresh ControlNet, ready for ``training.train``."""
    req.check()
    width, height = (req.resolution,) * 2 if req.resolution else (base.defaults["width"], base.defaults["height"])
    params = extractor_params(req.extractor, req.canny_low, req.canny_high, req.softedge_model, req.annotators)
    examples = dataset_examples(req.data, req.extractor, width, height, **params)
    data = ControlNetData(base.pipe, examples, width, height, req.caption_dropout)
    maps = [condition_map("none", open_image(m), width, height) for m in req.sample_maps]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(req.seed)
        cn = new_controlnet(base.pipe, req.conditioning_channels)
    info = {"base": base.name, "extractor": req.extractor, "extractor_params": {k: v for k, v in params.items()
                                                                                if k != "annotators"},
            "images": len(examples), "resolution": f"{width}x{height}", "caption_dropout": req.caption_dropout,
            **(info or {})}
    return ControlNetLearner(base.pipe, data, cn, info=info, sample_prompts=req.sample_prompts, sample_maps=maps,
                             sample_steps=base.defaults["steps"], sample_guidance=base.defaults["guidance"],
                             sample_seed=req.seed, name=req.name)
