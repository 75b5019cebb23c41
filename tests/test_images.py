"""hyperreal.images.open_image, the one image loader: every way a file can be wrong is a HyperrealError naming the
file; EXIF orientation, 16-bit and transparency are handled; a damaged file in a training folder stops the CLI
with one clear line before anything is trained."""
import functools
import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import skimage.data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from hyperreal import images
from hyperreal.datasets import load_examples
from hyperreal.errors import HyperrealError
from hyperreal.images import open_image

from .conftest import run_cli

def fast(n: int):
    """Few examples, no deadline, no example database written into the checkout."""
    return settings(max_examples=n, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _encoded(arr_or_image, fmt: str, **kw) -> bytes:
    im = arr_or_image if isinstance(arr_or_image, Image.Image) else Image.fromarray(arr_or_image)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's deprecation of saving mode I as PNG
        im.save(buf, fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@functools.lru_cache(maxsize=None)
def bomb_png(width: int, height: int) -> bytes:
    """A valid, all-black 1-bit PNG of width x height: a few dozen KB on disk, width*height pixels decoded."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row * 1000) for _ in range(height // 1000)) + z.compress(row * (height % 1000))
    idat += z.flush()
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


def _refused(path, *words):
    with pytest.raises(HyperrealError) as err:
        open_image(path)
    msg = str(err.value)
    assert path.name in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


# --- probes: each way a file can be wrong ---------------------------------------------------------------------

def test_empty_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    _refused(p, "empty or not an image")


def test_text_file_named_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("these are my notes, not a picture\n")
    _refused(p, "not an image")


def test_missing_file(tmp_path):
    _refused(tmp_path / "gone.png", "does not exist")


@pytest.mark.parametrize("fmt,suffix", [("PNG", "png"), ("JPEG", "jpg")])
@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated(tmp_path, fmt, suffix, keep):
    # the old loaders opened lazily (Image.open, or verify() that reads no pixels): the cut showed up mid-training
    data = _encoded(skimage.data.astronaut(), fmt)
    p = tmp_path / f"astronaut.{suffix}"
    p.write_bytes(data[:int(len(data) * keep)])
    _refused(p, "truncated")


@pytest.mark.parametrize("width,height", [
    (20000, 20000),  # past Pillow's own bomb limit: DecompressionBombError at open
    (10000, 10000),  # between Pillow's warning and its error (the warning is raised as an error)
    (9000, 9000),  # under Pillow's warning, over MAX_PIXELS: the old code decoded all 81 Mpx
])
def test_decompression_bomb(tmp_path, width, height):
    data = bomb_png(width, height)
    assert len(data) < 200_000 and width * height > images.MAX_PIXELS
    p = tmp_path / "bomb.png"
    p.write_bytes(data)
    msg = _refused(p)
    assert "larger than" in msg or f"{width}x{height}" in msg, msg


def test_max_pixels_is_the_limit(tmp_path, monkeypatch):
    p = tmp_path / "small.png"
    p.write_bytes(_encoded(skimage.data.astronaut()[:40, :30], "PNG"))
    assert open_image(p).size == (30, 40)
    monkeypatch.setattr(images, "MAX_PIXELS", 30 * 40 - 1)
    _refused(p, "30x40 pixels", "more than")


def test_bytes_and_file_objects_are_named_by_what(tmp_path):
    with pytest.raises(HyperrealError, match="'upload 3' cannot be read"):
        open_image(b"nope", "upload 3")
    with pytest.raises(HyperrealError, match="'the image' cannot be read"):
        open_image(io.BytesIO(b""))


def test_raised_max_pixels_lets_a_large_image_past_the_size_gate(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 200_000_000)
    # a 100 Mpx header without pixel data: past the size gate it must fail as truncated, not as too large
    header = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 10000, 10000, 1, 0, 0, 0, 0))
              + _chunk(b"IEND", b""))
    p = tmp_path / "big.png"
    p.write_bytes(header)
    _refused(p, "truncated")


# --- what comes back ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("orientation,turns", [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation(tmp_path, orientation, turns):
    original = skimage.data.chelsea()  # 300 x 451, not square
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / "phone.jpg"
    p.write_bytes(_encoded(original, "JPEG", quality=95, exif=exif))
    with Image.open(p) as raw:  # what the old loaders (Image.open(...).convert('RGB')) gave: sideways
        stored = np.asarray(raw.convert("RGB"))
    assert stored.shape == original.shape
    got = open_image(p)
    assert got.mode == "RGB"
    want = np.rot90(original, turns)
    assert got.size == (want.shape[1], want.shape[0])
    assert np.array_equal(np.asarray(got), np.rot90(stored, turns))  # decoded pixels, turned losslessly
    assert np.abs(np.asarray(got, float) - want).mean() < 3  # and the picture is the original, upright


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (8, 1))
    p = tmp_path / "depth16.png"
    p.write_bytes(_encoded(ramp, "PNG"))
    with Image.open(p) as raw:
        assert raw.mode.startswith("I")  # really 16 bits on disk
        clipped = np.asarray(raw.convert("RGB"))  # the old loaders: everything above 255 turns white
    assert (clipped[0, 128:] == 255).all()
    got = np.asarray(open_image(p))
    assert got.shape == (8, 256, 3)
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()
    row = got[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert abs(row[128] - 128) <= 1  # mid-grey stays mid-grey
    assert (np.diff(row) >= 0).all() and abs(row - np.arange(256)).max() <= 1  # the ramp stays a ramp


def test_float_tiff_is_scaled(tmp_path):
    ramp = np.linspace(0.0, 1.0, 64, dtype=np.float32)[None, :].repeat(4, 0)
    p = tmp_path / "float.tif"
    Image.fromarray(ramp, "F").save(p)
    row = np.asarray(open_image(p))[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and abs(row[32] - 130) <= 2


def test_transparency_goes_over_white(tmp_path):
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[:, :10] = (255, 0, 0, 255)  # opaque red | fully transparent black
    rgba[:5, 10:] = (0, 0, 255, 128)  # half-transparent blue
    p = tmp_path / "cutout.png"
    p.write_bytes(_encoded(rgba, "PNG"))
    with Image.open(p) as raw:
        assert (np.asarray(raw.convert("RGB"))[9, 19] == 0).all()  # the old loaders: transparent became black
    got = np.asarray(open_image(p)).astype(int)
    assert (got[:, :10] == (255, 0, 0)).all()
    assert (got[5:, 10:] == 255).all()
    assert np.abs(got[0, 15] - (127, 127, 255)).max() <= 1


def test_palette_with_transparency_and_la(tmp_path):
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    p = tmp_path / "pal.png"
    pal.save(p, transparency=0)
    got = np.asarray(open_image(p))
    assert (got[0, 0] == 255).all() and (got[1, 1] == (0, 255, 0)).all()
    la = np.zeros((4, 4, 2), np.uint8)
    la[..., 0], la[:2, :, 1] = 40, 255  # grey 40: top half opaque, bottom transparent
    p = tmp_path / "la.png"
    p.write_bytes(_encoded(Image.fromarray(la, "LA"), "PNG"))
    got = np.asarray(open_image(p))
    assert (got[:2] == 40).all() and (got[2:] == 255).all()


# --- property tests -------------------------------------------------------------------------------------------

MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "I", "I;16", "F", "CMYK", "YCbCr"]
FORMATS = ["PNG", "TIFF", "WEBP", "JPEG", "BMP", "GIF"]


def _saves(mode: str, fmt: str) -> bool:
    try:
        _encoded(Image.new(mode, (2, 2)), fmt)
        return True
    except Exception:
        return False


PAIRS = [(m, f) for f in FORMATS for m in MODES if _saves(m, f)]


@st.composite
def random_images(draw):
    mode, fmt = draw(st.sampled_from(PAIRS))
    w, h = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    n = len(Image.new(mode, (w, h)).tobytes())
    im = Image.frombytes(mode, (w, h), draw(st.binary(min_size=n, max_size=n)))  # F: NaN and inf too
    if mode == "P":
        im.putpalette(draw(st.binary(min_size=768, max_size=768)))
        if draw(st.booleans()):
            im.info["transparency"] = draw(st.integers(0, 255))
    return im, fmt


def _pillow_decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:
        return False


@fast(150)
@given(random_images())
def test_any_mode_any_format_is_8bit_rgb_of_its_size(case):
    im, fmt = case
    data = _encoded(im, fmt)
    try:
        got = open_image(data, "x")
    except HyperrealError as e:
        assert "'x'" in str(e)
        assert not _pillow_decodes(data), f"{im.mode} as {fmt}: Pillow reads it, open_image refused: {e}"
        return
    assert got.mode == "RGB" and got.size == im.size
    assert np.asarray(got).dtype == np.uint8
    if fmt in ("PNG", "TIFF", "BMP") and im.mode in ("L", "RGB"):  # lossless 8-bit: the pixels themselves
        assert np.array_equal(np.asarray(got), np.asarray(im.convert("RGB")))


@fast(100)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_are_an_image_or_a_clear_error(data):
    try:
        got = open_image(data, "blob")
    except HyperrealError as e:
        assert "'blob'" in str(e)
        return
    assert got.mode == "RGB" and got.width * got.height > 0


_SEEDS = [_encoded(skimage.data.astronaut()[::32, ::32], f) for f in ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP")]


@fast(150)
@given(st.sampled_from(_SEEDS), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255),
                                                    st.sampled_from(["set", "cut", "insert"])), min_size=1, max_size=6))
def test_damaged_real_files_are_an_image_or_a_clear_error(seed, edits):
    data = bytearray(seed)
    for where, byte, how in edits:
        if not data:
            break
        i = int(where * len(data))
        if how == "set":
            data[i] = byte
        elif how == "cut":
            del data[i:]
        else:
            data[i:i] = bytes([byte]) * 4
    try:
        got = open_image(bytes(data), "damaged")
    except HyperrealError as e:
        assert "'damaged'" in str(e)
        return
    assert got.mode == "RGB" and got.width * got.height <= images.MAX_PIXELS


# --- training folders -----------------------------------------------------------------------------------------

def test_cli_training_on_a_bomb_stops_cleanly(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "huge.png").write_bytes(bomb_png(20000, 20000))
    (data / "huge.txt").write_text("a red circle\n")
    out = tmp_path / "out"
    r = run_cli("train", "adapter", "--base", "tiny", "--data", data, "--out", out, "--steps", "1")
    assert r.returncode == 2, r.stderr
    assert "huge.png" in r.stderr and "larger than" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout and "internal error" not in r.stderr
    assert not list(tmp_path.rglob("*.safetensors"))


def _one_image_folder(folder, caption: bytes, name="img"):
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.png").write_bytes(_encoded(skimage.data.astronaut()[::64, ::64], "PNG"))
    (folder / f"{name}.txt").write_bytes(caption)
    return folder


def test_caption_that_is_not_utf8_is_named(tmp_path):
    folder = _one_image_folder(tmp_path / "d", "caf\xe9 au lait\n".encode("latin-1"), "coffee")
    with pytest.raises(HyperrealError) as err:  # the old read_text raised UnicodeDecodeError
        load_examples(folder)
    assert "coffee.txt" in str(err.value) and "UTF-8" in str(err.value)


def test_metadata_that_is_not_utf8_is_named(tmp_path):
    folder = _one_image_folder(tmp_path / "d", b"x")
    (folder / "img.txt").unlink()
    (folder / "metadata.jsonl").write_bytes('{"file_name": "img.png", "text": "caf\xe9"}\n'.encode("cp1252"))
    with pytest.raises(HyperrealError, match="'metadata.jsonl' is not UTF-8"):
        load_examples(folder)


def test_utf8_bom_is_not_part_of_the_caption(tmp_path):
    folder = _one_image_folder(tmp_path / "d", "\ufeffcafé au lait\n".encode("utf-8"))
    assert [e.text for e in load_examples(folder)] == ["café au lait"]
    meta = _one_image_folder(tmp_path / "m", b"")
    (meta / "img.txt").unlink()
    (meta / "metadata.jsonl").write_text('{"file_name": "img.png", "text": "café"}\n', encoding="utf-8-sig")
    assert [e.text for e in load_examples(meta)] == ["café"]  # the old code: a JSON error on line 1


def test_damaged_image_in_a_training_folder_is_named_before_training(tmp_path):
    folder = _one_image_folder(tmp_path / "d", b"a red circle")
    data = _encoded(skimage.data.astronaut(), "JPEG")
    (folder / "cut.jpg").write_bytes(data[:len(data) // 2])
    (folder / "cut.txt").write_text("a blue square")
    with pytest.raises(HyperrealError, match="'cut.jpg' cannot be read: it is truncated"):
        load_examples(folder)
