import pytest

from hyperreal.errors import HyperrealError
from hyperreal.loading import SD15, load_base, resolve_base


def test_auto_is_tiny_without_cuda(monkeypatch):
    monkeypatch.delenv("HYPERREAL_BASE", raising=False)
    assert resolve_base(None) == "tiny"
    assert resolve_base("auto") == "tiny"
    monkeypatch.setenv("HYPERREAL_BASE", SD15)
    assert resolve_base(None) == SD15


def test_tiny_loads_frozen_on_cpu(tiny):
    assert tiny.name == "tiny" and str(tiny.device) == "cpu"
    assert not any(p.requires_grad for p in tiny.pipe.unet.parameters())
    assert tiny.defaults["width"] == 64


@pytest.mark.parametrize("base, words", [
    ("someone/not-a-model", "not in the local Hugging Face cache"),
    ("./missing-folder", "no such folder"),
    ("model.safetensors", "no such file"),
    ("model.ckpt", "pickled .ckpt files are never loaded"),
])
def test_unloadable_bases_explain_themselves(base, words):
    with pytest.raises(HyperrealError) as e:
        load_base(base)
    msg = str(e.value)
    assert base in msg and words in msg and "--base tiny" in msg
