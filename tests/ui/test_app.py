"""The app as a client sees it: launched on the tiny base, driven through gradio_client."""
import socket

import pytest
from PIL import Image

from hyperreal.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tiny, tmp_path_factory, monkeypatch_module):
    from hyperreal.ui.app import build_app, launch

    tmp = tmp_path_factory.mktemp("app")
    monkeypatch_module.setenv("GRADIO_TEMP_DIR", str(tmp / "gradio"))
    settings = Settings(base="tiny", host="127.0.0.1", port=free_port(), outputs=tmp / "outputs")
    demo = build_app(tiny, settings)
    _, url, _ = launch(demo, settings, prevent_thread_lock=True, quiet=True)
    try:
        yield url, settings
    finally:
        demo.close()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


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
    assert list(out) == ["a blue square", "red", 9, 7, 3.5, 64, 64]
