"""ControlNet (method 3): identity at step 0, gradients through the zero convolutions, frozen base, files, jobs."""
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from hyperreal import training
from hyperreal.errors import HyperrealError
from hyperreal.generation import GenerationJob, job_from_dict, run_job
from hyperreal.methods import controlnet
from hyperreal.pipelines import generate_images
from hyperreal.training.loop import gradient_checkpointing
from tests.conftest import digest, run_cli

STEPS = 6  # denoising steps in these tests: enough to show a difference, cheap on 2 cores


def scenes(n, seed=5):
    from hyperreal.shapes.world import sample_scene

    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from hyperreal.datasets import write_examples

    return write_examples(tmp_path_factory.mktemp("cn-data"), scenes(8))


@pytest.fixture(scope="module")
def edges(tmp_path_factory):
    """A Canny map of a rendered scene, and the scene itself (a 'photo' to preprocess)."""
    from hyperreal.shapes.world import render_caption

    folder = tmp_path_factory.mktemp("cn-maps")
    scene = render_caption("a red square on the left", seed=3)
    scene.save(folder / "scene.png")
    controlnet.condition_map("canny", scene, 64, 64).save(folder / "edges.png")
    return folder


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(i.convert("RGB"), dtype=np.int16) for i in images])


@pytest.fixture(scope="module")
def trained(tiny, data, tmp_path_factory):
    """A ControlNet trained 3 steps through the shared loop, with the frozen weights hashed around it."""
    before = digest(tiny.pipe.unet, tiny.pipe.vae, tiny.pipe.text_encoder)
    out = tmp_path_factory.mktemp("cn-run")
    learner = controlnet.make_learner(tiny, controlnet.TrainRequest(data=str(data), name="mine"), out)
    paths = training.train(learner, training.TrainConfig(steps=3, batch_size=4, lr=1e-3), out)
    return {"learner": learner, "paths": paths, "out": out, "before": before,
            "after": digest(tiny.pipe.unet, tiny.pipe.vae, tiny.pipe.text_encoder)}


def test_conditioning_embedding_follows_the_vae_factor(tiny):
    assert controlnet.conditioning_channels_for(8) == (16, 32, 96, 256)  # diffusers' SD default
    assert controlnet.conditioning_channels_for(4) == (16, 32, 96)
    with pytest.raises(HyperrealError):
        controlnet.conditioning_channels_for(6)
    cn = controlnet.new_controlnet(tiny.pipe)
    emb = cn.controlnet_cond_embedding(torch.zeros(1, 3, 64, 64))
    assert emb.shape[-2:] == (16, 16)  # the tiny base's 64x64 images have 16x16 latents


def test_fresh_controlnet_is_the_base(tiny, edges):
    cn = controlnet.new_controlnet(tiny.pipe)
    prompts, seeds = ["a red square on the left", "a blue circle"], [11, 12]
    m = Image.open(edges / "edges.png")
    controlled = controlnet.generate(tiny.pipe, cn, prompts, [m, m], seeds, STEPS, 5.0)
    plain = generate_images(tiny.pipe, list(zip(prompts, seeds)), STEPS, 5.0)
    assert np.abs(pixels(controlled) - pixels(plain)).max() <= 1


def test_zero_convolutions_get_gradients_and_one_step_changes_the_output(tiny, data, tmp_path, edges):
    learner = controlnet.make_learner(tiny, controlnet.TrainRequest(data=str(data)), tmp_path)
    zero = controlnet.zero_convolutions(learner.controlnet)
    assert zero and all(torch.count_nonzero(p) == 0 for p in zero.values())  # they start at zero
    loss = learner.loss(next(learner.batches(4, 0)))
    loss.backward()
    # the convolutions joining the UNet get a gradient at once (their input is the copy's non-zero features);
    # everything upstream of them, the embedding's zero conv_out included, only from the second step
    weights = {k: p for k, p in zero.items() if k.endswith("weight") and not k.startswith("controlnet_cond_embedding")}
    assert len(weights) == len(learner.controlnet.controlnet_down_blocks) + 1
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights.values()), \
        [k for k, p in weights.items() if p.grad is None or p.grad.abs().sum() == 0]
    m = Image.open(edges / "edges.png")
    before = controlnet.generate(tiny.pipe, learner.controlnet, ["a red square"], [m], [3], STEPS, 5.0)
    opt = torch.optim.AdamW(learner.trainable_parameters(), lr=1e-3)
    opt.step()
    after = controlnet.generate(tiny.pipe, learner.controlnet, ["a red square"], [m], [3], STEPS, 5.0)
    assert np.abs(pixels(after) - pixels(before)).max() > 0
    assert not any(p.requires_grad for p in tiny.pipe.unet.parameters())


def test_gradient_checkpointing_gives_the_same_loss_and_is_undone(tiny, data, tmp_path):
    learner = controlnet.make_learner(tiny, controlnet.TrainRequest(data=str(data)), tmp_path)
    batch = next(learner.batches(2, 0))
    a = learner.loss(batch)
    with gradient_checkpointing(learner.checkpointing_modules(), True):
        assert tiny.pipe.unet.is_gradient_checkpointing and learner.controlnet.is_gradient_checkpointing
        b = learner.loss(batch)
        b.backward()
    assert torch.allclose(a, b)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.trainable_parameters())
    assert not tiny.pipe.unet.is_gradient_checkpointing  # the shared base is left as it was


def test_training_leaves_every_frozen_weight_bit_identical(trained):
    assert trained["before"] == trained["after"]
    sd = trained["learner"].controlnet.state_dict()
    assert any(torch.count_nonzero(v) for k, v in sd.items() if k.startswith("controlnet_down_blocks."))


def test_save_and_load_round_trip(tiny, trained, edges):
    folder, single = trained["paths"]
    assert (folder / "config.json").is_file() and single.suffix == ".safetensors"
    header = controlnet.read_header(single)
    assert header["hyperreal_kind"] == "controlnet" and json.loads(header["hyperreal_config"])["in_channels"] == 4
    from diffusers import ControlNetModel

    assert isinstance(ControlNetModel.from_pretrained(folder), ControlNetModel)  # plain diffusers reads it
    m = Image.open(edges / "edges.png")
    ref = controlnet.generate(tiny.pipe, trained["learner"].controlnet, ["a red square"], [m], [4], STEPS, 5.0)
    for src in (folder, single, trained["out"]):
        got = controlnet.generate(tiny.pipe, controlnet.load_controlnet(str(src)), ["a red square"], [m], [4],
                                  STEPS, 5.0)
        assert np.array_equal(pixels(got), pixels(ref)), src


def test_job_controlnet_applies_and_does_not_leak(tiny, edges, trained):
    plain = GenerationJob(prompt="a red square on the left", seed=7, steps=STEPS)
    unit = {"path": "tiny-canny", "image": str(edges / "edges.png")}
    a, _ = run_job(tiny, plain)
    b, params = run_job(tiny, job_from_dict({**vars(plain), "controlnet": [unit]}))
    c, _ = run_job(tiny, plain)
    assert np.abs(pixels([a]) - pixels([b])).max() > 0
    assert np.array_equal(pixels([a]), pixels([c]))  # the next job runs the plain base again
    assert "tiny-canny" in params
    # two ControlNets at once (the shipped one and one trained here); at scale 0 both add nothing
    two = [unit, {"path": str(trained["paths"][1]), "image": str(edges / "scene.png"), "preprocess": "canny",
                  "scale": 0.5, "start": 0.1, "end": 0.9}]
    d, _ = run_job(tiny, job_from_dict({**vars(plain), "controlnet": two}))
    assert np.abs(pixels([a]) - pixels([d])).max() > 0
    off = [{**u, "scale": 0.0} for u in two]
    e, _ = run_job(tiny, job_from_dict({**vars(plain), "controlnet": off}))
    assert np.abs(pixels([a]) - pixels([e])).max() <= 1


@pytest.mark.parametrize("unit,words", [
    ({"path": "tiny-canny", "image": "no/such/map.png"}, "does not exist"),
    ({"path": "tiny-canny", "image": "EDGES", "scale": 3}, "'scale' must be a number between 0 and 2"),
    ({"path": "tiny-canny", "image": "EDGES", "start": 0.8, "end": 0.2}, "must be below 'end'"),
    ({"path": "no-such-controlnet", "image": "EDGES"}, "is not an embedded name"),
    ({"path": "tiny-canny", "image": "EDGES", "preprocess": "depth"}, "'preprocess' must be one of"),
    ({"path": "tiny-canny", "image": "EDGES", "colour": 1}, "unknown key"),
])
def test_bad_job_units_are_named(edges, unit, words):
    unit = {k: (str(edges / "edges.png") if v == "EDGES" else v) for k, v in unit.items()}
    with pytest.raises(HyperrealError, match="jobs.jsonl line 3: controlnet\\[0\\]") as e:
        job_from_dict({"prompt": "a red circle", "seed": 1, "controlnet": [unit]}, "jobs.jsonl line 3")
    assert words in str(e.value)


def test_a_controlnet_for_another_base_is_refused(tiny, tmp_path):
    from diffusers import ControlNetModel

    other = ControlNetModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                            cross_attention_dim=64, layers_per_block=1, norm_num_groups=8, attention_head_dim=4,
                            conditioning_embedding_out_channels=(16, 32))
    other.save_pretrained(tmp_path / "other", safe_serialization=True)
    with pytest.raises(HyperrealError, match="made for another base"):
        controlnet.cached_controlnet(tiny, str(tmp_path / "other"))


def test_given_maps_are_used_and_required(tiny, tmp_path):
    folder = tmp_path / "given"
    folder.mkdir()
    rows = []
    for i, (img, text) in enumerate(scenes(2)):
        img.save(folder / f"img{i}.png")
        controlnet.condition_map("canny", img, 64, 64).save(folder / f"map{i}.png")
        rows.append({"file_name": f"img{i}.png", "text": text, "conditioning_image": f"map{i}.png"})
    (folder / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
    got = controlnet.dataset_examples(folder, "given", 64, 64)
    assert np.array_equal(np.asarray(got[1][2]), np.asarray(Image.open(folder / "map1.png").convert("RGB")))
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "img0.png", "text": "a red circle"}))
    with pytest.raises(HyperrealError, match="needs a conditioning_image"):
        controlnet.dataset_examples(folder, "given", 64, 64)


def test_cli_generate_jobs_with_tiny_canny(tmp_path, edges):
    jobs = tmp_path / "jobs.jsonl"
    unit = {"path": "tiny-canny", "image": str(edges / "edges.png")}
    jobs.write_text(json.dumps({"prompt": "a red square on the left", "seed": 1, "steps": STEPS,
                                "controlnet": [unit]}) + "\n")
    r = run_cli("generate", "--base", "tiny", "--jobs", jobs, "--out-dir", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "controlnet" in Image.open(tmp_path / "out" / "0000.png").info["parameters"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a red circle", "seed": 1, "controlnet": [{**unit, "image": "gone.png"}]}))
    r = run_cli("generate", "--base", "tiny", "--jobs", bad, "--out-dir", tmp_path / "bad")
    assert r.returncode != 0 and "gone.png" in r.stderr and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr and not list((tmp_path / "bad").glob("*.png"))


def test_cli_train_controlnet_writes_its_files(tmp_path, data):
    out = tmp_path / "run"
    r = run_cli("train", "controlnet", "--base", "tiny", "--data", data, "--out", out, "--steps", 2,
                "--batch-size", 2, "--name", "mine", "--sample-every", 1, "--json")
    assert r.returncode == 0, r.stderr
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert figures["steps"] == 2 and figures["extractor"] == "canny"
    assert (out / "controlnet" / "config.json").is_file() and (out / "mine.safetensors").is_file()
    samples = sorted((out / "samples").glob("*.png"))  # map | output pairs, after step 1 and at the end
    assert len(samples) == 4 and Image.open(samples[0]).size == (128, 64)
    assert list((out / "checkpoints").glob("step-2"))
    r = run_cli("train", "controlnet", "--base", "tiny", "--data", data, "--out", out, "--extractor", "depth")
    assert r.returncode != 0 and "--extractor must be one of" in r.stderr
