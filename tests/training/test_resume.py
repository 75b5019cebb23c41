"""Resume after ``kill -9``: a run killed anywhere (mid-step, in the middle of a checkpoint save, right after one)
and continued with ``--resume`` ends with exactly the weights of the run that was never interrupted, bit for bit on
the CPU; half-written ``step-N.part`` checkpoints are ignored and cleaned up. The same at the Python level for a run
stopped and continued in chunks (ZeroGPU's way), with gradient accumulation and warm-up."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.star import star_dataset
from tests.conftest import ROOT

STEPS, EVERY, SEED = 12, 2, 5
TIMEOUT = 240  # seconds for any one CLI run: a hang fails the test instead of stalling the suite
# the kill points, drawn once from a fixed seed: the same every run, but nowhere in particular
_rng = random.Random(35)
KILL_AFTER_STEP = _rng.randint(1, STEPS - 1)  # as soon as the console says "step k/12"
KILL_IN_SAVE = _rng.randrange(EVERY, STEPS, EVERY)  # while checkpoint step-N is being written (step-N.part exists)
KILL_RESUMED_AT = _rng.randrange(KILL_IN_SAVE + EVERY, STEPS + 1, EVERY)  # that run's resume, once step-N is whole
CHUNK_STEPS = 8
CHUNK_STOPS = sorted(_rng.sample(range(1, CHUNK_STEPS), 2))  # the in-process run stops (and resumes) after these

# One thread per run: on a small shared CPU torch's thread pool spins against other processes and runs ~10x slower.
# Every run here uses the same setting, so the arithmetic (and the bit-for-bit comparison) is unaffected.
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
CHECKPOINT = re.compile(r"step-(\d+)")
POSIX_ONLY = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL/SIGSTOP")
_started: list[subprocess.Popen] = []


class Cli:
    """``python -m hyperreal train adapter`` on the tiny base, started in the background (the same command every
    time, plus ``extra``); its output is collected as it comes."""

    def __init__(self, data: Path, out: Path, *extra: str, steps: int = STEPS):
        self.out = Path(out)
        cmd = [sys.executable, "-m", "hyperreal", "train", "adapter", "--base", "tiny", "--data", str(data),
               "--out", str(out), "--steps", str(steps), "--batch-size", "1", "--lr", "2e-3", "--grad-accum", "2",
               "--warmup", "3", "--checkpoint-every", str(EVERY), "--seed", str(SEED), "--rank", "2", "--flip",
               "--caption-dropout", "0.3", "--drift-samples", "1", "--log-every", "1",
               # constant, not the recipe's decay: the 4-step run's last step must be the reference's step 4
               "--lr-schedule", "constant", *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        _started.append(self.proc)
        self.lines: list[str] = []
        self.deadline = time.monotonic() + TIMEOUT
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def tail(self) -> str:
        return self.output[-4000:]

    def wait_for(self, what: str, condition):
        """Poll ``condition()`` fast until it gives something true, which is returned; fails if the run ends first
        or takes too long."""
        while True:
            found = condition()
            if found:
                return found
            if self.proc.poll() is not None:
                if found := condition():
                    return found
                raise AssertionError(f"the run ended (exit {self.proc.returncode}) before {what}:\n{self.tail}")
            if time.monotonic() > self.deadline:
                self.proc.kill()
                raise AssertionError(f"no {what} within {TIMEOUT}s:\n{self.tail}")
            time.sleep(0.0005)

    def signal(self, sig) -> None:
        if self.proc.poll() is None:  # not reaped yet, so the pid is still this process
            os.kill(self.proc.pid, sig)

    def kill(self) -> "Cli":
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        self._reader.join(60)
        return self

    def finish(self) -> "Cli":
        try:
            self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the run did not finish within {TIMEOUT}s:\n{self.tail}") from None
        self._reader.join(60)
        assert self.proc.returncode == 0, self.tail
        return self


def whole_checkpoints(out: Path) -> list[int]:
    """Steps of the complete checkpoints (``step-N`` holding progress.json, written last), oldest first."""
    return sorted(int(m.group(1)) for p in (out / "checkpoints").glob("step-*")
                  if (m := CHECKPOINT.fullmatch(p.name)) and (p / "progress.json").is_file())


def parts(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("*.part"))


def _stopped(pid: int) -> bool:
    if not Path("/proc").is_dir():
        time.sleep(0.1)
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


def kill_in_save(run: Cli, first: int) -> str:
    """SIGKILL in the middle of writing checkpoint step-N, N >= ``first``: freeze the run (SIGSTOP) as soon as its
    ``step-N.part`` appears and kill it if that folder is still there, so the kill surely lands inside the save;
    a save that finished before the freeze is let go (SIGCONT) and the next one is waited for."""
    ck, passed = run.out / "checkpoints", set()

    def new_part():
        return next((p for p in sorted(ck.glob("step-*.part"))
                     if p.name not in passed and int(p.name[len("step-"):-len(".part")]) >= first), None)

    while True:
        part = run.wait_for(f"a checkpoint save at step {first} or later", new_part)
        run.signal(signal.SIGSTOP)
        t = time.monotonic()
        while run.proc.poll() is None and not _stopped(run.proc.pid):
            assert time.monotonic() - t < 10, "SIGSTOP did not stop the run"
            time.sleep(0.0005)
        if part.is_dir():
            run.kill()
            return part.name
        passed.add(part.name)
        run.signal(signal.SIGCONT)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter.safetensors"))


def losses(out: Path) -> list[float]:
    """Every step's loss, from the final checkpoint (a resumed run carries the earlier ones over)."""
    return json.loads((out / "checkpoints" / f"step-{STEPS}" / "progress.json").read_text())["losses"]


def assert_same_as_reference(out: Path, reference: Path) -> None:
    got, want = adapter(out), adapter(reference)
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{out.name}: {len(differ)} of {len(want)} tensors differ from the reference: {differ[:3]}"
    assert losses(out) == losses(reference)  # the very same batches, noise and timesteps, step by step
    assert parts(out) == [] and whole_checkpoints(out) == [STEPS]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return star_dataset(tmp_path_factory.mktemp("stars"), n=2)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Started at once in the background, waited for when needed: the uninterrupted reference run, and a 4-step
    run whose checkpoint the leftover test continues from."""
    folder = tmp_path_factory.mktemp("runs")
    started = {"reference": Cli(data, folder / "reference"), "four": Cli(data, folder / "four", steps=4)}
    finished = {}

    def get(name: str) -> Path:
        if name not in finished:
            finished[name] = started[name].finish().out
        return finished[name]

    yield get
    for proc in _started:  # whatever a failed test left running
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


@POSIX_ONLY
@pytest.mark.timeout(600)
def test_kill_9_then_resume_is_bit_identical(data, runs, tmp_path):
    def after_step() -> Path:
        out = tmp_path / f"killed-after-step-{KILL_AFTER_STEP}"
        run = Cli(data, out)
        said = f"step {KILL_AFTER_STEP}/"
        run.wait_for(f"'{said}'", lambda: any(ln.startswith(said) for ln in run.lines))
        run.kill()
        kept = whole_checkpoints(out)
        resumed = Cli(data, out, "--resume").finish()
        if kept:
            assert f"resumed from step {kept[-1]}" in resumed.output
        return out

    def in_save_then_after_a_checkpoint() -> Path:
        out = tmp_path / f"killed-in-save-{KILL_IN_SAVE}"
        part = kill_in_save(Cli(data, out), KILL_IN_SAVE)
        assert parts(out) == [part]  # the kill left a half-written checkpoint behind
        kept = whole_checkpoints(out) or [0]
        assert kept[-1] < int(part[len("step-"):-len(".part")])
        resumed = Cli(data, out, "--resume")
        at = max(KILL_RESUMED_AT, kept[-1] + EVERY)
        resumed.wait_for(f"checkpoint step-{at}", lambda: (out / "checkpoints" / f"step-{at}").is_dir())
        resumed.kill()
        if kept[-1]:
            assert f"resumed from step {kept[-1]}" in resumed.output
        assert part not in parts(out)  # the resumed run cleared the leftover before writing its own
        kept = whole_checkpoints(out)
        assert kept[-1] >= at
        last = Cli(data, out, "--resume").finish()
        if kept[-1] < STEPS:  # (a run resumed at the end only writes its files)
            assert f"resumed from step {kept[-1]}" in last.output
        return out

    with ThreadPoolExecutor(2) as pool:
        chains = [pool.submit(after_step), pool.submit(in_save_then_after_a_checkpoint)]
        outs = [c.result() for c in chains]
    reference = runs("reference")
    for out in outs:
        assert_same_as_reference(out, reference)


@POSIX_ONLY
@pytest.mark.timeout(600)
def test_leftover_part_folder_is_ignored(data, runs, tmp_path):
    out = tmp_path / "leftover"
    (out / "checkpoints").mkdir(parents=True)
    real = shutil.copytree(runs("four") / "checkpoints" / "step-4", out / "checkpoints" / "step-4")
    # a save killed after progress.json but before the rename (the old code crashed on int("6.part")), and one
    # killed just after it began
    part = out / "checkpoints" / "step-6.part"
    part.mkdir()
    (part / "learner.safetensors").write_bytes((real / "learner.safetensors").read_bytes()[:100])
    (part / "progress.json").write_text(json.dumps({"step": 6, "losses": [0.0] * 6, "seconds": 1.0}))
    (out / "checkpoints" / "step-8.part").mkdir()
    r = Cli(data, out, "--resume").finish()
    assert "resumed from step 4" in r.output
    assert_same_as_reference(out, runs("reference"))


@pytest.mark.timeout(300)
def test_chunked_training_in_process_equals_one_run(data, tmp_path):
    """Stopped by a cancel at arbitrary steps (no checkpoint schedule) and continued with a rebuilt learner on the
    same base, in one process, as ZeroGPU's chunks do: the same weights and losses as one run."""
    from hyperreal.loading import load_base
    from hyperreal.methods import adapters
    from hyperreal.training import CancelToken, TrainConfig, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see ENV
    try:
        base = load_base("tiny")
        req = adapters.TrainRequest(data=str(data), rank=2, flip=True, caption_dropout=0.3, seed=SEED)
        cfg = TrainConfig(steps=CHUNK_STEPS, batch_size=1, lr=2e-3, grad_accum=2, warmup=3, log_every=1, seed=SEED)

        def run(out: Path, stop_at: int | None = None, resume: bool = False) -> dict[str, torch.Tensor]:
            learner = adapters.make_learner(base, req, out)
            cancel = CancelToken()

            def on_event(e) -> None:
                if e.kind == "step" and e.step == stop_at:
                    cancel.cancel()

            try:
                train(learner, cfg, out, on_event, cancel, resume)
                return {k: v.detach().clone() for k, v in learner.state().items()}
            finally:
                adapters.remove_adapter(base.pipe, learner.name)

        whole = run(tmp_path / "whole")
        chunks = tmp_path / "chunks"
        for i, stop in enumerate(CHUNK_STOPS):
            assert whole_checkpoints(chunks) == ([CHUNK_STOPS[i - 1]] if i else [])
            run(chunks, stop_at=stop, resume=i > 0)
        assert whole_checkpoints(chunks) == [CHUNK_STOPS[-1]]
        chunked = run(chunks, resume=True)
    finally:
        torch.set_num_threads(threads)
    assert chunked.keys() == whole.keys()
    assert all(torch.equal(chunked[k], whole[k]) for k in whole)
    read = lambda out: json.loads((out / "losses.json").read_text())
    assert len(read(chunks)) == CHUNK_STEPS and read(chunks) == read(tmp_path / "whole")
