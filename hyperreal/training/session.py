"""One training run as three steps that can also run in another process (a ZeroGPU call):

- ``open(on_event)``: a context manager that builds the learner(s) on the base (data, new modules), says what it
  built as ``info`` events, and takes them off again;
- ``train(learner, on_event, cancel, resume)``: the shared loop, resumable from the run's last checkpoint;
- ``report(learner, trained)``: what is measured on the result (drift, ...), as a plain dict.

:func:`run_here` runs the three in this process; ``zerogpu.run_in_chunks`` runs them in GPU calls, each rebuilding
the learner and resuming, so nothing has to survive in memory between calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

from .loop import CancelToken


@dataclass
class Session:
    out: Path  # the run's folder: checkpoints, files, and ZeroGPU's stop file
    open: Callable[[Callable], ContextManager[object]]
    train: Callable[[object, Callable, CancelToken, bool], object]
    report: Callable[[object, object], dict]


def run_here(session: Session, on_event, cancel: CancelToken, resume: bool = False) -> tuple[object, dict]:
    """(what ``train`` returned, the report), all in this process."""
    with session.open(on_event) as learner:
        trained = session.train(learner, on_event, cancel, resume)
        return trained, session.report(learner, trained)
