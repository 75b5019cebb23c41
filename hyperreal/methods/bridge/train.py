"""Training a bridge: the data (captions, images for the diffusion loss, optional rephrasings), the two
learners (swap's distillation against the base text encoder; the diffusion loss through the frozen UNet, which
fuse uses and swap may add), and the whole run, one call of the shared loop per stage.
"""
from __future__ import annotations

import contextlib
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from PIL import Image

from ... import training
from ...datasets import encode_images, encode_prompts, image_tensor, load_examples, read_text
from ...errors import HyperrealError
from ...safety import as_path
from ...images import open_image
from ...training import BesideTheBase, DenoisingObjective
from ...training.memory import check_resolution
from ...training.sampling import noise_and_timesteps
from .encoders import add_encoder_lora, default_encoder, encoder_lora_state, load_encoder
from .files import save_bridge
from .runtime import FuseState, fuse_installed, generate, get_encoder
from .spec import MODES, Bridge, LoadedBridge, new_spec


@dataclass
class BridgeData:
    """What a bridge trains on: captions; images for the diffusion loss (an iterable of (image, caption), read
    only when a diffusion stage runs); and ``rephrase(caption, rng)``, another phrasing of a caption (None: the
    captions as written)."""

    captions: list[str]
    images: Callable[[], Iterable[tuple[Image.Image, str]]] | None = None
    rephrase: Callable[[str, random.Random], str] | None = None


def read_captions(data: str) -> BridgeData:
    """Captions (and images when there are any) from a captions .txt or a dataset folder/zip."""
    p = as_path(data, "data")
    if p.is_file() and p.suffix.lower() == ".txt":
        caps = [line.strip() for line in read_text(p).splitlines() if line.strip()]
        if not caps:
            raise HyperrealError(f"captions file '{data}' is empty (one caption per line)")
        return BridgeData(caps)
    if not p.exists():
        raise HyperrealError(f"--data '{data}' does not exist (a captions .txt or a dataset folder or .zip)")
    examples = load_examples(p)

    def images():
        for e in examples:
            yield open_image(e.image), e.text

    return BridgeData([e.text for e in examples], images)


# --- learners --------------------------------------------------------------------------------------------------

class _BridgeLearner(BesideTheBase):
    """What both stages share: the bridge, its encoder (+LoRA), the trainable set, state and the saved file."""

    def __init__(self, base, lb: LoadedBridge, out_file: Path, captions: list[str],
                 rephrase: Callable[[str, random.Random], str] | None, sample_prompts: list[str], info: dict,
                 lora_params: list | None = None):
        self.base, self.pipe, self.lb = base, base.pipe, lb
        self.out_file, self.captions, self.rephrase = Path(out_file), captions, rephrase
        self.sample_prompts, self.info = sample_prompts, info
        self.lora_params = lora_params or []
        self.steps_done = 0
        self._phrasings: dict[str, list[str]] = {}  # caption -> its fixed phrasings (pooled encoders)

    method = "bridge"  # its VRAM presets (training.memory)

    def trainable_parameters(self) -> list:
        groups = [{"params": [p for p in self.lb.bridge.parameters() if p.requires_grad]}]
        if self.lora_params:
            groups.append({"params": self.lora_params})
        return groups

    def _named(self) -> dict[str, torch.Tensor]:
        d = {f"bridge.{k}": v for k, v in self.lb.bridge.state_dict().items()}
        d.update({f"encoder_lora.{k}": v for k, v in encoder_lora_state(self.lb.encoder).items()})
        return d

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self._named().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        named = {**{f"bridge.{k}": v for k, v in self.lb.bridge.state_dict().items()},
                 **{f"encoder_lora.{n}": p for n, p in self.lb.encoder.model.named_parameters() if ".lora_" in n}}
        with torch.no_grad():
            for k, v in state.items():
                named[k].copy_(v)

    def save(self, out: Path) -> list[Path]:
        return [save_bridge(self.lb, self.out_file, {**self.info, "steps_done": self.steps_done})]

    def after_step(self, step: int) -> None:
        self.steps_done = step

    # a pooled encoder reads each new text whole on the CPU (milliseconds each): it sees a fixed set of phrasings
    # per caption, drawn once, so that it reads each text once per run (its vectors are memoised)
    PHRASINGS = 48

    def _text(self, rng: random.Random, caption: str) -> str:
        if not self.rephrase:
            return caption
        if not self.lb.encoder.pooled:
            return self.rephrase(caption, rng)
        if caption not in self._phrasings:
            r = random.Random(caption)
            self._phrasings[caption] = [self.rephrase(caption, r) for _ in range(self.PHRASINGS)]
        return rng.choice(self._phrasings[caption])

    def encode(self, texts: list[str], base_texts: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The bridge's output for ``texts``; a residual bridge adds to the base encoder's reading of
        ``base_texts`` (default: the same texts)."""
        with torch.set_grad_enabled(bool(self.lora_params) and torch.is_grad_enabled()):
            states, mask = self.lb.encoder.read(texts, self.lb.spec.max_length)
        base = self.base_condition(base_texts if base_texts is not None else texts) if self.lb.spec.residual else None
        return self.lb.bridge(states, mask, base), self.lb.bridge.token_mask(mask)

    def base_condition(self, texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return encode_prompts(self.pipe, texts).to(self.pipe.device)

    def validate(self) -> tuple[list, list[str]]:
        d = self.base.defaults
        self.lb.bridge.eval()
        pairs = [(p, i) for i, p in enumerate(self.sample_prompts)]
        try:
            images = generate(self.pipe, self.lb, pairs, d["steps"], d["guidance"], width=d["width"],
                              height=d["height"])
        finally:
            self.lb.bridge.train()
        return images, [f"{p} (seed {s})" for p, s in pairs]


# letters of scripts the base's tokenizer may not read (Latin with accents, Cyrillic, Greek, Arabic, CJK)
_LETTERS = ("abcdefghijklmnopqrstuvwxyzáéíóúñçàèùâêôäöüß" "абвгдежзийклмнопрстуфхцчшщыэюя" "αβγδεζηθικλμνξοπρστυφχψω"
            "ابتثجحخدذرزسشصضطظعغفقكلمنهوي" "一个红色的圆蓝绿黄紫橙方形三角左右上下中间")


def unreadable(text: str, rng: random.Random) -> str:
    """``text`` as the base encoder may see a prompt in a language it never learnt: most words become strings of
    letters from other scripts, a few stay."""
    words = [w if rng.random() < 0.25 else "".join(rng.choice(_LETTERS) for _ in range(rng.randint(2, 9)))
             for w in text.split()]
    return " ".join(words)


class DistillLearner(_BridgeLearner):
    """Swap, stage 1: match the base text encoder's output for each caption from the extra encoder's reading of
    the caption (or another phrasing of it). Captions only: no images, no UNet.

    A residual bridge also reads the base encoder's output; for a share ``base_noise`` of the examples that output
    is of nothing or of letters the base cannot read (as for a prompt in another language), so the bridge learns
    to carry the meaning from the extra encoder alone, and elsewhere to leave what the base reads as it is.
    """

    def __init__(self, *a, base_noise: float = 0.5, **k):
        super().__init__(*a, **k)
        self.base_noise = base_noise if self.lb.spec.residual else 0.0
        texts = sorted(set(self.captions) | {""})
        self.targets = dict(zip(texts, encode_prompts(self.pipe, texts)))

    def batches(self, batch_size: int, seed: int) -> Iterator:
        rng = random.Random(seed)
        while True:
            caps = [rng.choice(self.captions) if rng.random() > 0.02 else "" for _ in range(batch_size)]
            texts = [self._text(rng, c) for c in caps]
            base_texts = []
            for t in texts:
                r = rng.random()
                base_texts.append(t if r >= self.base_noise else "" if r < 0.2 * self.base_noise
                                  else unreadable(t, rng))
            yield texts, base_texts, torch.stack([self.targets[c] for c in caps])

    def loss(self, batch) -> torch.Tensor:
        texts, base_texts, target = batch
        pred, _ = self.encode(texts, base_texts)
        return F.mse_loss(pred, target.to(pred.device))


class DiffusionLearner(_BridgeLearner):
    """Fuse (and swap, stage 2): the denoising loss through the frozen UNet, on cached latents.

    Fuse hides the caption from the base text encoder with probability ``base_dropout`` (and both encoders with
    ``uncond_dropout``), so the new path learns to carry the prompt on its own: words the base never learnt reach
    the image only through it. With ``keep_base``, wherever the base encoder does read the prompt the target is the
    frozen base's own prediction for the caption (the adapters' prior, applied per example): the new path learns
    to add nothing where the base already draws the caption, and to mend other phrasings towards it.
    """

    def __init__(self, *a, latents: torch.Tensor, latent_captions: list[str], base_dropout: float = 0.5,
                 uncond_dropout: float = 0.1, keep_base: bool = True, **k):
        super().__init__(*a, **k)
        self.latents, self.latent_captions = latents, latent_captions
        self.base_dropout, self.uncond_dropout = base_dropout, uncond_dropout
        self.keep_base = keep_base and self.lb.spec.mode == "fuse"
        self.objective = DenoisingObjective(self.pipe.scheduler.config)
        self.state_ = FuseState()
        self._stack = contextlib.ExitStack()
        if self.lb.spec.mode == "fuse":
            self._stack.enter_context(fuse_installed(self.pipe.unet, self.lb.bridge, self.state_))

    def close(self) -> None:
        self.state_.clear()
        self._stack.close()

    def checkpointing_modules(self) -> list:
        return [self.pipe.unet]

    def batches(self, batch_size: int, seed: int) -> Iterator:
        rng = random.Random(seed)
        g = torch.Generator().manual_seed(seed)
        fuse = self.lb.spec.mode == "fuse"
        while True:
            idx = [rng.randrange(len(self.latents)) for _ in range(batch_size)]
            texts, base_texts, teach = [], [], []
            for i in idx:
                t = self._text(rng, self.latent_captions[i])
                r = rng.random()
                if r < self.uncond_dropout:
                    texts.append(""), base_texts.append("")
                else:
                    texts.append(t)
                    base_texts.append("" if fuse and r < self.uncond_dropout + self.base_dropout else t)
                # the base's own prediction for the caption is the target where the base reads the prompt
                teach.append(self.latent_captions[i] if self.keep_base and base_texts[-1] else None)
            yield {**noise_and_timesteps(self.latents[idx], self.objective.num_train_timesteps, g), "texts": texts,
                   "base_texts": base_texts, "teach": teach}

    def loss(self, batch) -> torch.Tensor:
        unet = self.pipe.unet
        dev, dtype = unet.device, unet.dtype
        latents, noise, t, noisy = self.objective.on_device(batch, dev)
        tokens, mask = self.encode(batch["texts"])
        target = self.objective.target(latents, noise, t)
        if self.lb.spec.mode == "swap":
            cond = tokens.to(dtype)
        else:
            cond = self._base_condition(batch["base_texts"])
            teach = [i for i, c in enumerate(batch.get("teach") or []) if c is not None]
            if teach:  # the frozen base alone (scale 0 is its exact output) reading the caption
                with torch.no_grad():
                    self.state_.set(tokens[teach], mask[teach], scale=0.0)
                    own = unet(noisy[teach].to(dtype), t[teach],
                               self._base_condition([batch["teach"][i] for i in teach])).sample.float()
                target = target.clone()
                target[teach] = own
            # kept set after the forward: gradient checkpointing runs the processors again in the backward pass
            # (the next loss call replaces them; close() clears them)
            self.state_.set(tokens, mask)
        pred = unet(noisy.to(dtype), t, cond).sample.float()
        return self.objective.loss(pred, target)

    def _base_condition(self, texts: list[str]) -> torch.Tensor:
        unet = self.pipe.unet
        ids = self.pipe.tokenizer(texts, padding="max_length", truncation=True,
                                  max_length=self.pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            return self.pipe.text_encoder(ids.to(unet.device))[0].to(unet.dtype)

    def validate(self) -> tuple[list, list[str]]:
        with self._paused():
            return super().validate()

    @contextlib.contextmanager
    def _paused(self):
        """Sampling installs its own processors; take the training ones off meanwhile."""
        self._stack.close()
        try:
            yield
        finally:
            if self.lb.spec.mode == "fuse":
                self._stack = contextlib.ExitStack()
                self._stack.enter_context(fuse_installed(self.pipe.unet, self.lb.bridge, self.state_))


# --- one training run ----------------------------------------------------------------------------------------

@dataclass
class TrainRequest:
    data: str  # what it trains on, as given (a captions .txt, a dataset folder/.zip, or a named dataset)
    mode: str = "swap"  # measured better at reading new words and keeping the base (README: Encoder bridge)
    encoder: str | None = None  # default: the base's own choice (its defaults' bridge_encoder), else BART
    max_length: int | None = None  # extra encoder tokens (default: the base tokenizer's length)
    width: int = 256
    layers: int = 3
    heads: int = 4
    lora_rank: int = 0
    diffusion_steps: int = 0  # swap: the optional second stage with the diffusion loss
    # how often the base text encoder sees an empty prompt (fuse), or nothing or unreadable letters (residual swap)
    base_dropout: float = 0.5
    residual: bool = True  # swap: correct the base's own condition (starts at it exactly) rather than replace it
    keep_base: bool = True  # fuse: where the base encoder reads the prompt, the target is the base's own prediction
    paraphrase: bool = True  # also train on other phrasings of the captions, where the data has a way to make them
    resolution: int | None = None  # images' side in pixels for the diffusion loss (None: the base's default size)
    sample_prompts: list[str] = field(default_factory=list)
    name: str = "bridge"
    seed: int = 0

    def check(self) -> None:
        if self.mode not in MODES:
            raise HyperrealError(f"--mode must be fuse or swap, got {self.mode!r}")
        if not 0 <= self.lora_rank <= 256:
            raise HyperrealError(f"--lora-rank must be between 0 (off) and 256, got {self.lora_rank}")
        if self.diffusion_steps < 0 or (self.diffusion_steps and self.mode == "fuse"):
            raise HyperrealError("--diffusion-steps is swap's optional second stage (fuse always uses the diffusion "
                                 "loss)")
        if not 0 <= self.base_dropout < 1:
            raise HyperrealError(f"--base-dropout must be in [0, 1), got {self.base_dropout}")
        if not re.fullmatch(r"[\w.-]+", self.name):
            raise HyperrealError(f"--name may hold letters, digits, '.', '-' and '_' only, got {self.name!r}")
        check_resolution(self.resolution)


def _latents(base, req: TrainRequest, data: BridgeData) -> tuple[torch.Tensor, list[str]]:
    if data.images is None:
        raise HyperrealError(f"{req.mode} training with the diffusion loss needs images: give a dataset folder "
                             "(metadata.jsonl or NAME.txt captions) or a named dataset with images")
    w, h = (req.resolution,) * 2 if req.resolution else (base.defaults["width"], base.defaults["height"])
    caps: list[str] = []

    def tensors():  # streamed: only the latents are kept for the whole dataset
        for image, caption in data.images():
            caps.append(caption)
            yield image_tensor(image, w, h)

    return encode_images(base.pipe.vae, tensors()), caps


def make_learners(base, req: TrainRequest, out: str | Path, data: BridgeData | None = None,
                  info: dict | None = None) -> list[tuple[str, object]]:
    """The stages of one run as (name, Trainable): swap = distill (+ diffuse), fuse = diffuse. ``data`` defaults to
    :func:`read_captions` of ``req.data``."""
    req.check()
    out = Path(out)
    data = data or read_captions(req.data)
    captions = data.captions
    enc_source = req.encoder or default_encoder(base)
    encoder = load_encoder(enc_source, base.pipe.device) if req.lora_rank else get_encoder(base, enc_source)
    spec = new_spec(base, encoder, req.mode, req.max_length, req.width, req.layers, req.heads, req.lora_rank,
                    req.residual)
    bridge = Bridge.create(spec, base.pipe.unet, seed=req.seed).to(base.pipe.device).train()
    lora = add_encoder_lora(encoder, req.lora_rank, req.seed) if req.lora_rank else []
    info = {"base": base.name, "data": req.data, "captions": len(captions), **(info or {})}
    lb = LoadedBridge(bridge, encoder, info)
    samples = req.sample_prompts or captions[:2]
    common = dict(base=base, lb=lb, out_file=out / f"{req.name}.safetensors", captions=captions,
                  rephrase=data.rephrase if req.paraphrase else None, sample_prompts=samples, info=info,
                  lora_params=lora)
    stages = []
    if req.mode == "swap":
        stages.append(("distill", DistillLearner(**common, base_noise=req.base_dropout)))
    if req.mode == "fuse" or req.diffusion_steps:
        lat, caps = _latents(base, req, data)
        stages.append(("diffuse", DiffusionLearner(**{**common, "captions": caps}, latents=lat, latent_captions=caps,
                                                   base_dropout=req.base_dropout, keep_base=req.keep_base)))
    return stages


def train_stages(base, req: TrainRequest, cfg, out: str | Path, stages: list[tuple[str, object]], on_event=None,
                 cancel=None, resume: bool = False) -> list[Path]:
    """Each stage through ``training.train`` (checkpoints under OUT/<stage>); returns the bridge file. ``cfg`` is the
    first stage's TrainConfig; swap's diffusion stage reuses it with ``req.diffusion_steps`` steps and the base's
    fuse batch size."""
    out, paths = Path(out), []
    cancel = cancel or training.CancelToken()
    for i, (name, learner) in enumerate(stages):
        scfg = cfg if i == 0 else replace(cfg, steps=req.diffusion_steps,
                                          batch_size=base.defaults["bridge_train"]["fuse"]["batch_size"])

        def emit(e, name=name):
            if on_event:
                e.message = f"[{name}] {e.message}" if e.message else e.message
                on_event(e)

        paths = training.train(learner, scfg, out / name, on_event=emit, cancel=cancel, resume=resume)
        if cancel.cancelled:
            break
    return paths


def record_training_time(out: str | Path, stages: list[tuple[str, object]], path: Path) -> float:
    """The loop's time over every stage (and resume) into the bridge file's header; returns it."""
    seconds = round(sum(training.training_seconds(Path(out) / name) or 0.0 for name, _ in stages), 1)
    save_bridge(stages[-1][1].lb, path, {"train_seconds": seconds, "steps_done": stages[-1][1].steps_done})
    return seconds


def close(stages: list[tuple[str, object]]) -> None:
    for _, learner in stages:
        if hasattr(learner, "close"):
            learner.close()


def run_training(base, req: TrainRequest, cfg, out: str | Path, data: BridgeData | None = None, on_event=None,
                 cancel=None, resume: bool = False) -> list[Path]:
    """The whole run in this process: the stages built, trained and closed; the training time in the header."""
    stages = make_learners(base, req, out, data, info={"mode": req.mode, "steps": cfg.steps, "lr": cfg.lr,
                                                       "batch_size": cfg.batch_size})
    try:
        paths = train_stages(base, req, cfg, out, stages, on_event, cancel, resume)
    finally:
        close(stages)
    if paths:
        record_training_time(out, stages, paths[0])
    return paths
