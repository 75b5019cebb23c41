"""The app launched once per test module on the tiny base, and the files its tests upload."""
import contextlib
import socket

import pytest

from hyperreal.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launched(base, tmp, **settings_kwargs):
    """The app on ``base`` at a free port (outputs and Gradio's temp files under ``tmp``): (url, settings)."""
    from hyperreal.ui.app import build_app, launch

    mp = pytest.MonkeyPatch()
    mp.setenv("GRADIO_TEMP_DIR", str(tmp / "gradio"))
    settings = Settings(base="tiny", host="127.0.0.1", port=free_port(), outputs=tmp / "outputs", **settings_kwargs)
    demo = build_app(base, settings)
    _, url, _ = launch(demo, settings, prevent_thread_lock=True, quiet=True)
    try:
        yield url, settings
    finally:
        demo.close()
        mp.undo()


@pytest.fixture(scope="module")
def app_url(tiny, tmp_path_factory):
    with launched(tiny, tmp_path_factory.mktemp("app")) as app:
        yield app


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def star_files(tmp_path_factory):
    from bench.star import star_dataset

    folder = star_dataset(tmp_path_factory.mktemp("stars"), n=4)
    return sorted(folder.glob("*.png"))


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    from hyperreal.datasets import write_examples
    from hyperreal.shapes.world import sample_scene, BASE_SHAPES
    import random

    rng = random.Random(3)
    folder = write_examples(tmp_path_factory.mktemp("scenes"), [sample_scene(rng, BASE_SHAPES) for _ in range(4)])
    return sorted(folder.glob("*.png"))
