"""Hugging Face ZeroGPU: ``spaces.GPU`` when the ``spaces`` package is there, a no-op everywhere else.

ZeroGPU lends a GPU only inside a decorated call, for at most its ``duration``. Generation fits in one call;
training does not, so :func:`train_in_chunks` runs the shared loop in chunks that stop themselves before the limit
(the loop saves a checkpoint when it stops) and resumes each from the last one's checkpoint.
"""
from __future__ import annotations

import functools
import os
import time

from .training import CancelToken, ProgressEvent, TrainConfig, latest_checkpoint, train

CHUNK_SECONDS = int(os.environ.get("HYPERREAL_ZEROGPU_CHUNK", "45"))  # ZeroGPU's default duration is 60 s


def spaces_module():
    """The ``spaces`` package when present (it is on Spaces; it is not a dependency here)."""
    try:  # optional: only Hugging Face Spaces has it
        import spaces
    except ImportError:
        return None
    return spaces if hasattr(spaces, "GPU") else None


def on_gpu(duration: int = 60):
    """Decorate a function that needs the GPU: ``spaces.GPU(duration=...)`` on Spaces, unchanged elsewhere."""
    spaces = spaces_module()

    def wrap(fn):
        if spaces is None:
            return fn
        return functools.wraps(fn)(spaces.GPU(duration=duration)(fn))

    return wrap


class _Deadline(CancelToken):
    """Stops a chunk at its deadline, or at once when the person pressed Stop."""

    def __init__(self, user: CancelToken, seconds: float):
        super().__init__()
        self.user, self.until = user, time.monotonic() + seconds

    @property
    def cancelled(self) -> bool:
        return self.user.cancelled or time.monotonic() > self.until


def train_in_chunks(learner, cfg: TrainConfig, out, on_event=None, cancel: CancelToken | None = None,
                    resume: bool = False, chunk_seconds: float | None = None) -> list:
    """``training.train`` on ZeroGPU (chunks resuming from checkpoints); a plain call when not on Spaces."""
    spaces = spaces_module()
    cancel = cancel or CancelToken()
    emit = on_event or (lambda e: None)
    if spaces is None:
        return train(learner, cfg, out, on_event=emit, cancel=cancel, resume=resume)
    seconds = chunk_seconds or CHUNK_SECONDS

    started = []

    def relay(e: ProgressEvent) -> None:
        if e.kind == "cancelled" and not cancel.cancelled:  # a chunk boundary, not the person's Stop
            emit(ProgressEvent("checkpoint", e.step, e.total, message=f"GPU chunk ended at step {e.step}; resuming"))
        elif e.kind != "start" or not started:  # one "start" for the whole run
            started.extend([True] if e.kind == "start" else [])
            emit(e)

    @spaces.GPU(duration=int(seconds) + 15)
    def chunk(resume: bool) -> list:
        return train(learner, cfg, out, on_event=relay, cancel=_Deadline(cancel, seconds), resume=resume)

    paths, first = [], True
    while True:
        paths = chunk(resume=resume or not first)
        first = False
        ck = latest_checkpoint(out)
        done = ck is not None and int(ck.name.split("-")[1]) >= cfg.steps
        if done or cancel.cancelled:
            return paths
