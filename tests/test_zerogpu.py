"""Training on ZeroGPU, with a stand-in for ``spaces.GPU`` that does what ZeroGPU does: each call runs in a forked
process, only its (pickled) return value comes back, and an exception comes back as its type name alone."""
import functools
import multiprocessing
import sys
import threading
import time
import types

import pytest
import torch

from bench.star import star_dataset
from hyperreal import services, zerogpu
from hyperreal.errors import HyperrealError
from hyperreal.loading import load_base
from hyperreal.methods import adapters
from hyperreal.training import CancelToken, TrainConfig, latest_checkpoint
from hyperreal.training.session import run_here


@pytest.fixture()
def forking_spaces(monkeypatch):
    ctx = multiprocessing.get_context("fork")
    calls = []

    def GPU(duration=60):
        def deco(fn):
            def run(*args, **kwargs):
                calls.append(duration)
                receive, send = ctx.Pipe(duplex=False)

                def child():
                    torch.set_num_threads(1)  # a forked child must not reuse the parent's thread pool
                    try:
                        send.send(("value", fn(*args, **kwargs)))
                    except BaseException as e:  # what ZeroGPU returns for an exception: its type name
                        send.send(("error", type(e).__name__))

                p = ctx.Process(target=child)
                p.start()
                kind, value = receive.recv()
                p.join()
                if kind == "error":
                    raise RuntimeError(value)
                return value
            return run
        return deco

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=GPU))
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    return calls


@pytest.fixture(scope="module")
def stars(tmp_path_factory):
    return star_dataset(tmp_path_factory.mktemp("stars"), n=2)


def request(stars, **over):
    return adapters.TrainRequest(**{"data": str(stars), "trigger": "sks", "class_images": 2, "name": "z", **over})


class CountingDeadline(zerogpu.Deadline):
    """A chunk's deadline by the number of times the loop asks, not the clock: a fast machine once finished all 40
    steps inside one 4-second chunk, and the test saw no chunk boundary."""

    def __init__(self, stop_file, seconds):
        super().__init__(stop_file, seconds)
        self.asked = 0

    @property
    def cancelled(self) -> bool:
        if self.stop_file.exists():
            return True
        self.asked += 1
        self.hit = self.hit or self.asked > 15
        return self.hit


def test_chunks_stream_progress_and_drift_is_measured_on_the_trained_adapter(forking_spaces, stars, tmp_path,
                                                                              monkeypatch):
    assert zerogpu.active() and zerogpu.runner() is zerogpu.run_in_chunks
    monkeypatch.setattr(zerogpu, "Deadline", CountingDeadline)  # forked chunks inherit it
    base = load_base("tiny")
    events = []
    runner = functools.partial(zerogpu.run_in_chunks, chunk_seconds=4)
    report = services.train_adapter(base, request(stars), TrainConfig(steps=40, batch_size=2, lr=1e-3, log_every=5),
                                    tmp_path, on_event=events.append, drift_samples=2, runner=runner)
    assert len(forking_spaces) >= 2  # several GPU calls, each resuming the last one's checkpoint
    kinds = [e.kind for e in events]
    assert kinds.count("start") == 1 and kinds[-1] == "info" and "done" in kinds and "cancelled" not in kinds
    assert any("GPU chunk ended" in e.message for e in events)
    assert [e.step for e in events if e.kind == "step"][-1] == 40
    assert latest_checkpoint(tmp_path).name == "step-40" and (tmp_path / "z.safetensors").is_file()
    # measured inside the last GPU call on what was trained (the app's own copy of the learner never trained)
    assert report.figures["drift"] > 0 and report.figures["train_seconds"] > 0
    assert not adapters.loaded(base.pipe)  # the parent's base never had the adapter


def test_stop_reaches_a_running_chunk(forking_spaces, stars, tmp_path):
    base = load_base("tiny")
    cancel, events = CancelToken(), []
    threading.Timer(4.0, cancel.cancel).start()  # pressed while the first GPU call is training
    t0 = time.time()
    runner = functools.partial(zerogpu.run_in_chunks, chunk_seconds=300)
    report = services.train_adapter(base, request(stars), TrainConfig(steps=100_000, batch_size=2, lr=1e-3),
                                    tmp_path, on_event=events.append, cancel=cancel, drift_samples=1, runner=runner)
    assert time.time() - t0 < 120 and len(forking_spaces) == 1
    assert report.cancelled and [e.kind for e in events].count("cancelled") == 1
    assert (tmp_path / "z.safetensors").is_file() and report.figures["drift"] >= 0


def test_an_error_in_the_gpu_call_comes_back_as_its_message(forking_spaces, stars, tmp_path):
    base = load_base("tiny")
    base.defaults["prior_prompts"] = []  # a base that lists no prompts it draws well (a fresh base: nothing shared)
    bad = request(stars, trigger="")  # class images without a trigger or a class prompt
    with pytest.raises(HyperrealError, match="class images need a class prompt"):
        services.train_adapter(base, bad, TrainConfig(steps=2, batch_size=2), tmp_path,
                               runner=functools.partial(zerogpu.run_in_chunks, chunk_seconds=5))


def test_with_spaces_installed_but_zerogpu_off_training_is_one_plain_call(forking_spaces, monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU")
    assert not zerogpu.active() and zerogpu.runner() is run_here
    assert zerogpu.on_gpu(30)(len) is len
