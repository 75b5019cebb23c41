"""What the command line and the app both call: one train-and-report function per method, and the checks that
can run before a base is loaded. Neither front end builds a learner or touches a model itself.

A training run reports through ``on_event`` (the shared loop's :class:`~hyperreal.training.ProgressEvent`; lines
for a person come as ``info`` events) and returns a :class:`TrainReport`, whose figures are also written to
``OUT/summary.json``. ``runner`` is the loop to use: :func:`hyperreal.training.train`, or ZeroGPU's chunked one.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import training
from .datasets import load_examples
from .errors import HyperrealError
from .loading import BaseModel
from .methods import adapters, bridge, controlnet
from .shapes import phrasing
from .training import CancelToken, ProgressEvent, TrainConfig

Runner = Callable[..., list]
SHAPES_SCENES = 2000  # images rendered for the diffusion loss when a bridge trains on the shapes world


@dataclass
class TrainReport:
    paths: list[Path]
    figures: dict  # what OUT/summary.json holds
    notes: list[str] = field(default_factory=list)  # the info lines, in order
    cancelled: bool = False


class _Reporter:
    """Sends info lines as events and keeps them for the report."""

    def __init__(self, on_event, total: int):
        self.on_event, self.total, self.notes = on_event or (lambda e: None), total, []

    def __call__(self, message: str, step: int = 0) -> None:
        self.notes.append(message)
        self.on_event(ProgressEvent("info", step, self.total, message=message))


def _finish(out: Path, paths: list, figures: dict, say: _Reporter, cancel: CancelToken) -> TrainReport:
    (out / "summary.json").write_text(json.dumps(figures, indent=2) + "\n")
    return TrainReport([Path(p) for p in paths], figures, say.notes, cancel.cancelled)


# --- adapters ---------------------------------------------------------------------------------------------------

def check_adapter_request(req: adapters.TrainRequest) -> None:
    """What can be checked before the base loads: the kind, the spec, the dataset."""
    if req.kind not in adapters.KIND_DEFAULTS:
        raise HyperrealError(f"--kind must be one of {', '.join(adapters.KIND_DEFAULTS)}, got {req.kind!r}")
    if req.kind != "full":
        req.spec().check()
    adapters.instance_examples(req.data, req.trigger)


def train_adapter(base: BaseModel, req: adapters.TrainRequest, cfg: TrainConfig, out: str | Path, on_event=None,
                  cancel: CancelToken | None = None, resume: bool = False, drift_samples: int = 8,
                  runner: Runner = training.train) -> TrainReport:
    """Train an adapter (or the full fine-tune), measure drift on prompts without the trigger, and take the
    adapter off the shared base again (generation loads the saved file when it is chosen)."""
    out, cancel = Path(out), cancel or CancelToken()
    say = _Reporter(on_event, cfg.steps)
    learner = adapters.make_learner(base, req, out, info={"steps": cfg.steps, "lr": cfg.lr,
                                                          "batch_size": cfg.batch_size})
    full = req.kind == "full"
    try:
        what = "the whole UNet (full fine-tune)" if full else learner.spec.describe()
        n_class = len(learner.data) - learner.data.n_instances
        say(f"training {what}: {learner.trained_parameter_count():,} parameters on {learner.data.n_instances} "
            "images" + (f" + {n_class} class images (repeats {learner.data.repeats})" if n_class else ""))
        for word in getattr(learner, "tokens", {}):
            say(f"trigger word '{word}' is several tokens to this tokenizer: it gets a new token of its own, "
                "trained with the adapter and saved in its file")
        t0 = time.time()
        paths = runner(learner, cfg, out, on_event=on_event, cancel=cancel, resume=resume)
        train_seconds = time.time() - t0
        pairs = adapters.default_drift_prompts(base, learner.data.captions, req.trigger, drift_samples)
        measured = adapters.drift(learner, pairs, base.defaults["steps"], base.defaults["guidance"])
    finally:
        if not full:
            adapters.remove_adapter(base.pipe, learner.name)
    loads_in = {} if full else json.loads((out / "adapter.json").read_text())["loads_in"]
    for p in paths:
        where = loads_in.get(str(Path(p).relative_to(out)), "diffusers (UNet2DConditionModel.from_pretrained)")
        say(f"wrote {p} (loads in: {where})", cfg.steps)
    say(f"Drift on {len(pairs)} prompts without the trigger: mean abs pixel difference {measured['drift']:.2f} "
        "(0-255) from the base, same seeds; small is good: the base kept its knowledge", cfg.steps)
    figures = {"kind": req.kind, "base": base.name, "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
               "trained_parameters": learner.trained_parameter_count(),
               "scale": None if full else learner.spec.scale, "rank": None if full else req.rank,
               "alpha": None if full else learner.spec.resolved_alpha,
               "train_seconds": round(train_seconds, 1), "drift": round(measured["drift"], 3),
               "drift_prompts": len(pairs), "files": [str(p) for p in paths]}
    return _finish(out, paths, figures, say, cancel)


# --- ControlNet -------------------------------------------------------------------------------------------------

def check_controlnet_request(req: controlnet.TrainRequest) -> None:
    req.check()
    load_examples(req.data)


def train_controlnet(base: BaseModel, req: controlnet.TrainRequest, cfg: TrainConfig, out: str | Path,
                     on_event=None, cancel: CancelToken | None = None, resume: bool = False,
                     runner: Runner = training.train) -> TrainReport:
    """Compute the maps, train a ControlNet, and write its diffusers folder and single file."""
    out, cancel = Path(out), cancel or CancelToken()
    say = _Reporter(on_event, cfg.steps)
    t0 = time.time()
    learner = controlnet.make_learner(base, req, out, info={"steps": cfg.steps, "lr": cfg.lr,
                                                            "batch_size": cfg.batch_size})
    data_seconds = time.time() - t0
    say(controlnet.WHAT_LEARNS)
    say(f"training {learner.trained_parameter_count():,} parameters on {len(learner.data)} images ({req.extractor} "
        f"maps; latents, embeddings and maps cached in {data_seconds:.1f}s)")
    t0 = time.time()
    paths = runner(learner, cfg, out, on_event=on_event, cancel=cancel, resume=resume)
    train_seconds = time.time() - t0
    for p in paths:
        where = ("diffusers (ControlNetModel.from_pretrained), hyperreal" if Path(p).is_dir()
                 else "hyperreal (diffusers keys; config in the header)")
        say(f"wrote {p} (loads in: {where})", cfg.steps)
    losses = json.loads((out / "losses.json").read_text())
    figures = {"base": base.name, "extractor": req.extractor, "steps": cfg.steps, "batch_size": cfg.batch_size,
               "lr": cfg.lr, "trained_parameters": learner.trained_parameter_count(), "images": len(learner.data),
               "train_seconds": round(train_seconds, 1), "data_seconds": round(data_seconds, 1),
               "final_loss": losses[-1] if losses else None, "files": [str(p) for p in paths]}
    return _finish(out, paths, figures, say, cancel)


# --- the encoder bridge -----------------------------------------------------------------------------------------

def bridge_data(base: BaseModel | None, req: bridge.TrainRequest, scenes: int = SHAPES_SCENES) -> bridge.BridgeData:
    """What a bridge trains on: ``shapes`` (the shapes world's captions and rendered scenes, on a base trained on
    that world) or a captions file / dataset; on such a base, captions are also rephrased in the world's words."""
    world = base.defaults.get("world") if base is not None else None
    if req.data == "shapes":
        if base is not None and world != "shapes":
            raise HyperrealError("--data shapes is the shapes world of the tiny base; give captions or images for "
                                 "this base")
        data = bridge.BridgeData(phrasing.shapes_captions(), lambda: phrasing.scenes(scenes, req.seed + 17))
    else:
        data = bridge.read_captions(req.data)
    if world == "shapes":
        data.rephrase = phrasing.phrase
    return data


def check_bridge_request(req: bridge.TrainRequest) -> None:
    req.check()
    if req.data != "shapes":
        bridge.read_captions(req.data)


def train_bridge(base: BaseModel, req: bridge.TrainRequest, cfg: TrainConfig, out: str | Path, on_event=None,
                 cancel: CancelToken | None = None, resume: bool = False,
                 scenes: int = SHAPES_SCENES) -> TrainReport:
    """Train a bridge (swap: distillation, then optionally the diffusion loss; fuse: the diffusion loss)."""
    out, cancel = Path(out), cancel or CancelToken()
    say = _Reporter(on_event, cfg.steps)
    say(bridge.WHAT_LEARNS)
    t0 = time.time()
    paths = bridge.run_training(base, req, cfg, out, bridge_data(base, req, scenes), on_event=on_event,
                                cancel=cancel, resume=resume)
    seconds = time.time() - t0
    lb = bridge.load_bridge(str(paths[0]))
    for p in paths:
        say(f"wrote {p} ({p.stat().st_size / 1e6:.2f} MB); use it in jobs as "
            f"\"bridge\": {{\"path\": \"{p}\", \"scale\": 1.0}}", cfg.steps)
    figures = {"mode": req.mode, "base": base.name, "encoder": lb.spec.encoder, "steps": cfg.steps,
               "diffusion_steps": req.diffusion_steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
               "trained_parameters": sum(p.numel() for p in lb.bridge.parameters()),
               "lora_rank": req.lora_rank, "train_seconds": round(seconds, 1),
               "layer_weights": lb.bridge.layer_weights(), "files": [str(p) for p in paths]}
    if req.mode == "fuse":
        figures["gates"] = [round(float(g), 4) for g in lb.bridge.gates]
    return _finish(out, paths, figures, say, cancel)


# --- what the ControlNet tab previews -----------------------------------------------------------------------------

def condition_map(kind: str, image, width: int, height: int, resize_mode: str = "just resize", **params):
    """A condition map (``ConditionResult``: image, what ran, a note) for a ControlNet unit's preview."""
    return controlnet.make_condition(kind, image, width, height, resize_mode, **params)
