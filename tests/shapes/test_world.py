import math
import random

import pytest

from hyperreal.shapes import evaluator
from hyperreal.shapes.world import (ALL_SHAPES, BASE_SHAPES, COLOURS, SceneObject, all_captions, caption,
                                    is_held_out, layout, parse_caption, render, render_caption, sample_scene)


def test_caption_round_trip():
    for c in all_captions(ALL_SHAPES):
        objs = parse_caption(c)
        assert objs is not None and caption(objs) == c


def test_caption_templates_use_the_world_words():
    assert caption([SceneObject("red", "circle")]) == "a red circle"
    assert caption([SceneObject("orange", "square", "left")]) == "an orange square on the left"
    assert caption([SceneObject("green", "triangle", "top"), SceneObject("yellow", "circle", "bottom")]) == \
        "a green triangle at the top and a yellow circle at the bottom"
    assert parse_caption("a crimson ball") == [SceneObject("crimson", "ball")]
    assert parse_caption("two dogs playing") is None


def test_training_scenes_hold_no_star_and_no_held_out_caption():
    rng = random.Random(0)
    for _ in range(2000):
        _, text = sample_scene(rng, BASE_SHAPES)
        assert "star" not in text and not is_held_out(text)


def test_held_out_split_is_fixed_and_partial():
    caps = all_captions()
    held = [c for c in caps if is_held_out(c)]
    assert 0.08 < len(held) / len(caps) < 0.25
    assert any(" and " not in c for c in held) and any(" and " in c for c in held)


@pytest.mark.parametrize("seed", range(3))
def test_evaluator_reads_every_ground_truth_caption(seed):
    caps = all_captions(ALL_SHAPES)  # stars included
    imgs = [render_caption(c, seed=seed * 10000 + i) for i, c in enumerate(caps)]
    acc = evaluator.accuracy(imgs, caps)
    assert acc["colour_shape"] == 1.0 and acc["position"] == 1.0 and acc["count"] == 1.0


def test_evaluator_is_rotation_invariant():
    rng = random.Random(1)
    for _ in range(300):
        o = SceneObject(rng.choice(COLOURS), rng.choice(ALL_SHAPES))
        img = render(layout([o], rng), rotation=rng.uniform(0, 2 * math.pi))
        assert evaluator.score(img, [o]).colour_shape, o


def test_evaluator_rejects_wrong_answers():
    img = render_caption("a red circle on the left", seed=3)
    assert not evaluator.score(img, "a blue circle on the left").colour_shape
    assert not evaluator.score(img, "a red square on the left").colour_shape
    s = evaluator.score(img, "a red circle on the right")
    assert s.colour_shape and not s.position
    blank = render([])
    assert not evaluator.score(blank, "a red circle").colour_shape
