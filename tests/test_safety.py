"""hyperreal.safety (plain names, paths kept inside their folder, bounded unzipping) and the parsers that take what
a person sends: dataset folders (load_examples) and generation jobs (job_from_dict)."""
import io
import json
import os
import posixpath
import struct
import tempfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from hyperreal import datasets, safety
from hyperreal.errors import HyperrealError
from hyperreal.generation import MAX_SEED, MAX_SIDE, MAX_STEPS, GenerationJob, job_from_dict
from hyperreal.safety import component, sanitized, unzip, within


def fast(n: int):
    """Few examples, no deadline, no example database written into the checkout."""
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# --- names and paths ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../x", "a/b", "", "..", ".", "/etc/passwd", "a\x00b", "x/..", "a\\..\\b",
                                  "..hidden", ".bashrc", "a" * 200, None, 3])
def test_component_refuses(name):
    with pytest.raises(HyperrealError, match="run name"):
        component(name, "run name")


@pytest.mark.parametrize("name", ["my_run-1.v2", "photo 01.png", "état"])
def test_component_accepts(name):
    assert component(name, "run name") == name


@fast(200)
@given(st.text(max_size=40))
def test_component_accepts_only_single_plain_names(name):
    try:
        got = component(name, "x")
    except HyperrealError:
        return
    assert got == name and Path(name).name == name and name not in (".", "..")
    assert "/" not in name and "\\" not in name and "\x00" not in name and not Path(name).is_absolute()
    root = Path("/srv/root")
    assert (root / name).parent == root


def test_sanitized():
    s = sanitized("../../etc")
    assert "/" not in s and ".." not in s and s != "etc"  # neither leaves the folder nor lands on another's
    assert component(s, "id") == s
    assert sanitized(None) == sanitized("") == "anon" and sanitized("", fallback="x") == "x"
    assert sanitized("3f9a_b-C") == "3f9a_b-C"  # a plain id (Gradio's session hash) stays as it is


@fast(200)
@given(st.one_of(st.none(), st.text(max_size=100)))
def test_sanitized_is_always_a_safe_folder_name(text):
    s = sanitized(text)
    assert 1 <= len(s) <= 64 and all(c.isascii() and (c.isalnum() or c in "_-") for c in s)
    assert Path(s).name == s and ".." not in s and "/" not in s
    assert s == sanitized(text)  # the same id, the same folder


def test_within(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (root / "sub" / "ok.txt").write_text("ok")
    assert within(root / "sub" / "ok.txt", root) == (root / "sub" / "ok.txt").resolve()
    assert within(root, root) == root.resolve()
    assert within(root / "not-yet.txt", root) == (root / "not-yet.txt").resolve()  # need not exist
    assert within(outside / "secret.txt", root, outside) == (outside / "secret.txt").resolve()
    (root / "link.txt").symlink_to(outside / "secret.txt")
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    (root / "inner").symlink_to(root / "sub", target_is_directory=True)
    for bad in (root / "link.txt", root / "linkdir" / "secret.txt", root / ".." / "outside" / "secret.txt",
                root / "sub" / ".." / ".." / "outside", Path("/etc/passwd"), tmp_path / "rootx"):
        with pytest.raises(HyperrealError, match="is not allowed: it is outside"):
            within(bad, root, what="the image")
    assert within(root / "inner" / "ok.txt", root) == (root / "sub" / "ok.txt").resolve()  # a link inside is fine


def test_within_nul_is_a_clear_refusal(tmp_path):
    with pytest.raises(HyperrealError):
        within(tmp_path / "a\x00b", tmp_path)


# --- unzip ----------------------------------------------------------------------------------------------------

def _zip(path: Path, entries: dict, method=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", method) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


def test_zip_of_one_folder_returns_that_folder(tmp_path):
    z = _zip(tmp_path / "set.zip", {"set/a.txt": "a", "set/sub/b.txt": "b", "__MACOSX/set/._a.txt": "junk"})
    got = unzip(z, tmp_path / "into")
    assert got == tmp_path / "into" / "set"
    assert (got / "a.txt").read_text() == "a" and (got / "sub" / "b.txt").read_text() == "b"
    flat = _zip(tmp_path / "flat.zip", {"a.txt": "a", "b.txt": "b"})
    assert unzip(flat, tmp_path / "into2") == tmp_path / "into2"


def test_unzip_replaces_what_was_there(tmp_path):
    (tmp_path / "into").mkdir()
    (tmp_path / "into" / "stale.txt").write_text("old")
    unzip(_zip(tmp_path / "a.zip", {"a.txt": "a"}), tmp_path / "into")
    assert sorted(p.name for p in (tmp_path / "into").iterdir()) == ["a.txt"]


def test_zip_bomb_is_refused_and_nothing_is_left(tmp_path):
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as f:
        f.writestr("zeros.png", bytes(50 * 1024 * 1024))
    assert z.stat().st_size < 200_000
    with pytest.raises(HyperrealError, match=r"bomb\.zip: 'zeros\.png' expands \d+ times"):
        unzip(z, tmp_path / "into")
    assert not (tmp_path / "into").exists()


def test_too_many_files_refused_and_cleaned(tmp_path, monkeypatch):
    monkeypatch.setattr(safety, "MAX_UNZIP_FILES", 3)
    z = _zip(tmp_path / "many.zip", {f"f{i}.txt": "x" for i in range(4)})
    with pytest.raises(HyperrealError, match="many.zip holds 4 files; at most 3"):
        unzip(z, tmp_path / "into")
    assert not (tmp_path / "into").exists()
    assert unzip(_zip(tmp_path / "ok.zip", {f"f{i}.txt": "x" for i in range(3)}), tmp_path / "into").is_dir()


def test_too_many_bytes_refused_and_cleaned(tmp_path, monkeypatch):
    monkeypatch.setattr(safety, "MAX_UNZIP_BYTES", 10_000)
    z = _zip(tmp_path / "big.zip", {f"f{i}.bin": os.urandom(4000) for i in range(3)})  # under the ratio limit
    with pytest.raises(HyperrealError, match="big.zip unpacks to more than"):
        unzip(z, tmp_path / "into")
    assert not (tmp_path / "into").exists()


def _patch_sizes(z: Path, file_size: int) -> None:
    """Make the local and central headers of the (only) entry claim ``file_size`` bytes uncompressed."""
    b = bytearray(z.read_bytes())
    local, central = b.find(b"PK\x03\x04"), b.find(b"PK\x01\x02")
    b[local + 22:local + 26] = struct.pack("<I", file_size)
    b[central + 24:central + 28] = struct.pack("<I", file_size)
    z.write_bytes(bytes(b))


def test_lying_size_header_is_refused_and_cleaned(tmp_path, monkeypatch):
    monkeypatch.setattr(safety, "MAX_UNZIP_BYTES", 1000)
    z = _zip(tmp_path / "liar.zip", {"a.bin": os.urandom(5000)}, zipfile.ZIP_STORED)
    _patch_sizes(z, 500)  # says 500 bytes, holds 5000
    with pytest.raises(HyperrealError, match="liar.zip"):
        unzip(z, tmp_path / "into")
    assert not (tmp_path / "into").exists()


@pytest.mark.parametrize("evil", ["../evil.txt", "ok/../../evil.txt", "../../evil.txt"])
def test_zip_slip_refused_nothing_written_outside(tmp_path, evil):
    work = tmp_path / "work"
    work.mkdir()
    z = _zip(work / "slip.zip", {"fine.txt": "fine", evil: "pwned"})
    with pytest.raises(HyperrealError, match="slip.zip: the entry .* is outside"):
        unzip(z, work / "into")
    assert not (work / "into").exists()
    assert not list(tmp_path.rglob("evil.txt")) and not (tmp_path.parent / "evil.txt").exists()


def test_absolute_entry_refused(tmp_path):
    target = tmp_path / "abs_evil.txt"
    z = _zip(tmp_path / "abs.zip", {str(target): "pwned"})
    with pytest.raises(HyperrealError, match="is outside"):
        unzip(z, tmp_path / "into")
    assert not target.exists() and not (tmp_path / "into").exists()


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04 truncated"])
def test_non_zip_is_a_clear_message(tmp_path, content):
    p = tmp_path / "photos.zip"
    p.write_bytes(content)
    with pytest.raises(HyperrealError, match="photos.zip is not a readable .zip file"):
        unzip(p, tmp_path / "into")
    assert not (tmp_path / "into").exists()


def _encrypted(z: Path) -> None:
    b = bytearray(z.read_bytes())
    b[b.find(b"PK\x03\x04") + 6] |= 1
    b[b.find(b"PK\x01\x02") + 8] |= 1
    z.write_bytes(bytes(b))


def _deflate64(z: Path) -> None:  # what Windows' zipper writes for large files; Python cannot read it
    b = bytearray(z.read_bytes())
    local, central = b.find(b"PK\x03\x04"), b.find(b"PK\x01\x02")
    b[local + 8:local + 10] = b[central + 10:central + 12] = struct.pack("<H", 9)
    z.write_bytes(bytes(b))


@pytest.mark.parametrize("case", ["file-then-folder", "folder-then-file", "dot", "long-name", "encrypted", "deflate64"])
def test_unreadable_entries_are_a_clear_message(tmp_path, case):
    entries = {"file-then-folder": {"a": "x", "a/b.txt": "y"}, "folder-then-file": {"a/b.txt": "y", "a": "x"},
               "dot": {"sub/..": "x"}, "long-name": {"x" * 300: "x"}}.get(case, {"a.txt": "x"})
    z = _zip(tmp_path / "odd.zip", entries)
    {"encrypted": _encrypted, "deflate64": _deflate64}.get(case, lambda z: None)(z)
    try:
        unzip(z, tmp_path / "into")
    except HyperrealError:
        pass
    finally:
        assert not (tmp_path / "into").exists()  # cleaned up in every case (this part holds today)


def _clash(names: list[str]) -> bool:
    """An entry that is the folder of another, or the unpacking folder itself (refused, see above)."""
    norm = [posixpath.normpath(n) for n in names]
    return "." in norm or any(b.startswith(a + "/") for a in norm for b in norm)


@fast(60)
@given(st.dictionaries(st.text(st.sampled_from("ab./\\_-~ \x00é"), min_size=1, max_size=12), st.binary(max_size=20),
                       max_size=5))
def test_unzip_property_inside_or_refused(tmp_path, entries):
    assume(all(n.split("\x00")[0] for n in entries))  # zipfile cuts names at NUL; an empty name it cannot write
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        d = Path(d)
        z = d / "x.zip"
        with zipfile.ZipFile(z, "w") as f:
            for name, data in entries.items():
                f.writestr(name, data)
        with zipfile.ZipFile(z) as f:
            assume(not _clash([i.filename for i in f.infolist() if not i.is_dir()]))
        into = d / "box" / "into"
        try:
            got = unzip(z, into)
        except HyperrealError:
            assert not into.exists()
        else:
            assert got == into or got.parent == into
        written = {p.resolve() for p in d.rglob("*") if p.is_file()}
        assert all(p == z or into.resolve() in p.parents for p in written), written


# --- datasets: random folders for load_examples ---------------------------------------------------------------

def _png(size=(4, 4), colour=(200, 30, 30)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", size, colour).save(b, "PNG")
    return b.getvalue()


PNG = _png()
JPG = (lambda b: (Image.new("RGB", (5, 3), (0, 90, 0)).save(b, "JPEG"), b.getvalue())[1])(io.BytesIO())
# names a metadata row may give: real files, a folder, missing files, escapes (.., absolute, symlink)
NAMES = ["a.png", "b.jpg", "sub/c.png", "sub", ".", "", "missing.png", "bad.png", "../outside.png",
         "sub/../../outside.png", "link.png", "linkdir/outside.png", "OUTSIDE_ABS", "a.png/", "./a.png", "~/a.png"]
# random text for names, NUL and over-long names included
name_text = (st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
             | st.text(st.sampled_from("ab/._~"), min_size=250, max_size=400))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)
name_values = st.sampled_from(NAMES) | name_text | json_values
text_values = st.text(max_size=40) | json_values
rows = st.fixed_dictionaries({}, optional={"file_name": name_values, "text": text_values, "caption": text_values,
                                            "conditioning_image": name_values, "junk": json_values})
lines = st.one_of(rows.map(json.dumps), rows.map(lambda r: json.dumps(r, ensure_ascii=False)),
                  json_values.map(json.dumps), st.text(max_size=30), st.just(""))
good_row = st.fixed_dictionaries({"file_name": st.sampled_from(["a.png", "b.jpg", "sub/c.png", "./a.png"]),
                                  "text": st.text(max_size=20)},
                                 optional={"conditioning_image": st.sampled_from(["a.png", "sub/c.png", "", None])})
metadata = st.one_of(st.lists(lines, max_size=5).map(lambda ls: "\n".join(ls).encode("utf-8")),
                     st.lists(good_row.map(json.dumps) | lines, min_size=1, max_size=4).map(
                         lambda ls: "\n".join(ls).encode("utf-8")),
                     st.lists(good_row.map(json.dumps), min_size=1, max_size=4).map(
                         lambda ls: "\r\n".join(ls).encode("utf-8")),
                     st.binary(max_size=60))
caption_bytes = st.text(max_size=20).map(str.encode) | st.text(max_size=20).map(str.encode) | st.binary(max_size=20)
# captions for a.png, b.jpg, bad.png (not an image), sub (a folder), link.png (leads outside), ...
captions = st.fixed_dictionaries({}, optional={s: caption_bytes for s in ["a", "b", "bad", "zz", "outside", "sub",
                                                                          "link"]})


def _dataset(root: Path) -> Path:
    """root/data: a.png b.jpg sub/c.png bad.png (text), link.png -> ../outside.png, linkdir -> root;
    root/outside.png (+ .txt) is what must never be read."""
    data = root / "data"
    (data / "sub").mkdir(parents=True)
    (root / "outside.png").write_bytes(_png(colour=(1, 2, 3)))
    (root / "outside.txt").write_text("SECRET")
    (data / "a.png").write_bytes(PNG)
    (data / "b.jpg").write_bytes(JPG)
    (data / "sub" / "c.png").write_bytes(PNG)
    (data / "bad.png").write_text("not an image")
    (data / "link.png").symlink_to(root / "outside.png")
    (data / "linkdir").symlink_to(root, target_is_directory=True)
    return data


@pytest.fixture
def read_spy(monkeypatch):
    """Every file load_examples reads as an image or a caption."""
    seen = []
    real_open, real_read = datasets.open_image, datasets.read_text

    def spy_open(source, what=None):
        seen.append(Path(source))
        return real_open(source, what)

    def spy_read(path, what=None):
        seen.append(Path(path))
        return real_read(path, what)

    monkeypatch.setattr(datasets, "open_image", spy_open)
    monkeypatch.setattr(datasets, "read_text", spy_read)
    return seen


def _check_load(data: Path, seen: list) -> list | None:
    seen.clear()
    try:
        got = datasets.load_examples(data)
    except HyperrealError:
        got = None
    inside = data.resolve()
    for p in seen:  # neither the escapes nor a symlink to outside.png are read
        assert p.resolve() == inside or inside in p.resolve().parents, p
    if got is not None:
        assert got and all(isinstance(e, datasets.Example) and isinstance(e.text, str) for e in got)
        for e in got:
            for p in filter(None, (e.image, e.conditioning_image)):
                assert p.is_file() and inside in p.resolve().parents
    return got


@fast(120)
@given(metadata)
def test_random_metadata_jsonl(tmp_path, read_spy, meta):
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        data = _dataset(Path(d))
        (data / "metadata.jsonl").write_bytes(meta.replace(b"OUTSIDE_ABS", str(Path(d) / "outside.png").encode()))
        event("loaded" if _check_load(data, read_spy) else "refused")


@fast(80)
@given(captions, st.booleans(), st.booleans(), st.booleans())
def test_random_caption_files(tmp_path, read_spy, caps, without_bad, with_link, complete):
    if complete:  # every image but bad.png and link.png captioned
        caps = {"a": b"a red circle", "b": b"\xef\xbb\xbfa blue square", **caps}
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        data = _dataset(Path(d))
        if without_bad:
            (data / "bad.png").unlink()
        if not with_link:  # captioned or not, a link out of the folder is refused
            (data / "link.png").unlink()
        for stem, text in caps.items():
            (data / f"{stem}.txt").write_bytes(text)
        event("loaded" if _check_load(data, read_spy) else "refused")


@fast(60)
@given(st.lists(st.tuples(st.sampled_from(["a.png", "b.jpg", "sub/c.png"]),
                          st.text(st.characters(blacklist_characters="\x85\u2028\u2029",
                                                blacklist_categories=("Cs",)), min_size=1, max_size=30)),
                min_size=1, max_size=4),
       st.booleans())
def test_well_formed_metadata_loads_exactly(tmp_path, pairs, ascii_only):
    assume(all(t.strip() for _, t in pairs))
    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        data = _dataset(Path(d))
        (data / "metadata.jsonl").write_text(
            "".join(json.dumps({"file_name": n, "text": t}, ensure_ascii=ascii_only) + "\n" for n, t in pairs),
            encoding="utf-8")
        got = datasets.load_examples(data)
        assert [(e.image, e.text) for e in got] == [((data / n).resolve(), t.strip()) for n, t in pairs]


def test_caption_folder_symlink_out_is_refused(tmp_path, read_spy):
    data = _dataset(tmp_path)
    (data / "bad.png").unlink()
    for stem in ("a", "b", "link"):
        (data / f"{stem}.txt").write_text("a red circle")
    _check_load(data, read_spy)


def test_metadata_caption_with_line_separator(tmp_path):
    data = _dataset(tmp_path)
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "one\u2028two"},
                                                    ensure_ascii=False) + "\n", encoding="utf-8")
    assert [e.text for e in datasets.load_examples(data)] == ["one\u2028two"]


@pytest.mark.parametrize("line", [json.dumps({"file_name": "a\x00.png", "text": "x"}),
                                  json.dumps({"file_name": "n" * 300 + ".png", "text": "x"}),
                                  '{"file_name": "a.png", "text": "x", "n": ' + "1" * 5000 + "}",
                                  "[" * 100_000])
def test_metadata_odd_values_are_a_clear_message(tmp_path, line):
    data = _dataset(tmp_path)
    (data / "metadata.jsonl").write_text(line + "\n")
    with pytest.raises(HyperrealError):
        datasets.load_examples(data)


# --- jobs: random dicts for job_from_dict ---------------------------------------------------------------------

SCHEMA = ["prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height", "adapters", "bridge",
          "controlnet"]


@pytest.fixture(scope="module")
def job_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("jobfiles")
    (d / "map.png").write_bytes(_png((16, 16)))
    (d / "bad.png").write_text("no")
    (d / "x.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return d


# paths a job may name: embedded models, files, folders, hub ids, nonsense, '~user', NUL, over-long names
short_text = (st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
              | st.text(st.sampled_from("ab/._~"), min_size=250, max_size=400))
PATHS = ["tiny-bridge", "tiny-canny", "tiny", "tiny-bridge:nope", "owner/name", "JOB/map.png", "JOB/bad.png",
         "JOB/x.safetensors", "JOB", "JOB/missing.png", "", " ", ".", "/"]
path_values = st.sampled_from(PATHS) | short_text
numbers = st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
job_json = st.recursive(st.none() | st.booleans() | numbers | short_text,
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(short_text, inner, max_size=3),
                        max_leaves=5)
unit = st.dictionaries(st.sampled_from(["path", "image", "scale", "start", "end", "preprocess", "resize_mode",
                                        "guess_mode", "canny_low", "canny_high", "weight", "junk"]),
                       path_values | numbers | st.booleans() | st.sampled_from(["canny", "none", "crop and resize"]),
                       max_size=6)
# values that are wrong in every way (any JSON), and values that are mostly right (so valid jobs are common too)
wild = {
    "prompt": short_text | job_json, "negative_prompt": short_text | job_json,
    "seed": st.integers(-5, 2**33) | job_json, "steps": st.integers(-5, 300) | job_json,
    "guidance": numbers | job_json, "width": st.integers(-16, 4096) | job_json,
    "height": st.sampled_from([8, 64, 512, 2048, 2056, 7]) | job_json,
    "adapters": st.lists(unit, max_size=2) | job_json, "bridge": unit | job_json,
    "controlnet": st.lists(unit, max_size=2) | job_json,
}
def mostly(right, edge):
    """``right`` three times in four, else ``edge``."""
    return st.integers(0, 3).flatmap(lambda i: right if i else edge)


weight = mostly(st.floats(0, 2) | st.integers(0, 2), st.floats(-5, 5) | st.integers(-5, 5))
cn_unit = st.fixed_dictionaries(
    {"path": mostly(st.just("tiny-canny"), st.sampled_from(["owner/name", "JOB", "JOB/x.safetensors", "nope"])),
     "image": mostly(st.just("JOB/map.png"), st.sampled_from(["JOB/bad.png", "JOB/missing.png", "JOB"]))},
    optional={"scale": weight, "start": mostly(st.floats(0, 0.4), st.floats(-1, 2)),
              "end": mostly(st.floats(0.6, 1), st.floats(-1, 2)),
              "preprocess": st.sampled_from(["none", "canny", "softedge", "pose", "blur"]),
              "resize_mode": st.sampled_from(["crop and resize", "just resize", "resize and fill", "stretch"]),
              "guess_mode": st.booleans() | st.just(1), "canny_low": mostly(st.integers(0, 100), st.integers(-1, 1001)),
              "canny_high": mostly(st.integers(150, 1000), st.integers(-1, 1001))})
side = mostly(st.sampled_from([None, 8, 64, 512, MAX_SIDE]), st.sampled_from([MAX_SIDE + 8, 0, 12, -8]))
good = {
    "prompt": mostly(st.sampled_from(["a red circle", "a blue square on the left"]),
                     st.sampled_from([" ", ""]) | short_text),
    "negative_prompt": short_text,
    "seed": mostly(st.integers(0, MAX_SEED), st.sampled_from([-1, MAX_SEED + 1])),
    "steps": mostly(st.none() | st.integers(1, MAX_STEPS), st.sampled_from([0, MAX_STEPS + 1])),
    "guidance": mostly(st.none() | st.floats(0, 30) | st.integers(0, 30), st.floats(-1, 31)),
    "width": side, "height": side,
    "adapters": st.lists(st.fixed_dictionaries({"path": path_values}, optional={"weight": weight}), max_size=2),
    "bridge": st.fixed_dictionaries({"path": mostly(st.just("tiny-bridge"), st.sampled_from(
        ["tiny-bridge:nope", "JOB/x.safetensors", "JOB", "missing"]))}, optional={"scale": weight}),
    "controlnet": st.lists(cn_unit, max_size=2),
}


@st.composite
def job_dicts(draw, root: str):
    d = {}
    if draw(st.integers(0, 5)):
        d["prompt"], d["seed"] = "a red circle", 1
    for k in SCHEMA:
        if draw(st.integers(0, 3)) == 0:  # each key in about a quarter of the jobs
            d[k] = draw(good[k] if draw(st.integers(0, 3)) else wild[k])
    if draw(st.integers(0, 9)) == 0:
        d[draw(short_text)] = draw(job_json)  # junk key
    return json.loads(json.dumps(d).replace('"JOB', json.dumps(root)[:-1]))  # JSON values only


@fast(250)
@given(st.data())
def test_random_jobs_are_a_job_or_a_clear_message(job_files, data):
    d = data.draw(job_dicts(str(job_files)))
    try:
        job = job_from_dict(d, "line 7")
    except HyperrealError as e:
        assert str(e).startswith("line 7: ")
        event("refused")
        return
    event("valid job" + (" with methods" if job.adapters or job.bridge or job.controlnet else ""))
    assert isinstance(job, GenerationJob)
    assert isinstance(job.prompt, str) and job.prompt.strip() and isinstance(job.negative_prompt, str)
    assert type(job.seed) is int and 0 <= job.seed <= MAX_SEED
    assert job.steps is None or (type(job.steps) is int and 1 <= job.steps <= MAX_STEPS)
    assert job.guidance is None or (type(job.guidance) is float and 0 <= job.guidance <= 30)
    for side in (job.width, job.height):
        assert side is None or (type(side) is int and 8 <= side <= MAX_SIDE and side % 8 == 0)
    for a in job.adapters or []:
        assert set(a) == {"path", "weight"} and isinstance(a["path"], str) and -4 <= a["weight"] <= 4
    if job.bridge is not None:
        assert set(job.bridge) == {"path", "scale"} and 0 <= job.bridge["scale"] <= 2
    for u in job.controlnet or []:
        assert Path(u["image"]).expanduser().is_file() and 0 <= u["start"] < u["end"] <= 1
    json.dumps(job.__dict__)  # a valid job is plain JSON again (it goes into the PNG's parameters)


@pytest.mark.parametrize("extra", [{"bridge": {"path": "~nosuchuser/b.safetensors"}},
                                   {"bridge": {"path": "b" * 300}},
                                   {"controlnet": [{"path": "~nosuchuser", "image": "x.png"}]},
                                   {"controlnet": [{"path": "tiny-canny", "image": "m" * 300 + ".png"}]},
                                   {"guidance": 10 ** 400}])
def test_job_path_oddities_are_a_clear_message(extra):
    with pytest.raises(HyperrealError):
        job_from_dict({"prompt": "a red circle", "seed": 1, **extra})
