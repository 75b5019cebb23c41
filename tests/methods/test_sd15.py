"""Every method on an SD1.5-shaped model (SD1.5's real configs and CLIP vocabulary, narrow widths, random weights),
in fp32 and in bf16 (the CPU's stand-in for a GPU's half precision): builds, trains a step, saves, reloads and
generates, alone and combined in one job; the frozen base stays bit-identical."""
import json
import random

import numpy as np
import pytest
import torch

from bench import sd15
from bench.star import star_dataset
from hyperreal import services
from hyperreal.datasets import write_examples
from hyperreal.generation import GenerationJob, run_job
from hyperreal.loading import load_base
from hyperreal.methods import adapters, bridge, controlnet
from hyperreal.shapes.world import render_caption, sample_scene
from hyperreal.training import TrainConfig
from tests.conftest import digest

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SIZE = 64  # pixels: 8x8 latents through SD1.5's factor-8 VAE
CFG = dict(steps=2, batch_size=2, lr=1e-3, log_every=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The narrow model, generating at 64 px in 4 steps by its own defaults (every other default is SD1.5's)."""
    out = sd15.save(tmp_path_factory.mktemp("sd15-narrow"), narrow=True)
    (out / "hyperreal.json").write_text(json.dumps({"kind": "base", "steps": 4, "width": SIZE, "height": SIZE}))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd15-data")
    stars = star_dataset(root / "stars", n=2)
    rng = random.Random(4)
    scenes = write_examples(root / "scenes", [sample_scene(rng) for _ in range(2)])
    render_caption("a red square on the left", seed=3).save(root / "scene.png")
    return {"stars": stars, "scenes": scenes, "scene": root / "scene.png"}


def base_for(folder, dtype):
    return load_base(str(folder), dtype=DTYPES[dtype])


def frozen(base):
    return digest(base.pipe.unet, base.pipe.vae, base.pipe.text_encoder)


def job(prompt="a photo of sks dog", **keys):
    return GenerationJob(prompt, 3, steps=3, width=SIZE, height=SIZE, **keys)


def pixels(base, j):
    return np.asarray(run_job(base, j)[0], dtype=np.int16)


def test_the_sd15_shape_is_sd15s(folder):
    base = load_base(str(folder))
    pipe = base.pipe
    assert pipe.vae_scale_factor == 8 and pipe.tokenizer.model_max_length == 77
    assert pipe.tokenizer.tokenize("sks") == ["sks</w>"]  # one token in CLIP's vocabulary (id 48136)
    assert pipe.tokenizer.convert_tokens_to_ids("sks</w>") == 48136
    full = json.loads((sd15.SD15_CONFIGS / "unet" / "config.json").read_text())
    assert len(pipe.unet.down_blocks) == len(full["down_block_types"]) and pipe.text_encoder.config.num_hidden_layers == 12
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 512  # SD1.5's native size
    assert base.defaults["adapter_train"]["lr"] == 1e-4 and base.defaults["vae_slicing"]  # SD1.5's recipe


@pytest.mark.parametrize("dtype", DTYPES)
def test_adapter_trains_saves_reloads_and_generates(folder, data, tmp_path, dtype):
    base = base_for(folder, dtype)
    before, plain = frozen(base), pixels(base, job())
    req = adapters.TrainRequest(data=str(data["stars"]), trigger="sks", class_images=2, resolution=SIZE, name="sd")
    cfg = TrainConfig(**CFG, gradient_checkpointing=dtype == "bf16")
    report = services.train_adapter(base, req, cfg, tmp_path, drift_samples=2)
    assert frozen(base) == before and not adapters.loaded(base.pipe)  # bit-identical, and off the shared base
    assert report.figures["trained_parameters"] > 0 and not base.pipe.unet.is_gradient_checkpointing
    assert report.figures["scale"] == 1.0 and (tmp_path / "sd.safetensors").is_file()
    meta = json.loads((tmp_path / "adapter.json").read_text())
    assert meta["trigger_tokens"] == []  # "sks" is one CLIP token: no new token, a text-encoder LoRA instead
    adapted = pixels(base, job(adapters=[{"path": str(tmp_path / "sd.safetensors"), "weight": 1.0}]))
    assert adapted.shape == (SIZE, SIZE, 3) and not np.array_equal(adapted, plain)
    assert np.array_equal(pixels(base, job()), plain)  # the next job without it is the base again


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_fine_tune_works_on_this_base(folder, data, tmp_path, dtype):
    base = base_for(folder, dtype)
    before = frozen(base)
    req = adapters.TrainRequest(data=str(data["stars"]), kind="full", trigger="sks", class_images=2,
                                resolution=SIZE, name="full")
    report = services.train_adapter(base, req, TrainConfig(**CFG), tmp_path, drift_samples=2)
    assert frozen(base) == before and report.figures["drift"] >= 0
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize("dtype", DTYPES)
def test_controlnet_trains_saves_reloads_and_generates(folder, data, tmp_path, dtype):
    base = base_for(folder, dtype)
    before, plain = frozen(base), pixels(base, job("a red square"))
    req = controlnet.TrainRequest(data=str(data["scenes"]), resolution=SIZE, name="cn")
    cfg = TrainConfig(**{**CFG, "gradient_checkpointing": True})
    report = services.train_controlnet(base, req, cfg, tmp_path)
    assert frozen(base) == before and not base.pipe.unet.is_gradient_checkpointing
    unit = {"path": str(tmp_path / "cn.safetensors"), "image": str(data["scene"]), "preprocess": "canny"}
    fresh = pixels(base, job("a red square", controlnet=controlnet.check_job_controlnet([unit])))
    assert fresh.shape == (SIZE, SIZE, 3) and report.figures["final_loss"] is not None
    assert np.array_equal(pixels(base, job("a red square")), plain)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["fuse", "swap"])
def test_bridge_trains_saves_reloads_and_generates(folder, data, tmp_path, dtype, mode):
    base = base_for(folder, dtype)
    before, plain = frozen(base), pixels(base, job("a red square"))
    req = bridge.TrainRequest(data=str(data["scenes"]), mode=mode, encoder="minilm", max_length=16, width=32,
                              layers=1, resolution=SIZE, diffusion_steps=1 if mode == "swap" else 0, name="br")
    # with gradient checkpointing, fuse's processors run again in the backward pass and must see the same tokens
    report = services.train_bridge(base, req, TrainConfig(**CFG, gradient_checkpointing=True), tmp_path)
    assert frozen(base) == before and not base.pipe.unet.is_gradient_checkpointing
    path = tmp_path / "br.safetensors"
    assert report.paths == [path] and bridge.read_header(path)["spec"]["base_width"] == 64
    bridged = pixels(base, job("a red square", bridge={"path": str(path), "scale": 1.0}))
    assert bridged.shape == (SIZE, SIZE, 3)
    assert np.array_equal(pixels(base, job("a red square")), plain)


@pytest.mark.parametrize("mode", ["swap", "fuse"])
def test_bart_bridge_trains_saves_reloads_and_generates(folder, data, tmp_path, bart_folder, mode):
    """The transformers path SD1.5 uses by default (BART, bart-base's real config, random weights) in bf16."""
    base = base_for(folder, "bf16")
    before, plain = frozen(base), pixels(base, job("a red square"))
    req = bridge.TrainRequest(data=str(data["scenes"]), mode=mode, encoder=str(bart_folder), max_length=16,
                              width=32, layers=1, resolution=SIZE, diffusion_steps=1 if mode == "swap" else 0,
                              name="bart")
    report = services.train_bridge(base, req, TrainConfig(**CFG), tmp_path)
    assert frozen(base) == before
    path = tmp_path / "bart.safetensors"
    spec = bridge.read_header(path)["spec"]
    assert report.paths == [path] and (spec["encoder_width"], spec["encoder_states"]) == (768, 7)
    assert spec["residual"] == (mode == "swap")
    j = job("un cuadrado rojo", bridge={"path": str(path), "scale": 1.0})
    first = pixels(base, j)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(path.read_bytes())  # a fresh load from the file gives the same image
    assert np.array_equal(first, pixels(base, job("un cuadrado rojo", bridge={"path": str(copy), "scale": 1.0})))
    assert first.shape == (SIZE, SIZE, 3)
    assert np.array_equal(pixels(base, job("a red square")), plain)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_three_methods_in_one_job(folder, data, tmp_path, dtype):
    base = base_for(folder, dtype)
    lora = services.train_adapter(base, adapters.TrainRequest(data=str(data["stars"]), trigger="sks",
                                                              resolution=SIZE, name="a"),
                                  TrainConfig(**CFG), tmp_path / "a", drift_samples=1).paths[0]
    cn = services.train_controlnet(base, controlnet.TrainRequest(data=str(data["scenes"]), resolution=SIZE, name="c"),
                                   TrainConfig(**CFG), tmp_path / "c").paths[1]
    br = services.train_bridge(base, bridge.TrainRequest(data=str(data["scenes"]), mode="fuse", encoder="minilm",
                                                         max_length=16, width=32, resolution=SIZE, name="b"),
                               TrainConfig(**CFG), tmp_path / "b").paths[0]
    plain = pixels(base, job())
    unit = controlnet.check_job_controlnet([{"path": str(cn), "image": str(data["scene"]), "preprocess": "canny"}])
    combined = job(adapters=[{"path": str(lora), "weight": 1.0}], controlnet=unit,
                   bridge={"path": str(br), "scale": 1.0})
    assert pixels(base, combined).shape == (SIZE, SIZE, 3)
    assert np.array_equal(pixels(base, job()), plain)  # nothing of the combined job is left behind
