"""How named models are found (one resolver for every method), what their headers say, and the per-base cache."""
import pytest
import torch
from safetensors.torch import save_file

from hyperreal import sources
from hyperreal.errors import HyperrealError


def pick_single(folder, source):
    return sources.single_safetensors(folder, source, "thing")


def test_resolve_embedded_folder_file_and_hub(tmp_path):
    emb = sources.resolve("tiny-canny", "controlnet", "ControlNet", lambda f, s: sources.Source("folder", str(f)))
    assert emb.how == "folder" and emb.artifact is not None and emb.artifact.name == "tiny-canny"
    f = tmp_path / "a.safetensors"
    save_file({"x": torch.zeros(1)}, f)
    assert sources.resolve(str(f), "adapter", "thing", pick_single) == sources.Source("file", str(f))
    assert sources.resolve(str(tmp_path), "adapter", "thing", pick_single).where == str(f)  # the one file inside
    assert sources.resolve("owner/name", "adapter", "thing", pick_single) == sources.Source("hub", "owner/name")


@pytest.mark.parametrize("name, words", [
    ("model.ckpt", "only .safetensors files are read"),  # an existing pickle is refused before any loader
    ("missing.safetensors", "is not an existing file or folder, or a hub id"),
    ("../x/y", "is not an existing file or folder"),
    ("", "must be named"),
])
def test_resolve_refuses_with_a_message(tmp_path, monkeypatch, name, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.ckpt").write_bytes(b"not a pickle we would ever open")
    with pytest.raises(HyperrealError, match=words):
        sources.resolve(name, "adapter", "thing", pick_single)


def test_hub_ids_refused_where_a_method_takes_none(tmp_path):
    with pytest.raises(HyperrealError, match="is not an existing file or folder$"):
        sources.resolve("owner/name", "bridge", "thing", pick_single, hub=False)
    assert not sources.is_hub_id("../etc") and not sources.is_hub_id("/abs/path") and sources.is_hub_id("a/b.c")


def test_folder_with_several_files_asks_for_one(tmp_path):
    for n in ("a", "b"):
        save_file({"x": torch.zeros(1)}, tmp_path / f"{n}.safetensors")
    with pytest.raises(HyperrealError, match="holds 2 .safetensors files"):
        sources.resolve(str(tmp_path), "adapter", "thing", pick_single)


def test_read_header_and_unreadable_file(tmp_path):
    f = tmp_path / "a.safetensors"
    save_file({"x": torch.zeros(2), "y": torch.ones(1)}, f, metadata={"k": "v"})
    assert sources.read_header(f) == ({"k": "v"}, ["x", "y"])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(HyperrealError, match="not a readable .safetensors file"):
        sources.read_header(bad)


def test_identity_changes_when_a_file_is_rewritten(tmp_path):
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"1")
    before = sources.identity(f)
    import os

    os.utime(f, ns=(1, 10**9))
    assert sources.identity(f) != before and sources.identity(tmp_path) != ""


def test_per_base_cache_is_lru_drops_evicted_and_a_failed_load_evicts_nothing():
    class Owner:
        pass

    owner, dropped, loads = Owner(), [], []
    cache = sources.PerBaseCache(2, drop=dropped.append)

    def load(v):
        def f():
            loads.append(v)
            return v
        return f

    assert cache.get(owner, "a", load("A")) == "A" and cache.get(owner, "b", load("B")) == "B"
    assert cache.get(owner, "a", load("A2")) == "A"  # cached, and now the most recent
    cache.get(owner, "c", load("C"))
    assert dropped == ["B"] and loads == ["A", "B", "C"]

    def broken():
        raise HyperrealError("no")

    with pytest.raises(HyperrealError):
        cache.get(owner, "d", broken)
    assert list(cache.entries(owner)) == ["a", "c"] and dropped == ["B"]
    assert cache.get(Owner(), "a", load("other")) == "other"  # another base has its own entries
