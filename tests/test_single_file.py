"""Single-file bases: a narrow random SD1.5-shaped pipeline, written in the original CompVis/A1111 layout by
bench/to_single_file.py, loads offline with its config folder and draws exactly what the diffusers folder draws;
other files given as a base are named; --vae swaps the decoder; the CLI generates and trains on such a file; the
app lists the models folder's checkpoints and switches to one."""
import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from hyperreal.errors import HyperrealError
from hyperreal.generation import GenerationJob, run_job
from hyperreal.loading import load_base
from hyperreal.registry import find_embedded
from hyperreal.single_file import inspect
from hyperreal.sources import read_header

from .conftest import run_cli

JOB = GenerationJob(prompt="a photo of a red car", seed=7, steps=2, guidance=5.0, width=64, height=64)
# the narrow model's own defaults, in its config folder (as a diffusers base folder's hyperreal.json)
NARROW_DEFAULTS = {"steps": 2, "guidance": 5.0, "width": 64, "height": 64, "vae_slicing": False, "vae_tiling": False,
                   "adapter_train": {"steps": 2, "batch_size": 1, "lr": 1e-4, "full_lr": 1e-5, "prior_weight": 1.0,
                                     "class_images": 0, "sample_every": 0}}


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """models/narrow.safetensors (+ narrow.config/ beside it), the diffusers folder it came from, and VAE files: the
    same VAE alone, another random one, and that one's diffusers folder."""
    from bench import sd15, to_single_file

    tmp = tmp_path_factory.mktemp("single")
    folder = sd15.save(tmp / "diffusers", narrow=True)
    file = to_single_file.write(folder, tmp / "models" / "narrow.safetensors", with_config=True)
    (file.with_suffix(".config") / "hyperreal.json").write_text(json.dumps(NARROW_DEFAULTS))
    other = sd15.save(tmp / "other", narrow=True, seed=1)
    return {"folder": folder, "file": file, "tmp": tmp, "other": other,
            "vae": to_single_file.write(folder, tmp / "vae_same.safetensors", vae_only=True),
            "other_vae": to_single_file.write(other, tmp / "vae_other.safetensors", vae_only=True)}


def pixels(base, job=JOB):
    return np.asarray(run_job(base, job)[0])


@functools.lru_cache(maxsize=None)
def loaded(path, vae=None):
    """A base loaded once for the module's tests (each load is a second or so)."""
    return load_base(str(path), vae=None if vae is None else str(vae))


def test_the_file_has_the_original_layout(narrow):
    _, keys = read_header(narrow["file"])
    for key in ("model.diffusion_model.input_blocks.1.1.proj_in.weight", "first_stage_model.decoder.conv_in.weight",
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"):
        assert key in keys
    assert not any(k.startswith(("unet.", "vae.", "text_encoder.")) for k in keys)
    ck = inspect(narrow["file"])
    assert ck.kind == "sd1" and ck.parts == {"unet", "vae", "text_encoder"}


def test_single_file_draws_what_the_diffusers_folder_draws(narrow):
    folder = load_base(str(narrow["folder"]))
    explicit = load_base(str(narrow["file"]), config=narrow["folder"])  # a diffusers folder as the config
    beside = loaded(narrow["file"])  # narrow.config/ beside the file
    assert explicit.name == beside.name == "narrow.safetensors"
    assert len(beside.pipe.tokenizer) == 49408 and beside.pipe.tokenizer.model_max_length == 77
    assert beside.defaults["width"] == 64  # the config folder's hyperreal.json
    expected = pixels(folder)
    assert np.array_equal(pixels(explicit), expected) and np.array_equal(pixels(beside), expected)
    assert "Model: narrow.safetensors" in run_job(beside, JOB)[1]
    # the twin a training run's generation uses loads the same way
    beside.training.set()
    try:
        assert np.array_equal(pixels(beside.for_generation()), expected)
    finally:
        beside.training.clear()


def test_vae_override_changes_only_the_decoder(narrow):
    plain = pixels(loaded(narrow["file"]))
    same = load_base(str(narrow["file"]), vae=str(narrow["vae"]))
    other = loaded(narrow["file"], narrow["other_vae"])
    other_folder = load_base(str(narrow["folder"]), vae=str(narrow["other"]))  # a diffusers folder's vae/
    assert np.array_equal(pixels(same), plain)
    assert not np.array_equal(pixels(other), plain)
    assert np.array_equal(pixels(other), pixels(other_folder))
    assert torch.equal(other.pipe.unet.conv_in.weight, same.pipe.unet.conv_in.weight)
    with pytest.raises(HyperrealError, match="not a VAE"):
        load_base(str(narrow["file"]), vae=str(narrow["file"]))


def _write(path, tensors):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, str(path))
    return path


LORA = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (32, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()}
SDXL = {"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (8,),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 8),
        "model.diffusion_model.label_emb.0.0.weight": (8, 8), "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3)}
SD2 = {"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
       "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 1024),
       "cond_stage_model.model.token_embedding.weight": (10, 1024), "first_stage_model.decoder.conv_in.weight": (4,)}


@pytest.mark.parametrize("name, tensors, words", [
    ("lora.safetensors", LORA, ["LoRA", "Adapters tab"]),
    ("xl.safetensors", SDXL, ["an SDXL base checkpoint", "Stable Diffusion 1.x"]),
    ("sd2.safetensors", SD2, ["Stable Diffusion 2.x"]),
])
def test_files_that_are_not_sd1_checkpoints_are_named(tmp_path, name, tensors, words):
    path = _write(tmp_path / name, tensors)
    with pytest.raises(HyperrealError) as e:
        load_base(str(path))
    assert all(w in str(e.value) for w in words), str(e.value)
    assert name in str(e.value) and "--base tiny" in str(e.value)


def test_other_refusals_say_what_to_do(tmp_path, narrow):
    cases = []
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x02}q\x00.")  # a pickle: never opened
    cases.append((tmp_path / "model.ckpt", None, ["pickled", "convert it to .safetensors"]))
    cases.append((tmp_path / "missing.safetensors", None, ["no such file"]))
    canny = find_embedded("tiny-canny", "controlnet").path / "diffusion_pytorch_model.safetensors"
    cases.append((canny, None, ["ControlNet"]))
    cases.append((narrow["vae"], None, ["a VAE alone", "--vae"]))
    # the SD1.5 configs (the default without narrow.config/) do not fit the narrow widths
    alone = tmp_path / "alone.safetensors"
    shutil.copy(narrow["file"], alone)
    cases.append((alone, None, ["do not fit the configs", "alone.config/"]))
    no_tokenizer = shutil.copytree(narrow["file"].with_suffix(".config"), tmp_path / "cfg")
    shutil.rmtree(no_tokenizer / "tokenizer")
    (no_tokenizer / "tokenizer").mkdir()
    cases.append((narrow["file"], no_tokenizer, ["no usable CLIP tokenizer"]))
    for path, config, words in cases:
        with pytest.raises(HyperrealError) as e:
            load_base(str(path), config=config)
        assert all(w in str(e.value) for w in words), str(e.value)


def test_cli_generates_and_trains_on_a_single_file(narrow, tmp_path):
    file, other_vae = narrow["file"], narrow["other_vae"]
    out = tmp_path / "x.png"
    r = run_cli("generate", "--base", file, "--vae", other_vae, "--prompt", JOB.prompt, "--seed", JOB.seed,
                "--steps", JOB.steps, "--guidance", JOB.guidance, "--out", out)
    assert r.returncode == 0, r.stderr
    with Image.open(out) as im:
        assert "Model: narrow.safetensors" in im.info["parameters"]
        assert np.array_equal(np.asarray(im.convert("RGB")), pixels(loaded(file, other_vae)))
    # an adapter trained on the file records the file's name as its base
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a photo of sks car")
    run = tmp_path / "run"
    r = run_cli("train", "adapter", "--base", file, "--data", data, "--out", run, "--steps", "2", "--rank", "2",
                "--resolution", "64", "--drift-samples", "1", "--name", "car")
    assert r.returncode == 0, r.stderr + r.stdout
    meta, _ = read_header(run / "car.safetensors")
    assert meta["ss_sd_model_name"] == "narrow.safetensors" and meta["ss_base_model_version"] == "sd_v1"
    assert json.loads((run / "summary.json").read_text())["base"] == "narrow.safetensors"


# --- the app --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app_with_models(tiny, narrow, tmp_path_factory):
    from .ui.conftest import launched

    models = narrow["file"].parent
    _write(models / "loras" / "lora.safetensors", LORA)  # in the models folder, not a base
    shutil.copy(narrow["vae"], models / "vae.safetensors")
    with launched(tiny, tmp_path_factory.mktemp("app-models"), models=models) as app:
        yield app


def test_app_lists_checkpoints_and_switches_generate_to_one(app_with_models, narrow):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from .ui.test_app import generate_args

    url, settings = app_with_models
    client = Client(url, verbose=False)

    def listed():
        return [value for _, value in client.predict(api_name="/list_bases")["choices"]]

    assert listed() == ["tiny", "narrow.safetensors"]  # no LoRA, no VAE
    shutil.copy(narrow["file"], settings.models / "loras" / "late.safetensors")  # dropped in while the app runs
    assert listed() == ["tiny", "loras/late.safetensors", "narrow.safetensors"]
    with pytest.raises(AppError, match="not allowed"):
        client.predict("../../etc/passwd", api_name="/switch_base")
    with pytest.raises(AppError, match="looks like a LoRA"):
        client.predict("loras/lora.safetensors", api_name="/switch_base")

    switched = client.predict("narrow.safetensors", api_name="/switch_base")
    assert switched[0] == "narrow.safetensors" and "narrow.safetensors" in switched[1]
    assert list(switched[2:]) == [2, 5.0, 64, 64]  # Generate starts from the new base's defaults
    args = generate_args(prompt=JOB.prompt, seed=JOB.seed, steps=JOB.steps)
    args[4] = JOB.guidance
    gallery, params = client.predict(*args, api_name="/generate")
    assert "Model: narrow.safetensors" in params
    with Image.open(gallery[0]["image"]) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), pixels(loaded(narrow["file"])))
    back = client.predict("tiny", api_name="/switch_base")
    assert back[0] == "tiny" and list(back[2:]) == [20, 5.0, 64, 64]
    assert "Model: tiny" in client.predict(*args, api_name="/generate")[1]


def test_no_switching_while_a_training_run_holds_the_base(tiny, narrow):
    from hyperreal.settings import Settings
    from hyperreal.ui.bases import CurrentBase

    loads = []
    current = CurrentBase(tiny, Settings(models=narrow["file"].parent), load=lambda *a, **k: loads.append(a) or tiny)
    with current.training_run() as base:
        assert base is tiny
        with pytest.raises(HyperrealError, match="training run"):
            current.switch("narrow.safetensors")
    tiny.training.set()  # a run that holds the pipe itself (services' in_training)
    try:
        with pytest.raises(HyperrealError, match="training run"):
            current.switch("narrow.safetensors")
    finally:
        tiny.training.clear()
    assert not loads
    current.switch("narrow.safetensors")
    assert loads and current.value == "narrow.safetensors"


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (.ci/run installs it)")
def test_train_panels_start_from_the_switched_base_s_recipe(app_with_models, narrow, tiny):
    """In a browser: after switching to an SD1.5 checkpoint the Train panels show SD1.5's recipe, not the tiny
    base's the page started with; switching back shows the tiny base's again."""
    from playwright.sync_api import sync_playwright

    url, _ = app_with_models
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, wait_until="domcontentloaded", timeout=90_000)
            picker = page.locator("#base-model input")
            picker.wait_for(state="visible", timeout=60_000)
            page.get_by_role("tab", name="Adapters").click()
            page.get_by_text("Prior preservation and text encoder").click()  # the accordion holding the prior
            shown = {"steps": page.locator("#adapter-steps input[type=number]"),
                     "lr": page.locator("#adapter-lr input"),
                     "prior_weight": page.locator("#adapter-prior-weight input")}
            cn_steps = page.locator("#controlnet-steps input[type=number]")

            def reads(recipe, controlnet):
                want = {k: float(recipe[k]) for k in shown}
                for _ in range(120):
                    got = {k: float(box.input_value()) for k, box in shown.items()}
                    if got == want:
                        break
                    page.wait_for_timeout(500)
                assert got == want
                page.get_by_role("tab", name="ControlNet").click()
                assert float(cn_steps.input_value()) == controlnet["steps"]
                page.get_by_role("tab", name="Adapters").click()

            reads(tiny.defaults["adapter_train"], tiny.defaults["controlnet_train"])
            other = loaded(narrow["file"]).defaults
            assert other["adapter_train"]["steps"] != tiny.defaults["adapter_train"]["steps"]
            for value, defaults in (("narrow.safetensors", other), ("tiny", tiny.defaults)):
                picker.fill(value)
                picker.press("Enter")
                reads(defaults["adapter_train"], defaults["controlnet_train"])
        finally:
            browser.close()
