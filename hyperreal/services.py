"""What the command line and the app both call: one train-and-report function per method, and the checks that
can run before a base is loaded. Neither front end builds a learner or touches a model itself.

A training run reports through ``on_event`` (the shared loop's :class:`~hyperreal.training.ProgressEvent`; lines
for a person come as ``info`` events) and returns a :class:`TrainReport`, whose figures are also written to
``OUT/summary.json``. ``runner`` is the loop to use: :func:`hyperreal.training.train`, or ZeroGPU's chunked one.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from PIL import Image

from . import training
from .datasets import load_examples, unpack
from .errors import HyperrealError
from .loading import BaseModel
from .registry import embedded_artifacts
from .methods import adapters, bridge, controlnet
from .shapes import phrasing
from .training import CancelToken, ProgressEvent, TrainConfig, memory
from .training.session import Session, run_here

Runner = Callable[..., tuple]  # training.session.run_here, or zerogpu.run_in_chunks
SHAPES_SCENES = 2000  # images rendered for the diffusion loss when a bridge trains on the shapes world


@dataclass
class TrainReport:
    paths: list[Path]
    figures: dict  # what OUT/summary.json holds
    notes: list[str] = field(default_factory=list)  # the info lines, in order
    cancelled: bool = False


class _Reporter:
    """Sends info lines as events and keeps them for the report; ``relay`` passes the loop's events on (and keeps
    the info lines a GPU process sent)."""

    def __init__(self, on_event, total: int):
        self.on_event, self.total, self.notes = on_event or (lambda e: None), total, []

    def __call__(self, message: str, step: int = 0) -> None:
        self.relay(ProgressEvent("info", step, self.total, message=message))

    def relay(self, event: ProgressEvent) -> None:
        if event.kind == "info" and event.message not in self.notes:
            self.notes.append(event.message)
        self.on_event(event)


def _info(emit, message: str) -> None:
    emit(ProgressEvent("info", 0, 0, message=message))


def _loop(cfg: TrainConfig, out: Path):
    """A session's train step for a single learner: the shared loop."""
    def run(learner, on_event, cancel, resume) -> list[Path]:
        return training.train(learner, cfg, out, on_event=on_event, cancel=cancel, resume=resume)
    return run


def train_settings(base: BaseModel, method: str, variant: str | None = None, vram: str | int | None = "auto") -> dict:
    """What a training run uses when a person sets nothing (the CLI's defaults, the Train panels' starting
    values): the base's recipe for the method (``variant``: the adapter kind, the bridge mode), with the batch size
    capped, gradient checkpointing and 8-bit Adam as the VRAM preset for the card says (none on the CPU)."""
    recipe = base.defaults[f"{method}_train"]
    out = dict(recipe[variant or "fuse"]) if method == "bridge" else dict(recipe)
    out["sample_every"] = recipe["sample_every"]
    out.setdefault("lr_schedule", recipe.get("lr_schedule", "constant"))
    if method == "adapter" and variant == "full":
        out["lr"] = recipe["full_lr"]
    tier, preset = memory.preset(method, vram, base.device)
    out.update(vram=tier, gradient_checkpointing=preset.get("gradient_checkpointing", False),
               use_8bit_adam=preset.get("use_8bit_adam", False),
               batch_size=min(out["batch_size"], preset.get("batch_size", out["batch_size"])))
    return out


def _finish(out: Path, paths: list, figures: dict, say: _Reporter, cancel: CancelToken) -> TrainReport:
    (out / "summary.json").write_text(json.dumps(figures, indent=2) + "\n")
    return TrainReport([Path(p) for p in paths], figures, say.notes, cancel.cancelled)


# --- adapters ---------------------------------------------------------------------------------------------------

def _unpacked(req, out: str | Path):
    """The request with a .zip dataset unpacked once, into the run's folder (OUT/data)."""
    folder = unpack(req.data, Path(out) / "data")
    return req if str(folder) == str(req.data) else replace(req, data=str(folder))


def check_adapter_request(req: adapters.TrainRequest, out: str | Path) -> adapters.TrainRequest:
    """What can be checked before the base loads: the kind, the spec, the dataset (a .zip is unpacked into OUT);
    returns the request to train with."""
    if req.kind not in adapters.KINDS_AND_FULL:
        raise HyperrealError(f"--kind must be one of {', '.join(adapters.KINDS_AND_FULL)}, got {req.kind!r}")
    if req.kind != "full":
        req.spec().check()
    req = _unpacked(req, out)
    adapters.instance_examples(req.data, req.trigger)
    return req


def train_adapter(base: BaseModel, req: adapters.TrainRequest, cfg: TrainConfig, out: str | Path, on_event=None,
                  cancel: CancelToken | None = None, resume: bool = False, drift_samples: int = 8,
                  runner: Runner = run_here) -> TrainReport:
    """Train an adapter (or the full fine-tune), measure drift on prompts without the trigger, and take the
    adapter off the shared base again (generation loads the saved file when it is chosen)."""
    out, cancel = Path(out), cancel or CancelToken()
    say = _Reporter(on_event, cfg.steps)
    full = req.kind == "full"

    @contextlib.contextmanager
    def open_(emit):
        with base.in_training():
            learner = adapters.make_learner(base, req, out, info={"steps": cfg.steps, "lr": cfg.lr,
                                                                  "lr_schedule": cfg.lr_schedule,
                                                                  "warmup": cfg.warmup,
                                                                  "batch_size": cfg.batch_size})
            try:
                what = "the whole UNet (full fine-tune)" if full else learner.spec.describe()
                n_class = len(learner.data) - learner.data.n_instances
                _info(emit, f"training {what}: {learner.trained_parameter_count():,} parameters on "
                            f"{learner.data.n_instances} images"
                            + (f" + {n_class} class images (repeats {learner.data.repeats})" if n_class else ""))
                for note in learner.info.get("notes", []):
                    _info(emit, note)
                for word in getattr(learner, "tokens", {}):
                    _info(emit, f"trigger word '{word}' is several tokens to this tokenizer: it gets a new token of "
                                "its own, trained with the adapter and saved in its file")
                yield learner
            finally:
                if not full:
                    adapters.remove_adapter(base.pipe, learner.name)

    def report(learner, paths) -> dict:
        trigger = learner.info.get("trigger")  # the one found in the captions when none was given
        pairs = adapters.default_drift_prompts(base, learner.data.captions, trigger, drift_samples)
        # both sides at the guidance a job gets with an adapter on: the difference is the adapter's alone
        measured = adapters.drift(learner, pairs, base.defaults["steps"], base.defaults["adapter_guidance"])
        # a file, not images: on ZeroGPU this runs in another process, and files are what come back
        grid = out / "drift.png"
        adapters.drift_grid(measured["base_images"], measured["images"]).save(grid)
        (out / "drift_prompts.json").write_text(json.dumps(pairs) + "\n")
        return {"drift": round(measured["drift"], 3), "drift_prompts": len(pairs), "drift_grid": str(grid),
                "trigger": trigger, "class_images": learner.info.get("class_images", 0),
                "trained_parameters": learner.trained_parameter_count(),
                "scale": None if full else learner.spec.scale, "alpha": None if full else learner.spec.resolved_alpha}

    paths, measured = runner(Session(out, open_, _loop(cfg, out), report), say.relay, cancel, resume)
    loads_in = {} if full else json.loads((out / "adapter.json").read_text())["loads_in"]
    for p in paths:
        where = loads_in.get(str(Path(p).relative_to(out)), "diffusers (UNet2DConditionModel.from_pretrained)")
        say(f"wrote {p} (loads in: {where})", cfg.steps)
    say(f"Drift on {measured['drift_prompts']} prompts without the trigger: mean abs pixel difference "
        f"{measured['drift']:.2f} (0-255) from the base, same seeds, guidance {base.defaults['adapter_guidance']:g}; "
        f"small is good: the base kept its knowledge. Before (top) and after (bottom): {measured['drift_grid']}",
        cfg.steps)
    if not full and base.defaults["adapter_guidance"] != base.defaults["guidance"]:
        say(f"With an adapter on, jobs and the Generate tab start at guidance {base.defaults['adapter_guidance']:g} "
            f"(this base's own is {base.defaults['guidance']:g}): a job's 'guidance' sets another", cfg.steps)
    if on_event is not None:  # the grid itself, for the app's gallery
        with Image.open(measured["drift_grid"]) as grid:
            on_event(ProgressEvent("info", cfg.steps, cfg.steps, images=[grid.copy()], captions=[
                f"without the trigger, before (top: the base) and after (bottom: with the adapter); drift "
                f"{measured['drift']:.2f}"]))
    figures = {"kind": req.kind, "base": base.name, "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
               "lr_schedule": cfg.lr_schedule,
               "trained_parameters": measured["trained_parameters"], "scale": measured["scale"],
               "rank": None if full else req.rank, "alpha": measured["alpha"],
               "train_seconds": training.training_seconds(out), "drift": measured["drift"],
               "drift_prompts": measured["drift_prompts"], "drift_grid": measured["drift_grid"],
               "guidance": base.defaults["adapter_guidance"],
               "trigger": measured["trigger"], "class_images": measured["class_images"],
               "files": [str(p) for p in paths]}
    return _finish(out, paths, figures, say, cancel)


# --- ControlNet -------------------------------------------------------------------------------------------------

def check_controlnet_request(req: controlnet.TrainRequest, out: str | Path) -> controlnet.TrainRequest:
    req.check()
    req = _unpacked(req, out)
    load_examples(req.data)
    return req


def train_controlnet(base: BaseModel, req: controlnet.TrainRequest, cfg: TrainConfig, out: str | Path,
                     on_event=None, cancel: CancelToken | None = None, resume: bool = False,
                     runner: Runner = run_here) -> TrainReport:
    """Compute the maps, train a ControlNet, and write its diffusers folder and single file."""
    out, cancel = Path(out), cancel or CancelToken()
    say = _Reporter(on_event, cfg.steps)

    @contextlib.contextmanager
    def open_(emit):
        t0 = time.time()
        with base.in_training():  # the frozen UNet's checkpointing flag is the run's while it lasts
            learner = controlnet.make_learner(base, req, out, info={"steps": cfg.steps, "lr": cfg.lr,
                                                                    "batch_size": cfg.batch_size})
            _info(emit, controlnet.WHAT_LEARNS)
            _info(emit, f"training {learner.trained_parameter_count():,} parameters on {len(learner.data)} images "
                        f"({req.extractor} maps; latents, embeddings and maps cached in {time.time() - t0:.1f}s)")
            yield learner

    def report(learner, paths) -> dict:
        return {"trained_parameters": learner.trained_parameter_count(), "images": len(learner.data)}

    paths, measured = runner(Session(out, open_, _loop(cfg, out), report), say.relay, cancel, resume)
    for p in paths:
        say(f"wrote {p} (loads in: {controlnet.loads_in_line(p)})", cfg.steps)
    losses = json.loads((out / "losses.json").read_text())
    figures = {"base": base.name, "extractor": req.extractor, "steps": cfg.steps, "batch_size": cfg.batch_size,
               "lr": cfg.lr, **measured, "train_seconds": training.training_seconds(out),
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


def bridge_examples(base_name: str) -> list[str]:
    """Prompts to try with the base's embedded bridges (their ``examples``: other languages, words the base never
    learnt), the default bridge's first."""
    return [e for a in embedded_artifacts() if a.kind == "bridge" and a.info.get("base") == base_name
            for e in a.info.get("examples", [])]


def check_bridge_request(req: bridge.TrainRequest, out: str | Path) -> bridge.TrainRequest:
    req.check()
    if req.data == "shapes":
        return req
    req = _unpacked(req, out)
    bridge.read_captions(req.data)
    return req


def train_bridge(base: BaseModel, req: bridge.TrainRequest, cfg: TrainConfig, out: str | Path, on_event=None,
                 cancel: CancelToken | None = None, resume: bool = False, scenes: int = SHAPES_SCENES,
                 runner: Runner = run_here) -> TrainReport:
    """Train a bridge (swap: distillation, then optionally the diffusion loss; fuse: the diffusion loss)."""
    out, cancel = Path(out), cancel or CancelToken()
    say = _Reporter(on_event, cfg.steps)

    @contextlib.contextmanager
    def open_(emit):
        _info(emit, bridge.WHAT_LEARNS)
        with base.in_training():  # fuse installs its attention processors on the shared UNet while it trains
            stages = bridge.make_learners(base, req, out, bridge_data(base, req, scenes),
                                          info={"mode": req.mode, "steps": cfg.steps, "lr": cfg.lr,
                                                "batch_size": cfg.batch_size})
            try:
                yield stages
            finally:
                bridge.close(stages)

    def train(stages, on_event, cancel, resume) -> list[Path]:
        return bridge.train_stages(base, req, cfg, out, stages, on_event, cancel, resume)

    def report(stages, paths) -> dict:
        lb = stages[-1][1].lb
        return {"train_seconds": bridge.record_training_time(out, stages, paths[0]) if paths else None,
                "encoder": lb.spec.encoder, "trained_parameters": sum(p.numel() for p in lb.bridge.parameters()),
                "layer_weights": lb.bridge.layer_weights(),
                **({"gates": [round(float(g), 4) for g in lb.bridge.gates]} if req.mode == "fuse" else {})}

    paths, measured = runner(Session(out, open_, train, report), say.relay, cancel, resume)
    for p in paths:
        say(f"wrote {p} ({p.stat().st_size / 1e6:.2f} MB); use it in jobs as "
            f"\"bridge\": {{\"path\": \"{p}\", \"scale\": 1.0}}", cfg.steps)
    figures = {"mode": req.mode, "base": base.name, "steps": cfg.steps, "diffusion_steps": req.diffusion_steps,
               "batch_size": cfg.batch_size, "lr": cfg.lr, "lora_rank": req.lora_rank, **measured,
               "files": [str(p) for p in paths]}
    return _finish(out, paths, figures, say, cancel)


# --- what the ControlNet tab previews -----------------------------------------------------------------------------

def condition_map(kind: str, image, width: int, height: int, resize_mode: str = "just resize", **params):
    """A condition map (``ConditionResult``: image, what ran, a note) for a ControlNet unit's preview."""
    return controlnet.make_condition(kind, image, width, height, resize_mode, **params)
