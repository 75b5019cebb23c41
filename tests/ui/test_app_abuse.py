"""The app as an attacker or a careless visitor drives it through gradio_client: chosen session ids, paths to
server folders, damaged images, zip bombs, zero learning rates; and generation served while a run trains."""
import io
import tempfile
import threading
import time
import uuid
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from .test_app import adapter_knobs, generate_args, upload, wait_until_training


def client_for(url, session_hash=None):
    from gradio_client import Client

    client = Client(url, verbose=False)
    if session_hash is not None:
        client.session_hash = session_hash  # a visitor chooses it; the server must not trust it
    return client


def workroots(api="adapter"):
    return list(Path(tempfile.gettempdir()).glob(f"hyperreal-{api}-*"))


def test_session_hash_cannot_leave_the_uploads_folder(app_url, star_files):
    from gradio_client import handle_file

    url, _ = app_url
    escaped = f"escaped-{uuid.uuid4().hex[:8]}"
    client = client_for(url, f"../{escaped}")
    table = client.predict([handle_file(str(star_files[0]))], "a red sks star", api_name="/adapter_load_data")
    assert len(table["data"]) == 1  # the upload itself works
    assert not (Path(tempfile.gettempdir()) / escaped).exists()  # ... but inside the panel's own folder
    stored = [p for root in workroots() for p in root.rglob("uploads/*.png")]
    assert any(p.name == table["data"][0][0] for p in stored)


def test_a_session_cannot_read_another_sessions_uploads(app_url, star_files):
    from gradio_client.exceptions import AppError

    url, _ = app_url
    victim = client_for(url)
    table = upload(victim, star_files[:2], "a private sks star")
    # the attacker names the victim's folder through its own session id, then asks to train on the victim's files
    for hash_ in (f"x/../{victim.session_hash}", f"../{workroots()[0].name}/{victim.session_hash}"):
        attacker = client_for(url, hash_)
        with pytest.raises(AppError, match="is not one of the uploaded images"):
            attacker.predict(table, *adapter_knobs(10), api_name="/train_adapter")


def test_bridge_extra_encoder_must_be_a_hub_id_or_in_the_models_folder(app_url):
    from gradio_client.exceptions import AppError

    client = client_for(app_url[0])
    for folder in ("/etc", "~", str(Path(__file__).parent)):
        knobs = ["fuse", "shapes", folder, "evil", "", 10, 2, 1e-3, 0, 0, 0, "auto", False, False]
        with pytest.raises(AppError, match="is not allowed"):
            client.predict({"headers": ["image", "caption"], "data": []}, *knobs, api_name="/train_bridge")


def damaged_images(tmp: Path) -> dict[str, Path]:
    """Files that are not usable images, each as a visitor could send it."""
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, "PNG")
    files = {"empty.png": b"", "notes.png": b"just some text, not a picture\n",
             "truncated.png": buf.getvalue()[: len(buf.getvalue()) // 3]}
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, "PNG")  # 400 megapixels that compress to a few kB
    files["bomb.png"] = bomb.getvalue()
    out = {}
    for name, data_ in files.items():
        (tmp / name).write_bytes(data_)
        out[name] = tmp / name
    return out


def test_damaged_uploads_are_named_in_a_message(app_url, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client = client_for(app_url[0])
    for name, path in damaged_images(tmp_path).items():
        with pytest.raises(AppError, match=f"'{name}' cannot be read|'{name}' is .* pixels"):
            client.predict([handle_file(str(path))], "a caption", api_name="/adapter_load_data")
        # a condition map's source picture, checked by the same loader
        with pytest.raises(AppError, match="cannot be read|pixels"):
            client.predict("canny", handle_file(str(path)), None, 100, 200, "just resize", 64, 64,
                           api_name="/controlnet_preview_1")


def test_zip_bomb_upload_is_refused_and_leaves_nothing(app_url, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    bomb = tmp_path / "photos.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("photos/a.png", b"\0" * (64 * 1024 * 1024))  # 64 MB that deflate to ~64 kB
    assert bomb.stat().st_size < 200_000
    client = client_for(app_url[0])
    with pytest.raises(AppError, match="zip bomb"):
        client.predict([handle_file(str(bomb))], "a caption", api_name="/adapter_load_data")
    leftovers = [p for root in workroots() for p in root.rglob("zip-*")]
    assert leftovers == []


def test_zero_learning_rate_is_refused_not_replaced(app_url, star_files):
    from gradio_client.exceptions import AppError

    client = client_for(app_url[0])
    table = upload(client, star_files[:1], "a red sks star")
    with pytest.raises(AppError, match="learning rate"):
        client.predict(table, *adapter_knobs(10, lr=0), api_name="/train_adapter")


def test_generation_is_served_while_a_run_trains(app_url, star_files):
    """A run of thousands of steps holds the training queue; generate calls are still answered, in seconds."""
    url, _ = app_url
    trainer = client_for(url)
    table = upload(trainer, star_files, "a green sks star")
    job = trainer.submit(table, *adapter_knobs(5000, name="long", sample_every=0), api_name="/train_adapter")
    wait_until_training(job)
    try:
        times, errors = [], []

        def one(i):
            start = time.time()
            try:
                client_for(url).predict(*generate_args(seed=i, steps=4), api_name="/generate")
                times.append(time.time() - start)
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors, errors
        assert len(times) == 6
        assert not job.done(), "the run was still training while every generate call was answered"
    finally:
        trainer.predict(api_name="/stop_adapter")
        job.result(timeout=120)
