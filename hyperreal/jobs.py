"""Training jobs for the app: one at a time, in a worker thread, streaming ProgressEvents to whoever watches.

The UI never calls a method's training code directly: it starts a :class:`TrainingJob` with a callable
``run(on_event, cancel) -> artifacts`` and reads its events. Stop sets the job's CancelToken; the shared loop
then saves a checkpoint and the artifacts it has, and sends a ``cancelled`` event.
"""
from __future__ import annotations

import queue
import threading
import traceback
from typing import Callable, Iterator

from .errors import HyperrealError
from .training import CancelToken, ProgressEvent

_ONE_AT_A_TIME = threading.Lock()  # one training job on the device, whoever started it


class TrainingJob:
    def __init__(self, run: Callable[[Callable[[ProgressEvent], None], CancelToken], list]):
        if not _ONE_AT_A_TIME.acquire(blocking=False):
            raise HyperrealError("Another training job is running; wait for it to finish (or stop it) first.")
        self.cancel_token = CancelToken()
        self.artifacts: list = []
        self.error: str | None = None
        self._events: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, args=(run,), daemon=True, name="hyperreal-training")
        self._thread.start()

    def _work(self, run) -> None:
        try:
            self.artifacts = run(self._events.put, self.cancel_token) or []
        except HyperrealError as e:
            self.error = str(e)
        except Exception as e:  # a bug: keep the trace in the server log, show one line in the page
            traceback.print_exc()
            self.error = f"training failed: {type(e).__name__}: {e}"
        finally:
            _ONE_AT_A_TIME.release()
            self._events.put(None)

    def cancel(self) -> None:
        self.cancel_token.cancel()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def events(self, timeout: float | None = None) -> Iterator[ProgressEvent]:
        """Every event until the job ends; then raises HyperrealError if it failed."""
        while True:
            ev = self._events.get(timeout=timeout)
            if ev is None:
                break
            yield ev
        self._thread.join()
        if self.error:
            raise HyperrealError(self.error)
