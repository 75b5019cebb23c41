import json

import numpy as np
import torch

from hyperreal.registry import find_embedded
from hyperreal.pipelines import generate_images
from hyperreal.shapes import benchmark, evaluator
from hyperreal.shapes.tiny_model import build_tokenizer, vocabulary


def test_every_world_word_is_one_token():
    tok = build_tokenizer()
    for w in vocabulary():
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w


def test_embedded_tiny_is_small_and_documented():
    art = find_embedded("tiny", "base")
    assert art is not None
    size = sum(f.stat().st_size for f in art.path.rglob("*.safetensors"))
    assert size <= 25e6
    assert not list(art.path.rglob("*.bin")) and not list(art.path.rglob("*.pt"))
    record = json.loads((art.path / "training_record.json").read_text())
    assert "python -m bench.train_tiny" in record["command"]
    card = (art.path / "README.md").read_text()
    assert "colour+shape" in card


def test_save_load_round_trip(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline

    tiny.pipe.save_pretrained(tmp_path, safe_serialization=True)
    again = StableDiffusionPipeline.from_pretrained(tmp_path, use_safetensors=True)
    again.set_progress_bar_config(disable=True)
    a = generate_images(tiny.pipe, [("a red circle on the left", 7)], 10, 5.0)[0]
    b = generate_images(again, [("a red circle on the left", 7)], 10, 5.0)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(tiny.pipe, name).state_dict(), getattr(again, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_draws_what_it_is_asked(tiny):
    """A quick quality floor (the full measurement is `python -m hyperreal eval base`)."""
    one, _ = benchmark.held_out_prompts(16, 0)
    imgs = generate_images(tiny.pipe, one, tiny.defaults["steps"], tiny.defaults["guidance"])
    assert evaluator.accuracy(imgs, [p for p, _ in one])["colour_shape"] >= 0.7
