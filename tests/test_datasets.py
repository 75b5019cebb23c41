import json
import zipfile

import pytest
from PIL import Image

from hyperreal.datasets import image_tensor, load_examples, unpack, write_examples
from hyperreal.errors import HyperrealError
from hyperreal.shapes.world import render_caption


def _imgs(n):
    caps = ["a red circle", "a blue square on the left", "a green triangle at the top"][:n]
    return [(render_caption(c, i), c) for i, c in enumerate(caps)]


def test_metadata_jsonl_round_trip(tmp_path):
    write_examples(tmp_path / "d", _imgs(3))
    ex = load_examples(tmp_path / "d")
    assert [e.text for e in ex] == ["a red circle", "a blue square on the left", "a green triangle at the top"]
    assert all(e.image.is_file() for e in ex)


def test_kohya_txt_captions_and_missing_ones(tmp_path):
    for i, (img, cap) in enumerate(_imgs(2)):
        img.save(tmp_path / f"p{i}.png")
        (tmp_path / f"p{i}.txt").write_text(cap + "\n")
    assert [e.text for e in load_examples(tmp_path)] == ["a red circle", "a blue square on the left"]
    Image.new("RGB", (8, 8)).save(tmp_path / "lonely.png")
    with pytest.raises(HyperrealError, match="no caption for lonely.png"):
        load_examples(tmp_path)


def test_zip_of_a_folder_and_zip_slip(tmp_path):
    folder = write_examples(tmp_path / "set", _imgs(2))
    z = tmp_path / "set.zip"
    with zipfile.ZipFile(z, "w") as f:
        for p in folder.iterdir():
            f.write(p, f"set/{p.name}")
    assert len(load_examples(unpack(z, tmp_path / "unz"))) == 2
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as f:
        f.writestr("../../escape.txt", "x")
    with pytest.raises(HyperrealError, match="is outside"):
        unpack(evil, tmp_path / "unz2")
    assert not (tmp_path.parent / "escape.txt").exists() and not (tmp_path / "unz2").exists()


def test_bad_rows_name_the_line(tmp_path):
    write_examples(tmp_path, _imgs(1))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "nope.png", "text": "x"}) + "\n")
    with pytest.raises(HyperrealError, match="line 1: image 'nope.png' is not in"):
        load_examples(tmp_path)
    with pytest.raises(HyperrealError, match="is not a folder or a .zip"):
        load_examples(tmp_path / "missing")


def test_image_tensor_crops_to_aspect_and_scales():
    img = Image.new("RGB", (100, 50), (255, 0, 0))
    t = image_tensor(img, 32, 32)
    assert t.shape == (3, 32, 32) and float(t[0].mean()) == pytest.approx(1.0) and float(t[1].mean()) == pytest.approx(-1.0)
