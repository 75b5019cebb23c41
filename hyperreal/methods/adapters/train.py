"""Training an adapter: DreamBooth-style data (instance images, class images from the frozen base: prior.py, a
trigger), the learners (:class:`AdapterLearner`, and :class:`FullFineTune`, the whole-UNet comparison), the request that
turns options into a learner, and drift: how far images for prompts without the trigger moved from the base's.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from ...datasets import IMAGE_SUFFIXES, encode_images, encode_prompts, image_tensor, load_examples
from ...errors import HyperrealError
from ...images import open_image
from ...loading import plain
from ...pipelines import generate_images
from ...training import BesideTheBase, DenoisingObjective
from ...training.memory import autocast_for, check_resolution
from ...training.sampling import EpochQueue, drop_captions, noise_and_timesteps
from .files import safe_name, save_adapter
from .runtime import activate, adapters_disabled
from .prior import (size_kwargs, balanced_repeats, captions_without_trigger, class_image_cache, class_images,
                    class_prompts_for, known_words)
from .spec import KINDS, AdapterSpec, adapter_parameters, attach, loaded, sync_tokens
from .tokens import find_trigger, initial_token_vectors, set_tokens, split_trigger_words

KINDS_AND_FULL = KINDS + ("full",)  # "full": the whole-UNet fine-tune, for comparison
DEFAULT_RANK = 8
PRIOR_TARGETS = ("base", "noise")


@dataclass
class TrainRequest:
    data: str
    kind: str = "lora"  # an adapter kind, or "full" for the whole-UNet comparison
    rank: int = DEFAULT_RANK
    alpha: float | None = None
    preset: str = "diffusers-like"
    placement: str = "attention+ff"
    rslora: bool = False
    # a LoRA on the text encoder. None: for adapter kinds only when no trigger token is trained (then it is what
    # lets the trigger separate from the words the base knows); a token does that without moving how prompts
    # without the trigger are encoded (star task: drift 2.90 without the LoRA, 4.21 with). Never for ``full``
    train_text_encoder: bool | None = None
    text_encoder_lr: float | None = None
    trigger: str | None = None  # None: the word every caption shares that the base does not know (find_trigger)
    # a trigger word that the tokenizer cuts into pieces gets a new token with a trained embedding (adapter kinds)
    trigger_token: bool = True
    # prior preservation: [] takes the prompts the base is known to draw well (``prior_prompts`` in its
    # hyperreal.json), else the captions without the trigger (DreamBooth's class prompt); None: the recipe's count
    class_prompts: list[str] = field(default_factory=list)
    class_images: int | None = None
    prior_weight: float | None = None  # None: the base's recipe (its defaults' adapter_train)
    # None: balance the class images (class images / instance images per epoch, as the star recipe does), else 1
    repeats: int | None = None
    flip: bool = False
    caption_dropout: float = 0.0
    prior_uncond: float = 0.2  # share of class images trained with the empty prompt (anchors guidance)
    prior_target: str = "base"  # class images' target: the frozen base's own prediction, or "noise" (DreamBooth)
    snr_gamma: float | None = None  # min-SNR-gamma loss weighting; None: the base's recipe (0: off)
    sample_prompts: list[str] = field(default_factory=list)
    resolution: int | None = None  # training images' side in pixels (None: the base's default size)
    name: str = "adapter"
    seed: int = 0

    @property
    def adapts_text_encoder(self) -> bool:
        """Before :func:`make_learner` resolves None against the tokenizer: on for adapter kinds."""
        return self.kind != "full" if self.train_text_encoder is None else bool(self.train_text_encoder)

    def spec(self) -> AdapterSpec:
        return AdapterSpec(kind=self.kind, rank=self.rank, alpha=self.alpha, preset=self.preset,
                           placement=self.placement, rslora=self.rslora, text_encoder=self.adapts_text_encoder)


def make_learner(base, req: TrainRequest, out: str | Path, info: dict | None = None):
    """Data (cached latents/embeddings, class images) plus the learner for ``training.train``."""
    if req.kind != "full":
        req.spec().check()
    elif req.adapts_text_encoder:
        raise HyperrealError("--kind full fine-tunes the UNet only; drop --train-text-encoder")
    check_resolution(req.resolution)
    if req.text_encoder_lr is not None and not 0 < req.text_encoder_lr < 1:
        raise HyperrealError(f"--text-encoder-lr must be between 0 and 1, got {req.text_encoder_lr}")
    if req.snr_gamma is not None and req.snr_gamma < 0:  # before any class image is drawn
        raise HyperrealError(f"--snr-gamma must be above 0 (5 is the usual value; 0 turns it off), got {req.snr_gamma}")
    notes = []  # what the defaults decided, said to the person when training starts
    if req.trigger is None:
        found = find_trigger([t for _, t in instance_examples(req.data, None)], base.pipe.tokenizer,
                             known_words(base))
        if found:
            req = replace(req, trigger=found)
            notes.append(f"trigger: '{found}', the word every caption shares that the base does not know (--trigger "
                         "or the Trigger field picks another)")
    instances = instance_examples(req.data, req.trigger)
    steps, guidance = base.defaults["steps"], base.defaults["guidance"]
    size = (req.resolution, req.resolution) if req.resolution else (base.defaults["width"], base.defaults["height"])
    name = safe_name(req.name)
    words = []
    if req.kind != "full" and req.trigger_token:
        sync_tokens(base.pipe, [])  # judged on the base's own tokenizer
        words = split_trigger_words(base.pipe.tokenizer, req.trigger)
        if words and req.train_text_encoder is None:  # the token teaches the text side (see TrainRequest)
            req = replace(req, train_text_encoder=False)
    classes, folder = [], None
    count = base.defaults["adapter_train"].get("class_images", 0) if req.class_images is None else req.class_images
    prompts = req.class_prompts or base.defaults.get("prior_prompts") or []
    if count and not prompts and not req.trigger and req.class_images is None:
        notes.append("no trigger found and the base lists no prompts it draws well: prior preservation is off "
                     "(give --trigger or --class-prompt)")
        count = 0
    if count:
        prompts = prompts or class_prompts_for(instances, req.trigger)
        folder = class_image_cache(base, prompts, count, req.seed, steps, guidance, size)
        classes = class_images(base.pipe, prompts, count, folder, steps, guidance, seed=req.seed, size=size)
        notes.append(f"prior preservation: {len(classes)} images the frozen base drew for "
                     f"{len(set(prompts))} prompt(s) " + ("it is known to draw well" if not req.class_prompts and
                                                          base.defaults.get("prior_prompts") else "")
                     + f" (cached for this base in {folder})")
    repeats = req.repeats if req.repeats is not None else balanced_repeats(len(instances), len(classes))
    recipe = base.defaults["adapter_train"]
    prior_weight = recipe["prior_weight"] if req.prior_weight is None else req.prior_weight
    snr_gamma = recipe.get("snr_gamma", 0.0) if req.snr_gamma is None else req.snr_gamma
    tokens = initial_token_vectors(base.pipe, words)
    if tokens:  # in the tokenizer before the captions are tokenized
        set_tokens(base.pipe, {w: (name, v) for w, v in tokens.items()})
    # samples while training are drawn as a job with the adapter on will be: at the base's adapter guidance
    sample = dict(sample_prompts=req.sample_prompts or None, sample_steps=steps,
                  sample_guidance=base.defaults["adapter_guidance"],
                  sample_seed=req.seed, sample_size=(base.defaults["width"], base.defaults["height"]),
                  prior_target=req.prior_target, snr_gamma=snr_gamma or None)
    info = {"base": base.name, "trigger": req.trigger, "images": len(instances), "class_images": len(classes),
            "notes": notes, "class_folder": str(folder) if folder else None,
            "repeats": repeats, "prior_weight": prior_weight if classes else 0.0,
            "snr_gamma": snr_gamma or None,
            "resolution": f"{size[0]}x{size[1]}", "file_name": name,
            "trigger_tokens": words, **(info or {})}
    try:
        data = DreamBoothData(base.pipe, instances, classes, prior_weight, repeats, req.flip,
                              req.caption_dropout, cache_text=not (req.adapts_text_encoder or tokens),
                              prior_uncond=req.prior_uncond, size=size)
        if req.kind == "full":
            return FullFineTune(base.pipe, data, info=info, **sample)
        return AdapterLearner(base.pipe, data, req.spec(), name=name, text_encoder_lr=req.text_encoder_lr,
                              seed=req.seed, info=info, tokens=tokens, **sample)
    except BaseException:
        if tokens:  # no learner owns them: the base's tokenizer again
            sync_tokens(base.pipe, [])
        raise


# --- training data ------------------------------------------------------------------------------------------

def instance_examples(data: str | Path, trigger: str | None) -> list[tuple[object, str]]:
    """(image, caption) pairs: a captioned folder/zip, or a folder of bare images captioned by the trigger alone."""
    p = Path(data)
    if p.is_dir() and not (p / "metadata.jsonl").is_file() and not list(p.glob("*.txt")):
        images = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if images and not trigger:
            raise HyperrealError(f"dataset '{data}' has images but no captions: pass --trigger 'a photo of sks dog' "
                                 "to caption them all, or add NAME.txt / metadata.jsonl")
        if images:
            return [(open_image(f), trigger) for f in images]
    examples = load_examples(p)
    out = []
    for e in examples:
        text = e.text
        if trigger and trigger.lower() not in text.lower():
            text = f"{trigger}, {text}"  # kohya's habit: the trigger leads every caption
        out.append((open_image(e.image), text))
    return out


class DreamBoothData:
    """Instance (and class) images as cached latents, captions as cached embeddings when the text encoder is frozen.

    Sampling follows kohya: instance images appear ``repeats`` times per epoch next to the class images, each
    example carries a loss weight (1 for instances, ``prior_weight`` for class images); ``is_class`` marks class
    examples, whose target the learner may replace with the frozen base's own prediction.
    """

    def __init__(self, pipe, instances: list, classes: list | None = None, prior_weight: float = 1.0,
                 repeats: int = 1, flip: bool = False, caption_dropout: float = 0.0, cache_text: bool = True,
                 prior_uncond: float = 0.0, size: tuple[int, int] | None = None):
        if repeats < 1:
            raise HyperrealError(f"--repeats must be at least 1, got {repeats}")
        if not 0 <= caption_dropout < 1:
            raise HyperrealError(f"--caption-dropout must be in [0, 1), got {caption_dropout}")
        classes = classes or []
        width, height = size or (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
        items = list(instances) + list(classes)
        self.latents = encode_images(pipe.vae, (image_tensor(img, width, height) for img, _ in items))
        # flipped copies are encoded too: flipping a latent is not the latent of the flipped image
        self.flipped = (encode_images(pipe.vae, (image_tensor(img, width, height).flip(-1) for img, _ in items))
                        if flip else None)
        self.n_instances, self.repeats, self.caption_dropout = len(instances), repeats, caption_dropout
        # class images also teach the empty prompt now and then: classifier-free guidance subtracts the empty
        # prompt's prediction from every prompt's, so an adapter that moves it moves every image (measured on
        # the star task: drift 9 without guidance, 25 at guidance 5)
        self.prior_uncond = prior_uncond
        self.weights = torch.tensor([1.0] * len(instances) + [float(prior_weight)] * len(classes))
        self.texts = sorted({t for _, t in items} | {""})
        self.text_index = torch.tensor([self.texts.index(t) for _, t in items])
        self.empty = self.texts.index("")
        self.cache_text = cache_text
        if cache_text:
            self.embeddings = encode_prompts(pipe, self.texts)
        else:
            tok = pipe.tokenizer
            self.token_ids = tok(self.texts, padding="max_length", max_length=tok.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
        self.captions = [t for _, t in instances]

    def __len__(self) -> int:
        return len(self.weights)

    def batches(self, batch_size: int, seed: int, num_train_timesteps: int) -> Iterator[dict]:
        """Endless, deterministic in ``seed``: shuffled epochs, flips, caption dropout, noise and timesteps."""
        g = torch.Generator().manual_seed(seed)
        epoch = list(range(self.n_instances)) * self.repeats + list(range(self.n_instances, len(self.weights)))
        order = EpochQueue(epoch, g)
        while True:
            idx = order.take(batch_size)
            latents = self.latents[idx]
            if self.flipped is not None:
                flip = torch.rand(batch_size, generator=g) < 0.5
                latents = torch.where(flip[:, None, None, None], self.flipped[idx], latents)
            text = self.text_index[idx].clone()
            is_class = idx >= self.n_instances
            drop_captions(text, self.caption_dropout, self.empty, g)
            drop_captions(text, self.prior_uncond, self.empty, g, among=is_class)
            yield {**noise_and_timesteps(latents, num_train_timesteps, g),
                   "text": self.embeddings[text] if self.cache_text else self.token_ids[text],
                   "weights": self.weights[idx], "is_class": is_class}


# --- the learners -------------------------------------------------------------------------------------------

class _DiffusionLearner(BesideTheBase):
    """What adapter training and full fine-tuning share: the denoising loss and fixed-seed samples."""

    unet: torch.nn.Module
    sample_pipe: object

    def __init__(self, pipe, data: DreamBoothData, sample_prompts: list[str] | None = None,
                 sample_steps: int = 20, sample_guidance: float = 5.0, sample_seed: int = 0,
                 sample_size: tuple[int, int] | None = None, prior_target: str = "base",
                 snr_gamma: float | None = None):
        self.snr_gamma = snr_gamma  # None: plain weights (make_learner checked the value)
        if prior_target not in PRIOR_TARGETS:
            raise HyperrealError(f"prior target must be one of {', '.join(PRIOR_TARGETS)}, got {prior_target!r}")
        self.pipe, self.data, self.prior_target = pipe, data, prior_target
        self.objective = DenoisingObjective(pipe.scheduler.config)
        self.sample_prompts = sample_prompts or data.captions[:2]
        self.sample_steps, self.sample_guidance, self.sample_seed = sample_steps, sample_guidance, sample_seed
        self.sample_size = sample_size
        self.text_encoder = pipe.text_encoder
        self.steps_done = 0

    method = "adapter"  # its VRAM presets (training.memory)

    def checkpointing_modules(self) -> list:
        return [self.unet]

    def batches(self, batch_size: int, seed: int) -> Iterator:
        return self.data.batches(batch_size, seed, self.objective.num_train_timesteps)

    def loss(self, batch) -> torch.Tensor:
        dev, dtype = self.unet.device, self.unet.dtype
        latents, noise, t, noisy = self.objective.on_device(batch, dev)
        if self.data.cache_text:
            cond = batch["text"].to(dev, dtype)
        else:
            cond = self.text_encoder(batch["text"].to(dev))[0].to(dtype)
        pred = self.unet(noisy.to(dtype), t, cond).sample.float()
        target = self.objective.target(latents, noise, t)
        is_class = batch.get("is_class")
        if self.prior_target == "base" and is_class is not None and bool(is_class.any()):
            # Prior preservation as distillation: on class images the target is what the frozen base itself
            # predicts for the same noisy latent and prompt, so the prior loss is exactly "leave these prompts'
            # outputs alone" (drift), not "fit the base's sampled images", which guidance has already sharpened.
            sel = is_class.to(dev)
            with torch.no_grad(), self.base_only():
                base_cond = cond[sel] if self.data.cache_text else self.pipe.text_encoder(batch["text"].to(dev)[sel])[0]
                base_dtype = self.base_dtype  # a full fine-tune's copy is fp32; the frozen base may be half
                base_pred = self.pipe.unet(noisy[sel].to(base_dtype), t[sel], base_cond.to(base_dtype)).sample.float()
            target = target.clone()
            target[sel] = base_pred
        weights = batch["weights"].to(dev)
        if self.snr_gamma:
            weights = weights * self.objective.min_snr_weights(t, self.snr_gamma)
        return self.objective.loss(pred, target, weights)

    def validate(self) -> tuple[list, list[str]]:
        """Fixed seeds through the inference pipeline and scheduler, so samples match what generation gives."""
        pairs = [(p, self.sample_seed + i) for i, p in enumerate(self.sample_prompts)]
        images = generate_images(self.sample_pipe, pairs, self.sample_steps, self.sample_guidance,
                                 **size_kwargs(self.sample_size))
        return images, [f"{p} (seed {s})" for p, s in pairs]

    def after_step(self, step: int) -> None:
        self.steps_done = step


class AdapterLearner(_DiffusionLearner):
    """Train one new adapter on the frozen base (``training.Trainable``)."""

    STALL_STEPS = 3

    def __init__(self, pipe, data: DreamBoothData, spec: AdapterSpec, name: str = "default",
                 text_encoder_lr: float | None = None, seed: int = 0, info: dict | None = None,
                 tokens: dict[str, torch.Tensor] | None = None, **sample):
        if (spec.text_encoder or tokens) and data.cache_text:
            raise HyperrealError("training the text encoder or a trigger token needs uncached text: build the data "
                                 "with cache_text=False")
        super().__init__(pipe, data, **sample)
        self.spec, self.name, self.text_encoder_lr = spec, name, text_encoder_lr
        self.info = dict(info or {})
        self.unet = pipe.unet
        self.sample_pipe = pipe
        self.params = attach(pipe, spec, name, seed)
        # trigger tokens (pivotal tuning): float32 vectors that train with the text-encoder group
        self.tokens = {w: torch.nn.Parameter(v.detach().float().clone().to(pipe.text_encoder.device))
                       for w, v in (tokens or {}).items()}
        if self.tokens:
            loaded(pipe)[name]["tokens"] = self.tokens
            self.params += list(self.tokens.values())
        activate(pipe, {name: 1.0})
        for p in self.params:
            p.requires_grad_(True)
        self._named = {**adapter_parameters(pipe, name), **{f"token.{w}": p for w, p in self.tokens.items()}}
        self._start: dict[str, torch.Tensor] | None = None
        self._checked = 0

    def trainable_parameters(self) -> list:
        te = {id(p) for p in list(self.pipe.text_encoder.parameters()) + list(self.tokens.values())}
        unet_params = [p for p in self.params if id(p) not in te]
        te_params = [p for p in self.params if id(p) in te]
        groups = [{"params": unet_params}]
        if te_params:
            groups.append({"params": te_params,
                           **({"lr": self.text_encoder_lr} if self.text_encoder_lr is not None else {})})
        return groups

    def loss(self, batch) -> torch.Tensor:
        if self._start is None:  # the reference for the "did anything move" check
            self._start = {k: p.detach().clone() for k, p in self._named.items()}
        loss = super().loss(batch)
        if not loss.requires_grad:  # otherwise autograd's own message ("element 0 of tensors...") is all one sees
            raise HyperrealError("no adapter weight receives a gradient (the adapter is frozen or switched off), "
                                 "so training cannot change anything")
        return loss

    def after_step(self, step: int) -> None:
        super().after_step(step)
        self._checked += 1
        if self._checked == self.STALL_STEPS and self._start is not None:
            moved = [k for k, p in self._named.items() if not torch.equal(p.detach(), self._start[k])]
            if not moved:
                raise HyperrealError(
                    f"the adapter's weights did not change in {self.STALL_STEPS} steps: the optimizer is not updating "
                    "them (learning rate 0, frozen adapter weights, or an optimizer built before the adapter existed)")
            self._start = None  # checked once; free the copy

    def state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self._named.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in self._named.items():
                p.copy_(state[k])

    def save(self, out: Path) -> list[Path]:
        info = {**self.info, "steps_done": self.steps_done}
        return save_adapter(self.pipe, self.name, self.spec, out, info, file_name=self.info.get("file_name", "adapter"))

    @contextlib.contextmanager
    def base_only(self):
        with adapters_disabled(self.pipe) as pipe:
            yield pipe

    def trained_parameter_count(self) -> int:
        return sum(p.numel() for p in self.params)


class FullFineTune(_DiffusionLearner):
    """The comparison: fine-tune every UNet weight on the same data (a copy, so the shared base stays frozen)."""

    def __init__(self, pipe, data: DreamBoothData, info: dict | None = None, **sample):
        super().__init__(pipe, data, **sample)
        self.info = dict(info or {})
        self.unet = copy.deepcopy(plain(pipe.unet)).float().requires_grad_(True)
        self.sample_pipe = StableDiffusionPipeline(**{**pipe.components, "unet": self.unet})
        self.sample_pipe.set_progress_bar_config(disable=True)

    def trainable_parameters(self) -> list:
        return list(self.unet.parameters())

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.unet.state_dict().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.unet.load_state_dict(state)

    def save(self, out: Path) -> list[Path]:
        self.unet.save_pretrained(Path(out) / "unet", safe_serialization=True)
        return [Path(out) / "unet" / "diffusion_pytorch_model.safetensors"]

    @contextlib.contextmanager
    def base_only(self):
        yield self.pipe

    def trained_parameter_count(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())


# --- measuring -----------------------------------------------------------------------------------------------

def images_array(images) -> np.ndarray:
    return np.stack([np.asarray(i.convert("RGB"), dtype=np.float32) for i in images])


def mean_abs_difference(a, b) -> float:
    """Mean absolute pixel difference on the 0-255 scale."""
    return float(np.abs(images_array(a) - images_array(b)).mean())


def drift(learner, pairs: list[tuple[str, int]], steps: int, guidance: float, base_images=None) -> dict:
    """How far the adapted model's images for prompts without the trigger moved from the base's (same seeds)."""
    size = size_kwargs(learner.sample_size)
    with autocast_for(learner.base_dtype, learner.device):  # a full fine-tune's fp32 copy beside a half base
        if base_images is None:
            with learner.base_only() as base_pipe:
                base_images = generate_images(base_pipe, pairs, steps, guidance, **size)
        adapted = generate_images(learner.sample_pipe, pairs, steps, guidance, **size)
    return {"drift": mean_abs_difference(adapted, base_images), "n": len(pairs), "images": adapted,
            "base_images": base_images}


def drift_grid(base_images: list, adapted: list) -> Image.Image:
    """Before (top row: the base) and after (bottom row: with the adapter), the same prompts and seeds."""
    w, h = base_images[0].size
    grid = Image.new("RGB", (w * len(base_images) + 2 * (len(base_images) - 1), 2 * h + 2), "white")
    for i, (b, a) in enumerate(zip(base_images, adapted)):
        grid.paste(b.convert("RGB"), (i * (w + 2), 0))
        grid.paste(a.convert("RGB"), (i * (w + 2), h + 2))
    return grid


def default_drift_prompts(base, captions: list[str], trigger: str | None, n: int = 8) -> list[tuple[str, int]]:
    """Prompts without the trigger: the base's own (``drift_prompts`` in its hyperreal.json: groups of [prompt, seed]
    it draws well and never trained on, taken evenly, at most as many as listed), else the captions with the
    trigger removed (the class the subject belongs to: what DreamBooth's language drift is about)."""
    groups = base.defaults.get("drift_prompts") or []
    if groups:
        counts = [n // len(groups) + (i < n % len(groups)) for i in range(len(groups))]
        return [(p, int(s)) for group, k in zip(groups, counts) for p, s in group[:k]]
    texts = captions_without_trigger(captions, trigger) or ["a photo"]
    return [(texts[i % len(texts)], 1000 + i) for i in range(n)]


