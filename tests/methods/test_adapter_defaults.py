"""What a newcomer gets with no knobs changed: the trigger found in the captions, prior preservation on prompts the
base draws well (generated once per base and cached), and the before/after drift grid."""
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from hyperreal.datasets import write_examples
from hyperreal import training
from hyperreal.errors import HyperrealError
from hyperreal.loading import SD15_CONFIGS
from hyperreal.methods import adapters as A
from hyperreal.methods.adapters.prior import known_words
from hyperreal.shapes.world import render_caption


@pytest.fixture(scope="module")
def sd15_tokenizer():
    return CLIPTokenizer.from_pretrained(SD15_CONFIGS / "tokenizer")


def test_trigger_found_on_the_tiny_base(base):
    """"sks" is cut into pieces by the tiny tokenizer and shared by every caption; "star" is shared too but is
    one whole token; captions sharing no such word have no trigger."""
    captions = ["a red sks star", "a blue sks star on the left", "a green sks star"]
    assert A.find_trigger(captions, base.pipe.tokenizer, known_words(base)) == "sks"
    assert A.find_trigger(["a red circle", "a blue square"], base.pipe.tokenizer, known_words(base)) is None


@pytest.mark.parametrize("captions, expected", [
    (["a photo of sks dog", "sks dog on a beach", "a sks dog sleeping"], "sks"),
    (["photo of ohwx man, smiling", "ohwx man in a suit"], "ohwx"),
    (["zwx style painting of a house", "a castle, zwx style"], "zwx"),
    (["a photo of a dog", "a dog on the beach"], None),  # "dog" is common: no trigger, not "dog"
    (["a photo of a woman", "portrait of a woman"], None),
])
def test_trigger_found_with_sd15s_tokenizer(sd15_tokenizer, captions, expected):
    """The field's made-up trigger words, with SD1.5's real CLIP vocabulary: a word it cuts into pieces, or one
    of its rarest tokens ("sks" is one token there, id 48136 of 49,408); never a plain word every caption shares."""
    assert A.find_trigger(captions, sd15_tokenizer) == expected


def test_defaults_find_the_trigger_and_guard_what_the_base_draws(base, stars, tmp_path, monkeypatch):
    """No trigger, no class prompt, no class-image count: the trigger is found and said, the new token is made, and
    the class images are the base's own prior prompts, the recipe's count of them, generated once for the base."""
    monkeypatch.setitem(base.defaults["adapter_train"], "class_images", 4)  # the recipe's count (64 is slow here)
    learner = A.make_learner(base, A.TrainRequest(data=str(stars), name="d"), tmp_path / "a")
    info = learner.info
    assert info["trigger"] == "sks" and info["trigger_tokens"] == ["sks"] and info["class_images"] == 4
    # the loss weighting is the base's recipe too (min-SNR-gamma 5 on tiny); 0 asked for turns it off
    assert learner.snr_gamma == info["snr_gamma"] == base.defaults["adapter_train"]["snr_gamma"] == 5.0
    assert any("trigger: 'sks'" in n for n in info["notes"])
    assert any("prior preservation: 4 images" in n and "known to draw well" in n for n in info["notes"])
    folder = Path(info["class_folder"])
    assert folder.is_relative_to(Path(os.environ["HYPERREAL_CACHE"]))
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == base.defaults["prior_prompts"][:4]
    assert not any("sks" in r["text"] or "star" in r["text"] for r in rows)
    stamp = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    # a second run, elsewhere: the same folder, not generated again
    again = A.make_learner(base, A.TrainRequest(data=str(stars), name="d2", snr_gamma=0), tmp_path / "b")
    assert again.snr_gamma is None and again.info["snr_gamma"] is None
    with pytest.raises(HyperrealError, match="--snr-gamma must be above 0"):
        A.make_learner(base, A.TrainRequest(data=str(stars), name="d4", snr_gamma=-1), tmp_path / "d")
    assert again.info["class_folder"] == str(folder)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp
    assert not list(folder.parent.glob("*.part*"))
    # another seed is another set of images; half-written caches of killed runs go, a live run's stays
    dead = folder.parent / f"{folder.name}.part-999999999"
    live = folder.parent / f"{folder.name}.part-{os.getppid()}"
    dead.mkdir()
    live.mkdir()
    other = A.make_learner(base, A.TrainRequest(data=str(stars), name="d3", seed=5), tmp_path / "c")
    assert other.info["class_folder"] != str(folder) and folder.is_dir()
    assert not dead.exists() and live.is_dir()
    live.rmdir()


def test_without_a_trigger_or_prior_prompts_prior_preservation_is_off(base, tmp_path, monkeypatch):
    """Captions that share no unknown word, on a base that lists nothing it draws well: nothing to guard with, so
    the default turns prior preservation off and says so; asking for class images explicitly is an error."""
    monkeypatch.setitem(base.defaults, "prior_prompts", [])
    data = write_examples(tmp_path / "plain", [(render_caption("a red circle"), "a red circle"), (render_caption("a blue square"), "a blue square")])
    learner = A.make_learner(base, A.TrainRequest(data=str(data), name="p"), tmp_path / "out")
    assert learner.info["trigger"] is None and learner.info["class_images"] == 0
    assert any("prior preservation is off" in n for n in learner.info["notes"])
    with pytest.raises(HyperrealError, match="class images need a class prompt"):
        A.make_learner(base, A.TrainRequest(data=str(data), class_images=2), tmp_path / "no_trigger")


def test_drift_grid_is_before_over_after():
    before = [Image.new("RGB", (8, 6), c) for c in ("red", "blue", "green")]
    after = [Image.new("RGB", (8, 6), "white") for _ in before]
    grid = A.drift_grid(before, after)
    assert grid.size == (3 * 8 + 2 * 2, 2 * 6 + 2)
    assert grid.getpixel((0, 0)) == (255, 0, 0) and grid.getpixel((10, 0)) == (0, 0, 255)
    assert grid.getpixel((10, 8)) == (255, 255, 255)


def test_training_with_the_defaults_leaves_the_base_bit_for_bit(base, stars, tmp_path, monkeypatch):
    """The defaults add a token: the text encoder's table grows by its row, and every weight the base had, the
    original rows of that table included, is unchanged after training."""
    monkeypatch.setitem(base.defaults["adapter_train"], "class_images", 2)
    pipe = base.pipe
    before = {f"{c}.{k}": v.detach().clone() for c in ("unet", "text_encoder", "vae")
              for k, v in getattr(pipe, c).state_dict().items()}
    learner = A.make_learner(base, A.TrainRequest(data=str(stars), name="bit"), tmp_path)
    training.train(learner, training.TrainConfig(steps=3, batch_size=2, lr=1e-2, log_every=3), tmp_path / "out")
    learner.state()  # trained token vectors are in place
    with A.adapters_disabled(pipe):
        after = {}
        for c in ("unet", "text_encoder", "vae"):
            for k, v in getattr(pipe, c).state_dict().items():
                k = k.replace(".base_layer", "")
                if f"{c}.{k}" in before:
                    after[f"{c}.{k}"] = v
    assert set(after) == set(before)
    for k, v in before.items():
        got = after[k]
        if got.shape != v.shape:  # the token embedding table: the new row is extra
            assert got.shape[0] == v.shape[0] + 1 and torch.equal(got[: v.shape[0]], v), k
        else:
            assert torch.equal(got, v), k
