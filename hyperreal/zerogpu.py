"""Hugging Face ZeroGPU: ``spaces.GPU`` when ZeroGPU is on, plain calls everywhere else.

ZeroGPU lends a GPU only inside a decorated call, for at most its ``duration``, and runs each call in a forked
process: nothing the call changes in memory (a learner, a queue, a flag) reaches the app's process, only its return
value and the files it writes; an exception comes back as its type name alone. So a training run there is a series of
self-contained GPU calls (:func:`run_in_chunks`): each builds the learner (data, class images, new modules), resumes
from the last checkpoint, trains until its deadline or Stop, writes a checkpoint, and returns its progress events
and any error as plain values; the last one also measures the result (drift) on what was trained. The app streams
the events after each call and checks Stop between calls; Stop reaches a running call through a file.

ZeroGPU is on where the ``spaces`` package says so (``SPACES_ZERO_GPU``, spaces' own switch); elsewhere, with or
without ``spaces`` installed, training is one plain call (``training.session.run_here``).
"""
from __future__ import annotations

import functools
import os
import time
from pathlib import Path

from .errors import HyperrealError
from .training import CancelToken, ProgressEvent
from .training.session import Session, run_here

CHUNK_SECONDS = int(os.environ.get("HYPERREAL_ZEROGPU_CHUNK", "45"))  # ZeroGPU's default duration is 60 s
STOP_FILE = ".stop"


def spaces_module():
    """The ``spaces`` package when present (it is on Spaces; it is not a dependency here)."""
    try:  # optional: only Hugging Face Spaces has it
        import spaces
    except ImportError:
        return None
    return spaces if hasattr(spaces, "GPU") else None


def active() -> bool:
    """Whether this process runs on ZeroGPU: ``spaces`` is importable and ``SPACES_ZERO_GPU`` is on."""
    return spaces_module() is not None and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def on_gpu(duration: int = 60):
    """Decorate a function that needs the GPU: ``spaces.GPU(duration=...)`` on ZeroGPU, unchanged elsewhere."""

    def wrap(fn):
        if not active():
            return fn
        return functools.wraps(fn)(spaces_module().GPU(duration=duration)(fn))

    return wrap


def runner():
    """How the app runs a training session here: in GPU chunks on ZeroGPU, else in one plain call."""
    return run_in_chunks if active() else run_here


class Deadline(CancelToken):
    """Stops a chunk at its deadline, or when the stop file appears (the person pressed Stop)."""

    def __init__(self, stop_file: Path, seconds: float):
        super().__init__()
        self.stop_file, self.until, self.hit = stop_file, time.monotonic() + seconds, False

    @property
    def cancelled(self) -> bool:
        if self.stop_file.exists():
            return True
        if time.monotonic() > self.until:
            self.hit = True  # stopped by the clock: the run goes on in the next chunk
        return self.hit


def run_in_chunks(session: Session, on_event, cancel: CancelToken, resume: bool = False,
                  chunk_seconds: float | None = None) -> tuple[object, dict]:
    """``training.session.run_here`` as a series of ZeroGPU calls; returns (what ``train`` returned, the report)."""
    seconds = chunk_seconds or CHUNK_SECONDS
    stop = Path(session.out) / STOP_FILE
    stop.parent.mkdir(parents=True, exist_ok=True)
    stop.unlink(missing_ok=True)
    cancel.when_cancelled(stop.touch)

    @spaces_module().GPU(duration=int(seconds) + 60)  # the chunk's training, plus building and measuring
    def chunk(resume: bool) -> dict:
        events: list[ProgressEvent] = []
        try:
            deadline = Deadline(stop, seconds)
            with session.open(events.append) as learner:
                trained = session.train(learner, events.append, deadline, resume)
                finished = not deadline.hit
                report = session.report(learner, trained) if finished else None
            return {"events": events, "trained": trained, "report": report, "finished": finished}
        except HyperrealError as e:  # the message itself: an exception would come back as its type name
            return {"events": events, "error": str(e)}
        except Exception as e:  # a bug, but the person still sees what happened, not a bare type name
            return {"events": events, "error": f"training failed: {type(e).__name__}: {e}"}

    seen: set = set()
    first = True
    while True:
        result = chunk(resume or not first)
        first = False
        for e in result["events"]:
            if e.kind in ("start", "info"):  # each chunk rebuilds and restarts: say each line once
                if (e.kind, e.message.split(";")[0]) in seen:
                    continue
                seen.add((e.kind, e.message.split(";")[0]))
            if e.kind == "cancelled" and not cancel.cancelled:  # a chunk boundary, not the person's Stop
                e = ProgressEvent("checkpoint", e.step, e.total, message=f"GPU chunk ended at step {e.step}; resuming")
            on_event(e)
        if "error" in result:
            raise HyperrealError(result["error"])
        if result["finished"] or cancel.cancelled:
            stop.unlink(missing_ok=True)
            return result["trained"], result["report"] or {}
