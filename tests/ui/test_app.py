"""The app as a client sees it: launched on the tiny base, driven through gradio_client."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def test_generate_through_client(app_url):
    from gradio_client import Client

    url, settings = app_url
    client = Client(url, verbose=False)
    gallery, params = client.predict("a red circle on the left", "", 11, 10, 5.0, 64, 64, 2, api_name="/generate")
    assert len(gallery) == 2
    first = gallery[0]["image"]
    with Image.open(first) as im:
        assert im.size == (64, 64)
        assert im.info["parameters"].startswith("a red circle on the left\nSteps: 10,")
    assert "Seed: 12" in params  # the last of seeds 11, 12
    assert len(list(settings.outputs.glob("*.png"))) == 2


def test_bad_input_is_a_message_not_a_traceback(app_url):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(app_url[0], verbose=False)
    with pytest.raises(AppError, match="'prompt' is empty"):
        client.predict("   ", "", 1, 10, 5.0, 64, 64, 1, api_name="/generate")


def test_settings_go_back_to_the_form(app_url):
    from gradio_client import Client

    client = Client(app_url[0], verbose=False)
    text = "a blue square\nNegative prompt: red\nSteps: 7, Sampler: X, CFG scale: 3.5, Seed: 9, Size: 64x64, Model: tiny"
    out = client.predict(text, api_name="/reuse_settings")
    assert list(out)[:7] == ["a blue square", "red", 9, 7, 3.5, 64, 64]
    # method settings in the text come back too
    text += ', Hyperreal: "{\\"adapters\\": [{\\"path\\": \\"x.safetensors\\", \\"weight\\": 0.5}]}"'
    out = client.predict(text, api_name="/reuse_settings")
    assert list(out)[7:10] == [True, "x.safetensors", 0.5]


def test_switching_an_adapter_on_moves_the_guidance(app_url):
    from gradio_client import Client

    client = Client(app_url[0], verbose=False)
    off = [False, "", 1.0] * 2

    def after(on, path, guidance, weight=1.0):
        return client.predict(on, path, weight, *off, guidance, api_name="/guidance_for_adapters")

    assert after(True, "x.safetensors", 5.0) == 2.0  # the tiny base: 5, and 2 with an adapter on
    assert after(False, "x.safetensors", 2.0) == 5.0  # off again
    assert after(True, "", 5.0) == 5.0  # on, but no adapter picked
    assert after(True, "x.safetensors", 2.0, weight=0.0) == 5.0  # at weight 0 it changes nothing
    assert after(True, "x.safetensors", 6.5) == 6.5  # the person's own guidance stays


# --- training in the app --------------------------------------------------------------------------------

# the Train panel's knobs, in order (see ui/adapters_tab.py)
def adapter_knobs(steps, **over):
    k = dict(kind="lora", placement="attention+ff", name="app_lora", rank=4, preset="diffusers-like", alpha=None,
             rslora=False, steps=steps, batch_size=2, lr=1e-3, sample_every=5, trigger="sks", repeats=1, flip=False,
             caption_dropout=0.0, class_prompt="", class_images=0, train_text_encoder="off", text_encoder_lr=None,
             prior_weight=10.0, trigger_token=True, vram="auto", gradient_checkpointing=False, use_8bit_adam=False)
    k.update(over)
    return list(k.values())


def wait_until_training(job, seconds=120):
    """Until a submitted training job reports its first step."""
    import time

    t0 = time.time()
    while not any(str(o[0]).startswith("Step ") for o in job.outputs()):
        assert time.time() - t0 < seconds and not job.done(), job.outputs()
        time.sleep(0.3)


def upload(client, files, caption):
    from gradio_client import handle_file

    table = client.predict([handle_file(str(f)) for f in files], caption, api_name="/adapter_load_data")
    assert [row[1] for row in table["data"]] == [caption] * len(files)
    return table


def test_train_adapter_then_use_it_in_generate(app_url, star_files):
    from gradio_client import Client

    url, settings = app_url
    client = Client(url, verbose=False)
    table = upload(client, star_files, "a red sks star")
    job = client.submit(table, *adapter_knobs(10), api_name="/train_adapter")
    final = job.result(timeout=600)
    # outputs (the job's State stays on the server): status, loss plot, samples, files
    statuses = [o[0] for o in job.outputs()]
    assert any(s.startswith("Step ") and "loss" in s and "ETA" in s for s in statuses), statuses
    assert final[0].startswith("Finished.") and "Drift on 4 prompts" in final[0], final[0]
    assert final[2], "validation samples were streamed"
    files = [f if isinstance(f, str) else f["path"] for f in final[3]]
    kohya = [f for f in files if f.endswith("app_lora.safetensors")]
    assert kohya, files
    trained = [p for p in (settings.outputs / "trained" / "adapter").rglob("app_lora.safetensors")]
    assert len(trained) == 1
    # the artifact is selectable in Generate at once, and changes the image
    slots = client.predict(api_name="/adapters_refresh")
    assert all(str(trained[0]) in [value for _, value in slot["choices"]] for slot in slots), slots
    base = client.predict("a red circle", "", 5, 8, 5.0, 64, 64, 1, False, None, 1.0, api_name="/generate")
    adapted = client.predict("a red circle", "", 5, 8, 5.0, 64, 64, 1, True, str(trained[0]), 1.0,
                             api_name="/generate")
    assert "Hyperreal:" in adapted[1] and "Hyperreal:" not in base[1]
    with Image.open(base[0][0]["image"]) as a, Image.open(adapted[0][0]["image"]) as b:
        assert a.tobytes() != b.tobytes()
    off = client.predict("a red circle", "", 5, 8, 5.0, 64, 64, 1, False, str(trained[0]), 1.0, api_name="/generate")
    with Image.open(base[0][0]["image"]) as a, Image.open(off[0][0]["image"]) as b:
        assert a.tobytes() == b.tobytes()  # switched off, the base is untouched


def test_train_adapter_with_the_panels_defaults(app_url, star_files):
    """Nothing changed but the step count: the trigger is found in the captions, prior preservation runs on the
    base's known prompts, and the summary has drift, its before/after grid, the trigger and the class images."""
    import json

    from gradio_client import Client

    url, settings = app_url
    client = Client(url, verbose=False)
    table = upload(client, star_files, "a red sks star")
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/train_adapter"]["parameters"]
    args = [p.get("parameter_default") for p in params]  # what the panel shows before anyone touches it
    labels = [p["label"] for p in params]
    args[0] = table
    args[labels.index("Steps")] = 10
    args[labels.index("Name")] = "defaults"
    assert args[labels.index("Trigger phrase (added to captions lacking it)")] == ""
    assert args[labels.index("Class images from the base (0: off)")] == 64
    final = client.submit(*args, api_name="/train_adapter").result(timeout=600)
    assert final[0].startswith("Finished."), final[0]
    assert "trigger: 'sks'" in final[0] and "prior preservation: 64 images" in final[0], final[0]
    assert "Drift on 4 prompts" in final[0] and "Before (top) and after (bottom)" in final[0], final[0]
    assert any("before (top" in (item.get("caption") or "") for item in final[2]), final[2]
    run = next((settings.outputs / "trained" / "adapter").glob("*-defaults"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trigger"] == "sks" and summary["class_images"] == 64 and summary["steps"] == 10
    assert summary["drift"] >= 0 and Path(summary["drift_grid"]).is_file()
    assert summary["guidance"] == 2.0 and "start at guidance 2" in final[0], final[0]


def test_stop_keeps_the_checkpoint(app_url, star_files):
    from gradio_client import Client

    url, settings = app_url
    client = Client(url, verbose=False)
    table = upload(client, star_files, "a blue sks star")
    job = client.submit(table, *adapter_knobs(3000, name="stopped", sample_every=0), api_name="/train_adapter")
    wait_until_training(job)
    said = client.predict(api_name="/stop_adapter")
    assert "Stopping" in said
    final = job.result(timeout=120)
    assert final[0].startswith("Stopped early"), final[0]
    run = next((settings.outputs / "trained" / "adapter").glob("*-stopped"))
    checkpoints = list((run / "checkpoints").glob("step-*"))
    assert checkpoints and int(checkpoints[0].name.split("-")[1]) < 3000
    assert (run / "stopped.safetensors").is_file()


def test_user_cannot_name_files_outside_the_allowed_folders(app_url):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(app_url[0], verbose=False)
    with pytest.raises(AppError, match="is not allowed"):
        client.predict("a red circle", "", 5, 4, 5.0, 64, 64, 1, True, "/etc/passwd", 1.0, api_name="/generate")



def generate_args(prompt="a red circle", seed=5, steps=8, adapter=None, controlnet=None, bridge=None, guess=False):
    """/generate's inputs in order: base knobs, 3 adapter slots, ControlNet (guess mode + 2 units), bridge."""
    args = [prompt, "", seed, steps, 5.0, 64, 64, 1]
    args += [True, adapter, 1.0] if adapter else [False, "", 1.0]
    args += [False, "", 1.0] * 2
    args += [guess]
    args += [True, controlnet, 1.0, 0.0, 1.0] if controlnet else [False, "", 1.0, 0.0, 1.0]
    args += [False, "", 1.0, 0.0, 1.0]
    args += [True, bridge, 1.0] if bridge else [False, "", 1.0]
    return args


def image_bytes(result):
    with Image.open(result[0][0]["image"]) as im:
        return im.tobytes()


def test_train_controlnet_then_use_it_with_a_previewed_map(app_url, scene_files):
    from gradio_client import Client, handle_file

    url, settings = app_url
    client = Client(url, verbose=False)
    table = client.predict([handle_file(str(f)) for f in scene_files], "a red circle", api_name="/controlnet_load_data")
    knobs = ["canny", 100, 200, "app_cn", 10, 2, 1e-4, 0.5, 5, "auto", False, False]
    job = client.submit(table, *knobs, api_name="/train_controlnet")
    final = job.result(timeout=600)
    statuses = [o[0] for o in job.outputs()]
    assert any(s.startswith("Step ") and "loss" in s for s in statuses), statuses
    assert final[0].startswith("Finished."), final[0]
    names = [Path(f if isinstance(f, str) else f["path"]).name for f in final[3]]
    assert "app_cn.safetensors" in names and "config.json" in names, names
    trained = next((settings.outputs / "trained" / "controlnet").glob("*-app_cn")) / "controlnet"
    assert trained.is_dir()
    # the map is made (and shown) from an uploaded picture before generating
    shown, note = client.predict("canny", handle_file(str(scene_files[0])), None, 100, 200, "just resize", 64, 64,
                                 api_name="/controlnet_preview_1")
    assert "Canny" in note or "canny" in note
    with Image.open(shown) as m:
        assert m.size == (64, 64) and max(m.convert("L").getextrema()) == 255
    base = client.predict(*generate_args(), api_name="/generate")
    fresh = client.predict(*generate_args(controlnet=str(trained)), api_name="/generate")
    assert '"controlnet"' in fresh[1].replace("\\", "")
    # 10 steps of training barely move the zero convolutions: close to the base, not necessarily equal
    assert np.abs(np.asarray(Image.open(fresh[0][0]["image"]), float)
                  - np.asarray(Image.open(base[0][0]["image"]), float)).mean() < 30


def test_controlnet_unit_without_a_map_is_a_clear_message(app_url):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(app_url[0], verbose=False)
    with pytest.raises(AppError, match="unit 1 is on but has no map"):
        client.predict(*generate_args(controlnet="tiny-canny"), api_name="/generate")


def test_train_bridge_then_use_it(app_url):
    from gradio_client import Client

    url, settings = app_url
    client = Client(url, verbose=False)
    knobs = ["swap", "shapes", "", "app_bridge", "", 10, 2, 1e-3, 0, 0, 5, "auto", False, False]  # captions only
    job = client.submit({"headers": ["image", "caption"], "data": []}, *knobs, api_name="/train_bridge")
    final = job.result(timeout=600)
    statuses = [o[0] for o in job.outputs()]
    assert any(s.startswith("Step ") for s in statuses), statuses
    assert final[0].startswith("Finished."), final[0]
    trained = [f if isinstance(f, str) else f["path"] for f in final[3]]
    assert trained and trained[0].endswith(".safetensors")
    path = next((settings.outputs / "trained" / "bridge").rglob("*.safetensors"))
    base = client.predict(*generate_args(prompt="a crimson ball"), api_name="/generate")
    bridged = client.predict(*generate_args(prompt="a crimson ball", bridge=str(path)), api_name="/generate")
    assert '"bridge"' in bridged[1].replace("\\", "")
    assert image_bytes(bridged) != image_bytes(base)
