"""The shared training loop and the app's job runner, on a learner small enough to run in a blink."""
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hyperreal.errors import HyperrealError
from hyperreal.jobs import TrainingJob
from hyperreal.training import CancelToken, DenoisingObjective, TrainConfig, latest_checkpoint, train
from hyperreal.training.loop import lr_factor


class LineFit:
    """Learns y = 3x - 1 with a frozen 'base' beside it that must never change."""

    def __init__(self, pause: threading.Event | None = None):
        torch.manual_seed(0)
        self.frozen = torch.nn.Linear(1, 1).requires_grad_(False)
        self.learn = torch.nn.Linear(1, 1)
        self.pause = pause
        self.steps_seen = 0

    def trainable_parameters(self):
        return list(self.learn.parameters())

    def batches(self, batch_size, seed):
        g = torch.Generator().manual_seed(seed)
        while True:
            x = torch.randn(batch_size, 1, generator=g)
            yield x, 3 * x - 1

    def loss(self, batch):
        if self.pause is not None:
            self.pause.wait(5)
        x, y = batch
        self.steps_seen += 1
        return torch.nn.functional.mse_loss(self.learn(x) + 0 * self.frozen(x), y)

    def validate(self):
        return [], []

    def state(self):
        return dict(self.learn.state_dict())

    def load_state(self, state):
        self.learn.load_state_dict(state)

    def save(self, out: Path):
        p = Path(out) / "line.safetensors"
        save_file({k: v.contiguous() for k, v in self.learn.state_dict().items()}, p)
        return [p]


def test_loop_learns_reports_and_keeps_frozen(tmp_path):
    m = LineFit()
    before = {k: v.clone() for k, v in m.frozen.state_dict().items()}
    events = []
    paths = train(m, TrainConfig(steps=200, batch_size=16, lr=5e-2, log_every=50, checkpoint_every=100), tmp_path,
                  events.append)
    assert [e.kind for e in events] == ["start", "step", "step", "checkpoint", "step", "step", "checkpoint", "done"]
    assert events[-2].step == 200 and events[1].eta_s is not None
    w = load_file(paths[0])
    assert abs(w["weight"].item() - 3) < 0.05 and abs(w["bias"].item() + 1) < 0.05
    assert all(torch.equal(before[k], v) for k, v in m.frozen.state_dict().items())
    assert latest_checkpoint(tmp_path).name == "step-200"
    assert len(list((tmp_path / "checkpoints").iterdir())) == 1  # older checkpoints are pruned


def test_resume_continues_from_the_checkpoint(tmp_path):
    train(LineFit(), TrainConfig(steps=40, batch_size=8, lr=1e-2, checkpoint_every=20), tmp_path)
    again = LineFit()
    events = []
    train(again, TrainConfig(steps=60, batch_size=8, lr=1e-2), tmp_path, events.append, resume=True)
    assert "resumed from step 40" in events[0].message
    assert again.steps_seen == 20


def test_cancel_stops_and_keeps_what_was_learnt(tmp_path):
    cancel = CancelToken()
    events = []

    def on_event(e):
        events.append(e)
        if e.kind == "step" and e.step >= 30:
            cancel.cancel()

    paths = train(LineFit(), TrainConfig(steps=10_000, batch_size=8, lr=1e-2, log_every=10), tmp_path, on_event,
                  cancel)
    assert events[-1].kind == "cancelled" and events[-1].step == 30
    assert paths[0].is_file() and latest_checkpoint(tmp_path).name == "step-30"


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(HyperrealError, match=r"learning rate \(--lr\) must be above 0"):
        train(LineFit(), TrainConfig(steps=5, lr=0), tmp_path)
    with pytest.raises(HyperrealError, match=r"\(--steps\) must be at least 1"):
        train(LineFit(), TrainConfig(steps=0), tmp_path)


class ConstantPull(LineFit):
    """A loss whose gradient is 1 on one weight at every step: Adam then moves it by exactly the step's learning
    rate (no weight decay), so the steps taken show the schedule the optimizer ran."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def trainable_parameters(self):
        return [self.learn.weight]

    def loss(self, batch):
        return -self.learn.weight.sum()

    def after_step(self, step):
        self.seen.append(self.learn.weight.item())


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_the_learning_rate_follows_the_schedule_and_resumes_on_it(tmp_path, schedule):
    cfg = TrainConfig(steps=10, batch_size=1, lr=0.1, warmup=3, weight_decay=0.0, lr_schedule=schedule, log_every=1)
    m = ConstantPull()
    start = m.learn.weight.item()
    train(m, cfg, tmp_path / "whole")
    steps = [b - a for a, b in zip([start] + m.seen, m.seen)]
    expected = [0.1 * lr_factor(cfg, s) for s in range(10)]
    assert steps == pytest.approx(expected, abs=1e-6)
    assert expected[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])  # the warm-up, then the schedule
    if schedule != "constant":
        after = expected[3:]  # from the full rate down towards 0
        assert after[0] == pytest.approx(0.1) and all(a > b for a, b in zip(after, after[1:])) and after[-1] < 0.02
    # stopped at step 6 and resumed: the same steps as the uninterrupted run
    cancel = CancelToken()
    train(ConstantPull(), cfg, tmp_path / "parts", lambda e: e.kind == "step" and e.step == 6 and cancel.cancel(),
          cancel)
    again = ConstantPull()
    train(again, cfg, tmp_path / "parts", resume=True)
    assert again.seen == pytest.approx(m.seen[6:], abs=1e-6)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_denoising_target_matches_the_prediction_type(kind):
    """Every method's loss uses this one objective: the target is what the scheduler's prediction type names."""
    obj = DenoisingObjective({"num_train_timesteps": 1000, "prediction_type": kind})
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    a = obj.scheduler.alphas_cumprod[t].sqrt()[:, None, None, None]
    s = (1 - obj.scheduler.alphas_cumprod[t]).sqrt()[:, None, None, None]
    torch.testing.assert_close(obj.noisy(latents, noise, t), a * latents + s * noise)
    want = {"epsilon": noise, "sample": latents, "v_prediction": a * noise - s * latents}[kind]
    torch.testing.assert_close(obj.target(latents.half(), noise.half(), t), want, atol=2e-3, rtol=2e-3)
    assert obj.target(latents.half(), noise.half(), t).dtype == torch.float32
    assert obj.num_train_timesteps == 1000


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_clip_the_easy_timesteps(kind):
    """Min-SNR-gamma: the loss on a timestep counts as if its signal-to-noise ratio were at most gamma, in the
    parameterisation trained (Hang et al. 2023, as diffusers' --snr_gamma and kohya's min_snr_gamma)."""
    obj = DenoisingObjective({"num_train_timesteps": 1000, "prediction_type": kind})
    t = torch.tensor([0, 100, 500, 999])
    ac = obj.scheduler.alphas_cumprod[t].double()
    snr = ac / (1 - ac)
    clipped = snr.clamp(max=5.0)
    want = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[kind]
    torch.testing.assert_close(obj.min_snr_weights(t, 5.0).double(), want, rtol=1e-4, atol=1e-6)
    if kind == "epsilon":  # noisy timesteps keep their full weight, nearly clean ones lose most of it
        w = obj.min_snr_weights(t, 5.0)
        assert w[-1] == 1.0 and w[0] < 0.01


def test_unknown_prediction_type_is_refused_before_training():
    with pytest.raises(HyperrealError, match="predicts 'flow'.*epsilon, v_prediction, sample"):
        DenoisingObjective({"prediction_type": "flow"})


def test_job_runs_one_at_a_time_and_streams_until_done(tmp_path):
    gate = threading.Event()
    job = TrainingJob(lambda on_event, cancel: train(LineFit(gate), TrainConfig(steps=20, batch_size=4, lr=1e-2,
                                                                                    log_every=5),
                                                     tmp_path, on_event, cancel))
    with pytest.raises(HyperrealError, match="Another training job is running"):
        TrainingJob(lambda on_event, cancel: [])
    gate.set()
    kinds = [e.kind for e in job.events(timeout=60)]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("step") == 4
    assert job.artifacts and not job.running
    assert list(TrainingJob(lambda on_event, cancel: []).events(timeout=10)) == []  # the slot is free again


def test_job_failure_is_one_message(tmp_path):
    def boom(on_event, cancel):
        raise HyperrealError("the dataset has no images")

    job = TrainingJob(boom)
    with pytest.raises(HyperrealError, match="the dataset has no images"):
        list(job.events(timeout=10))


class Broken(LineFit):
    """LineFit whose loss fails at a given step: NaN, or a CUDA-style out-of-memory error."""

    def __init__(self, at: int, what: str):
        super().__init__()
        self.at, self.what = at, what

    def loss(self, batch):
        loss = super().loss(batch)
        if self.steps_seen == self.at:
            if self.what == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return loss * float("nan")
        return loss


def test_a_nan_loss_stops_with_the_last_good_checkpoint(tmp_path):
    m = Broken(at=4, what="nan")
    with pytest.raises(HyperrealError, match="last good weights") as err:
        train(m, TrainConfig(steps=10, batch_size=4, lr=1e-2, log_every=1), tmp_path)
    assert "--resume" in str(err.value)
    ck = latest_checkpoint(tmp_path)
    assert ck is not None and ck.name == "step-3"  # three steps were applied; the fourth loss was NaN
    weights = load_file(ck / "learner.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    # and the run continues from there
    paths = train(LineFit(), TrainConfig(steps=5, batch_size=4, lr=1e-2, log_every=1), tmp_path, resume=True)
    assert paths and latest_checkpoint(tmp_path).name == "step-5"


def test_out_of_memory_names_the_vram_preset_to_pick(tmp_path):
    with pytest.raises(HyperrealError) as err:
        train(Broken(at=2, what="oom"), TrainConfig(steps=5, batch_size=8, lr=1e-2), tmp_path)
    text = str(err.value)
    assert "ran out of memory" in text and "--vram 8" in text and "batch 1" in text and "gradient checkpointing" in text


def test_start_event_says_what_runs_and_precision_can_change_between_runs(tmp_path):
    events = []
    # a bf16 run (the CPU's half precision), then a full-precision one, then bf16 again, in one process
    for i, precision in enumerate(("bf16", "no", "bf16")):
        train(LineFit(), TrainConfig(steps=2, batch_size=4, lr=1e-2, mixed_precision=precision, use_8bit_adam=True,
                                     log_every=1), tmp_path / str(i), events.append)
    starts = [e.message for e in events if e.kind == "start"]
    assert "bf16 mixed precision" in starts[0] and "full precision" in starts[1] and "bf16" in starts[2]
    assert all("8-bit Adam was asked for, but it runs on CUDA GPUs only" in s for s in starts)
    with pytest.raises(HyperrealError, match="fp16 needs a CUDA GPU"):
        train(LineFit(), TrainConfig(steps=1, batch_size=4, mixed_precision="fp16"), tmp_path / "x")


def test_gradient_checkpointing_is_switched_on_for_the_run_and_back_off(tmp_path):
    class Flagged:
        is_gradient_checkpointing = False

        def enable_gradient_checkpointing(self):
            self.is_gradient_checkpointing = True

        def disable_gradient_checkpointing(self):
            self.is_gradient_checkpointing = False

    seen, module = [], Flagged()

    class Checkpointed(LineFit):
        def checkpointing_modules(self):
            return [module]

        def loss(self, batch):
            seen.append(module.is_gradient_checkpointing)
            return super().loss(batch)

    train(Checkpointed(), TrainConfig(steps=2, batch_size=4, gradient_checkpointing=True), tmp_path)
    assert seen == [True, True] and not module.is_gradient_checkpointing
