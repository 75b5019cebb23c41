"""The one training loop every method uses: accelerate, checkpoints + resume, cancellation, progress events.

A method hands the loop a :class:`Trainable` (what learns, how to compute a loss, how to save); the loop owns
the optimizer, the schedule, mixed precision, gradient accumulation, checkpoints, validation images and the
events a CLI or the app shows.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file

from ..errors import HyperrealError
from . import memory


LR_SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(cfg: "TrainConfig", step: int) -> float:
    """The learning rate's multiplier at ``step``: linear warm-up from 1/warmup, then the schedule.

    diffusers' get_scheduler has these shapes, but its warm-up starts at 0 (a wasted first step) and this one
    starts at 1/warmup, as checkpoints written before the schedules existed resume with.
    """
    if cfg.warmup and step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return 1.0
    done = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * done)) if cfg.lr_schedule == "cosine" else 1.0 - done


@dataclass
class TrainConfig:
    steps: int = 500
    batch_size: int = 4
    lr: float = 1e-4
    grad_accum: int = 1
    mixed_precision: str = "auto"  # auto (the frozen base's half dtype, or none on fp32) | no | fp16 | bf16
    warmup: int = 0
    lr_schedule: str = "constant"  # after the warm-up: constant | cosine | linear (both reach 0 after the last step)
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    use_8bit_adam: bool = False
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory, slower)
    checkpoint_every: int = 0  # 0: only at the end (and on cancel)
    validate_every: int = 0
    log_every: int = 10
    seed: int = 0

    def check(self) -> None:
        names = {"steps": "the number of steps", "batch_size": "the batch size", "grad_accum": "gradient accumulation"}
        for k, what in names.items():
            if getattr(self, k) < 1:
                raise HyperrealError(f"{what} (--{k.replace('_', '-')}) must be at least 1, got {getattr(self, k)}")
        if not 0 < self.lr < 1:
            raise HyperrealError(f"the learning rate (--lr) must be above 0 and below 1 (e.g. 1e-4), got {self.lr:g}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise HyperrealError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise HyperrealError(f"--mixed-precision must be auto, no, fp16 or bf16, got {self.mixed_precision!r}")


@dataclass
class ProgressEvent:
    kind: str  # start | step | validation | checkpoint | done | cancelled | info
    step: int
    total: int
    loss: float | None = None
    eta_s: float | None = None
    images: list = field(default_factory=list)  # PIL images (validation)
    captions: list[str] = field(default_factory=list)
    path: str | None = None
    message: str = ""


class CancelToken:
    """Set from another thread (the app's Stop button); the loop stops at the next step and keeps a checkpoint.
    ``when_cancelled(fn)`` runs ``fn`` on cancel too (ZeroGPU tells its GPU process through a file)."""

    def __init__(self):
        self._event = threading.Event()
        self._callbacks: list[Callable[[], None]] = []

    def cancel(self) -> None:
        self._event.set()
        for fn in self._callbacks:
            fn()

    def when_cancelled(self, fn: Callable[[], None]) -> None:
        self._callbacks.append(fn)
        if self.cancelled:
            fn()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


class Trainable(Protocol):
    def trainable_parameters(self) -> list: ...  # what the optimizer sees (param groups allowed)
    def batches(self, batch_size: int, seed: int) -> Iterator: ...  # endless
    def loss(self, batch) -> torch.Tensor: ...
    def validate(self) -> tuple[list, list[str]]: ...  # fixed-seed images + captions
    def state(self) -> dict[str, torch.Tensor]: ...  # what a checkpoint must keep of the learner
    def load_state(self, state: dict[str, torch.Tensor]) -> None: ...
    def save(self, out: Path) -> list[Path]: ...  # the final artifacts
    # optional: ``base_dtype`` (the frozen parts' dtype, for mixed precision ``auto``), ``device``,
    # ``checkpointing_modules()`` (diffusers models whose activations gradient checkpointing recomputes),
    # ``after_step(step)``, ``method`` (its VRAM presets)


class BesideTheBase:
    """What a method's learner tells the loop about the frozen base it trains beside: mixed precision follows the
    base's dtype; its device decides 8-bit Adam and the out-of-memory message."""

    pipe: object

    @property
    def base_dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device


def _optimizer(params, cfg: TrainConfig, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer, and its name as the start event reports it (8-bit Adam falls back to AdamW, loudly)."""
    if cfg.use_8bit_adam:
        if device.type != "cuda":
            why = "it runs on CUDA GPUs only"
        else:
            try:  # optional (GPU only): imported when asked for
                import bitsandbytes as bnb

                return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay), "AdamW 8-bit"
            except ImportError:
                why = "bitsandbytes is not installed (pip install bitsandbytes)"
        return (torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
                f"AdamW (8-bit Adam was asked for, but {why})")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay), "AdamW"


def accelerator(precision: str, device: torch.device) -> Accelerator:
    """An Accelerator for this run's precision and device.

    accelerate keeps one state per process and refuses a second Accelerator with another precision; a long-running
    app trains many runs (a bf16 adapter, then an fp32 one, ...), so the state is reset between runs whose settings
    differ, as accelerate's own test utilities do between tests.
    """
    state = AcceleratorState._shared_state
    if state and (state.get("_mixed_precision") != precision or state.get("device", device).type != device.type):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return Accelerator(mixed_precision=precision, cpu=device.type == "cpu")


def resolve_precision(cfg: TrainConfig, dtype: torch.dtype, device: torch.device) -> str:
    precision = memory.precision_for(dtype) if cfg.mixed_precision == "auto" else cfg.mixed_precision
    if precision == "fp16" and device.type != "cuda":
        raise HyperrealError("--mixed-precision fp16 needs a CUDA GPU; on the CPU use bf16 or no")
    return precision


@contextlib.contextmanager
def gradient_checkpointing(modules: list, on: bool):
    """Checkpointing switched on for the run (a flag only, no weight changes), each model's flag put back after."""
    was = [(m, bool(getattr(m, "is_gradient_checkpointing", False))) for m in modules] if on else []
    for m, _ in was:
        m.enable_gradient_checkpointing()
    try:
        yield
    finally:
        for m, before in was:
            if not before:
                m.disable_gradient_checkpointing()


def _save_checkpoint(folder: Path, step: int, learner: Trainable, opt, sched, losses: list[float],
                     seconds: float) -> Path:
    tmp = folder.with_name(folder.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in learner.state().items()}, tmp / "learner.safetensors")
    # optimizer state holds only tensors and numbers; torch.save/load with weights_only=True stays pickle-free
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp / "optimizer.pt")
    (tmp / "progress.json").write_text(json.dumps({"step": step, "losses": losses, "seconds": round(seconds, 3)}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # a checkpoint is either whole or absent
    return folder


def training_seconds(out: str | Path) -> float | None:
    """How long the loop has run for this output folder, over every resume and chunk (from its last checkpoint)."""
    ck = latest_checkpoint(Path(out))
    return json.loads((ck / "progress.json").read_text()).get("seconds") if ck is not None else None


CHECKPOINT = re.compile(r"step-(\d+)")


def latest_checkpoint(out: Path) -> Path | None:
    """The newest whole checkpoint (``step-N`` holding progress.json, its last file); a ``step-N.part`` left by a
    kill in the middle of a save is not one."""
    cks = [(int(m.group(1)), p) for p in (Path(out) / "checkpoints").glob("step-*")
           if (m := CHECKPOINT.fullmatch(p.name)) and (p / "progress.json").is_file()]
    return max(cks)[1] if cks else None


def _clean_leftovers(out: Path) -> None:
    """Half-written checkpoints of a killed run: removed before this run writes its own."""
    for p in (out / "checkpoints").glob("step-*"):
        if not CHECKPOINT.fullmatch(p.name) or not (p / "progress.json").is_file():
            shutil.rmtree(p, ignore_errors=True)


def train(learner: Trainable, cfg: TrainConfig, out: str | Path, on_event: Callable[[ProgressEvent], None] | None = None,
          cancel: CancelToken | None = None, resume: bool = False) -> list[Path]:
    """Run the loop; returns the saved artifacts (also after a cancel, from the last state)."""
    cfg.check()
    modules = learner.checkpointing_modules() if hasattr(learner, "checkpointing_modules") else []
    with gradient_checkpointing(modules, cfg.gradient_checkpointing):
        try:
            return _train(learner, cfg, Path(out), on_event or (lambda e: None), cancel or CancelToken(), resume)
        except torch.OutOfMemoryError:
            raise memory.out_of_memory(getattr(learner, "method", None), cfg.batch_size,
                                       cfg.gradient_checkpointing, getattr(learner, "device", None)) from None


def _train(learner: Trainable, cfg: TrainConfig, out: Path, emit, cancel: CancelToken, resume: bool) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(out)
    set_seed(cfg.seed)
    params = learner.trainable_parameters()
    flat = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    if not flat:
        raise HyperrealError("nothing to train: the method exposed no trainable parameters")
    device = flat[0].device
    precision = resolve_precision(cfg, getattr(learner, "base_dtype", torch.float32), device)
    acc = accelerator(precision, device)
    # the optimizer is built only now, after the method has created its new modules (a PEFT pitfall)
    opt, optimizer_name = _optimizer(params, cfg, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
    opt, sched = acc.prepare(opt, sched)
    start, losses, before = 0, [], 0.0
    if resume and (ck := latest_checkpoint(out)) is not None:
        learner.load_state(load_file(ck / "learner.safetensors"))
        st = torch.load(ck / "optimizer.pt", weights_only=True)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        prog = json.loads((ck / "progress.json").read_text())
        start, losses, before = prog["step"], prog["losses"], prog.get("seconds", 0.0)
        if start >= cfg.steps:  # already finished (a resumed chunk after the last): the files, quietly
            return learner.save(out)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    how = "full precision" if precision == "no" else f"{precision} mixed precision (trainable weights in fp32)"
    emit(ProgressEvent("start", start, cfg.steps, message=(
        f"training {sum(p.numel() for p in flat):,} parameters with {optimizer_name}, {how}, batch "
        f"{cfg.batch_size}, gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}"
        + (f"; resumed from step {start}" if start else ""))))
    # the same stream as an uninterrupted run, fast-forwarded past what the checkpoint has seen: a resumed run (after
    # a kill, or a ZeroGPU chunk) then trains on exactly the batches, noise and timesteps it would have
    data = learner.batches(cfg.batch_size, cfg.seed)
    for _ in range(start * cfg.grad_accum):
        next(data)
    t0, step = time.time(), start

    def checkpoint(kind: str) -> None:
        path = _save_checkpoint(out / "checkpoints" / f"step-{step}", step, learner, opt, sched, losses,
                                before + time.time() - t0)
        for old in (out / "checkpoints").glob("step-*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
        emit(ProgressEvent(kind, step, cfg.steps, path=str(path), message=f"checkpoint at step {step}"))

    while step < cfg.steps and not cancel.cancelled:
        for _ in range(cfg.grad_accum):
            with acc.autocast():
                loss = learner.loss(next(data))
            if not torch.isfinite(loss):
                # nothing was applied from this batch: the weights are the last good ones
                checkpoint("checkpoint")
                raise HyperrealError(
                    f"the loss became {loss.item()} at step {step} ({precision} precision); the last good weights are "
                    f"in {out / 'checkpoints' / f'step-{step}'}. Fix: lower --lr"
                    + (", or use --mixed-precision bf16 (or no)" if precision == "fp16" else "")
                    + ", then continue with --resume")
            acc.backward(loss / cfg.grad_accum)
        if cfg.max_grad_norm:
            acc.clip_grad_norm_(flat, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        losses.append(float(loss.detach()))
        if hasattr(learner, "after_step"):
            learner.after_step(step)
        if step % cfg.log_every == 0 or step == cfg.steps:
            rate = (time.time() - t0) / (step - start)
            emit(ProgressEvent("step", step, cfg.steps, loss=sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:]),
                               eta_s=rate * (cfg.steps - step)))
        if cfg.validate_every and step % cfg.validate_every == 0 and step < cfg.steps:
            with acc.autocast():
                imgs, caps = learner.validate()
            emit(ProgressEvent("validation", step, cfg.steps, images=imgs, captions=caps))
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            checkpoint("checkpoint")
    checkpoint("checkpoint")
    paths = learner.save(out)
    (out / "losses.json").write_text(json.dumps(losses))
    if cancel.cancelled and step < cfg.steps:
        emit(ProgressEvent("cancelled", step, cfg.steps, message=f"stopped at step {step}; saved what was learnt",
                           path=str(paths[0]) if paths else None))
    else:
        with acc.autocast():
            imgs, caps = learner.validate() if cfg.validate_every else ([], [])
        emit(ProgressEvent("done", step, cfg.steps, images=imgs, captions=caps,
                           loss=losses[-1] if losses else None, path=str(paths[0]) if paths else None,
                           message=f"finished {step} steps in {time.time() - t0:.0f}s"))
    return paths

