"""Other phrasings of shapes-world captions, in the world's own colour, shape and position words and a few
synonyms, so that a bridge trained on the world learns that meaning, not the exact token, decides the image.

The bridge benchmark's synonyms and phrasings (``bench/synonyms.py``) never appear here: a test checks.
"""
from __future__ import annotations

import random

from PIL import Image

from .world import POSITION_PHRASE, all_captions, article, is_held_out, parse_caption, sample_scene

# Training phrasings use ONLY the canonical vocabulary (the base's own colour/shape/position words) in varied
# templates, plus the synonyms below.
TRAIN_TEMPLATES_ONE = (
    "{obj}{pos}", "{obj}{pos}", "{obj}{pos}", "there is {obj}{pos}", "draw {obj}{pos}", "a picture of {obj}{pos}",
    "{front}{obj}", "{colour} {shape}{pos}", "{art} {shape} that is {colour}{pos}", "{art} {colour} {shape} shape{pos}",
    "{obj}{pos} on a white background", "an image of {obj}{pos}", "{art} {shape}, {colour}{pos}",
    "{art} {colour} {shape}{pos}.", "{obj} is{pos}", "just {obj}{pos}",
)
TRAIN_TEMPLATES_TWO = (
    "{a}{pa} and {b}{pb}", "{a}{pa} and {b}{pb}", "{a}{pa}, {b}{pb}", "{a}{pa} with {b}{pb}",
    "{fa}{a} and {fb}{b}", "there is {a}{pa} and {b}{pb}", "draw {a}{pa} and {b}{pb}",
)
TRAIN_ARTICLES = ("{an}", "{an}", "{an}", "one", "the", "a single")
# Other words for the canonical colours and shapes, used to teach the bridge that meaning, not the exact token,
# decides the output (the target stays the canonical caption's embedding). None of these is a development
# benchmark word (bench/synonyms.py; a test checks), so the benchmark measures words never trained on.
TRAIN_COLOURS = {
    "red": ("ruby", "cherry", "brick red", "blood red", "vermilion", "cardinal red", "tomato red", "rose red"),
    "green": ("lime", "jade", "forest green", "mint green", "leafy green", "kelly green", "olive green", "pine green"),
    "blue": ("sapphire", "cobalt", "sky blue", "royal blue", "ultramarine", "denim blue", "ocean blue", "cornflower"),
    "yellow": ("canary", "mustard", "sunflower", "butter yellow", "saffron", "banana yellow", "sunny yellow", "straw"),
    "purple": ("lilac", "mauve", "lavender", "amethyst", "grape", "orchid", "eggplant", "magenta"),
    "orange": ("apricot", "pumpkin", "carrot", "marigold", "ginger", "rust orange", "peach orange", "clementine"),
}
TRAIN_SHAPES = {
    "circle": ("orb", "sphere", "ring", "coin", "circular shape", "oval", "bubble", "roundel"),
    "square": ("tile", "quadrilateral", "four-sided shape", "squared shape", "brick", "rectangle", "slab", "plaque"),
    "triangle": ("three-sided shape", "cone", "arrow", "spike", "delta", "trilateral", "tent shape", "pennant"),
}
SYNONYM_PROB = 0.5


def _pos_phrase(p: str | None) -> str:
    return f" {POSITION_PHRASE[p]}" if p else ""


def _front(p: str | None) -> str:
    return f"{POSITION_PHRASE[p]}, " if p else ""


def _words(o, rng: random.Random) -> tuple[str, str]:
    c = rng.choice(TRAIN_COLOURS[o.colour]) if o.colour in TRAIN_COLOURS and rng.random() < SYNONYM_PROB else o.colour
    s = rng.choice(TRAIN_SHAPES[o.shape]) if o.shape in TRAIN_SHAPES and rng.random() < SYNONYM_PROB else o.shape
    return c, s


def _obj(o, rng: random.Random, words: tuple[str, str] | None = None) -> tuple[str, str]:
    c, s = words or _words(o, rng)
    art = rng.choice(TRAIN_ARTICLES).format(an=article(c))
    return art, f"{art} {c} {s}"


def phrase(caption: str, rng: random.Random, canonical_prob: float = 0.3) -> str:
    """Another phrasing of a shapes-world caption in canonical words (the caption itself when not in the world)."""
    objs = parse_caption(caption)
    if objs is None or rng.random() < canonical_prob:
        return caption
    if len(objs) == 1:
        o = objs[0]
        c, s = _words(o, rng)
        art, obj = _obj(o, rng, (c, s))
        t = rng.choice(TRAIN_TEMPLATES_ONE)
        if "{front}" in t and not o.position:
            t = "{obj}"
        return t.format(obj=obj, pos=_pos_phrase(o.position), front=_front(o.position), colour=c, shape=s, art=art)
    a, b = objs
    t = rng.choice(TRAIN_TEMPLATES_TWO)
    return t.format(a=_obj(a, rng)[1], b=_obj(b, rng)[1], pa=_pos_phrase(a.position), pb=_pos_phrase(b.position),
                    fa=_front(a.position), fb=_front(b.position))


def shapes_captions() -> list[str]:
    """The shapes world's captions the bridge may train on: never the held-out ones the benchmark uses."""
    return [c for c in all_captions() if not is_held_out(c)]


def scenes(n: int, seed: int) -> list[tuple[Image.Image, str]]:
    """``n`` rendered training scenes and their captions (never a held-out caption)."""
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(n)]
