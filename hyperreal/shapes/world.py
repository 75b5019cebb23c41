"""The shapes world: procedural 64x64 scenes of flat-coloured shapes and their captions.

Everything the embedded tiny model knows comes from here, so the vocabulary is closed on purpose:
six colours, three shapes (``star`` is reserved for the adapter method), five positions.
"""
from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
BACKGROUND = (255, 255, 255)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 40),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
COLOURS = tuple(PALETTE)
BASE_SHAPES = ("circle", "square", "triangle")
RESERVED_SHAPE = "star"  # never in the base UNet's images or captions
ALL_SHAPES = BASE_SHAPES + (RESERVED_SHAPE,)
POSITIONS = ("left", "right", "top", "bottom", "center")
POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
PAIR_LAYOUTS = (("left", "right"), ("top", "bottom"))
MIN_OBJECT, MAX_OBJECT = 16, 28


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    position: str | None = None  # the position the caption names, if any


@dataclass(frozen=True)
class PlacedObject:
    obj: SceneObject
    cx: float
    cy: float
    size: int


def article(colour: str) -> str:
    return "an" if colour[0] in "aeiou" else "a"


def object_phrase(o: SceneObject) -> str:
    return f"{article(o.colour)} {o.colour} {o.shape}"


def caption(objects: list[SceneObject] | tuple[SceneObject, ...]) -> str:
    """Caption for one object (optionally positioned) or two objects in a pair layout."""
    if len(objects) == 1:
        o = objects[0]
        return object_phrase(o) + (f" {POSITION_PHRASE[o.position]}" if o.position else "")
    a, b = objects
    return f"{object_phrase(a)} {POSITION_PHRASE[a.position]} and {object_phrase(b)} {POSITION_PHRASE[b.position]}"


_OBJ = r"(?:a|an|one) (\w+) (\w+)"
_POS = r"(on the left|on the right|at the top|at the bottom|in the center)"
_PHRASE_TO_POS = {v: k for k, v in POSITION_PHRASE.items()}


def parse_caption(text: str) -> list[SceneObject] | None:
    """Inverse of :func:`caption` (any colour/shape words); None when the text is not in template form."""
    t = " ".join(text.lower().strip().rstrip(".").split())
    m = re.fullmatch(rf"{_OBJ} {_POS} and {_OBJ} {_POS}", t)
    if m:
        c1, s1, p1, c2, s2, p2 = m.groups()
        return [SceneObject(c1, s1, _PHRASE_TO_POS[p1]), SceneObject(c2, s2, _PHRASE_TO_POS[p2])]
    m = re.fullmatch(rf"{_OBJ}(?: {_POS})?", t)
    if m:
        c, s, p = m.groups()
        return [SceneObject(c, s, _PHRASE_TO_POS[p] if p else None)]
    return None


def _place(o: SceneObject, size: int, rng: random.Random, pair: bool) -> tuple[float, float]:
    half = size / 2
    lo, hi = half + 1, SIZE - 1 - half  # keeps the whole object on the canvas
    mid = SIZE / 2
    if o.position is None:
        return rng.uniform(lo, hi), rng.uniform(lo, hi)
    if o.position == "center":
        return rng.uniform(mid - 3, mid + 3), rng.uniform(mid - 3, mid + 3)
    side = (lo, lo + 4) if not pair else (lo, lo + 2)
    across = (mid - 8, mid + 8) if not pair else (mid - 6, mid + 6)
    near = rng.uniform(*side)
    far = SIZE - near
    other = rng.uniform(*across)
    return {
        "left": (near, other),
        "right": (far, other),
        "top": (other, near),
        "bottom": (other, far),
    }[o.position]


def star_points(cx: float, cy: float, radius: float, inner: float = 0.45, rotation: float = 0.0):
    pts = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * inner
        a = rotation - math.pi / 2 + i * math.pi / 5
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def draw_object(draw: ImageDraw.ImageDraw, p: PlacedObject, rotation: float = 0.0) -> None:
    colour = PALETTE.get(p.obj.colour, (0, 0, 0))
    h = p.size / 2
    cx, cy = p.cx, p.cy
    if p.obj.shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h - 1, cy + h - 1], fill=colour)
        return
    if p.obj.shape == "square":
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif p.obj.shape == "triangle":
        pts = [(0, -h), (h, h), (-h, h)]
    elif p.obj.shape == "star":
        # a star's outer points touch the object's bounding circle
        draw.polygon(star_points(cx, cy, h * 1.05, rotation=rotation), fill=colour)
        return
    else:
        raise ValueError(f"unknown shape {p.obj.shape!r}")
    c, s = math.cos(rotation), math.sin(rotation)
    draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], fill=colour)


def render(placed: list[PlacedObject], rotation: float = 0.0) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    d = ImageDraw.Draw(img)
    for p in placed:
        draw_object(d, p, rotation)
    return img


def layout(objects: list[SceneObject], rng: random.Random) -> list[PlacedObject]:
    pair = len(objects) == 2
    out = []
    for o in objects:
        size = rng.randint(MIN_OBJECT, MAX_OBJECT)
        cx, cy = _place(o, size, rng, pair)
        out.append(PlacedObject(o, cx, cy, size))
    return out


def render_caption(text: str, seed: int = 0) -> Image.Image:
    """Ground-truth rendering of a template caption (used by tests and the evaluator's self-check)."""
    objs = parse_caption(text)
    if objs is None:
        raise ValueError(f"not a shapes-world caption: {text!r}")
    return render(layout(objs, random.Random(seed)))


def _split_bucket(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) % 100


HELD_OUT_PERCENT = 15


def is_held_out(text: str) -> bool:
    """A fixed ~15% of the positioned captions never appear in training; the model card is measured on them."""
    objs = parse_caption(text)
    if objs is None or (len(objs) == 1 and objs[0].position is None):
        return False
    return _split_bucket(text) < HELD_OUT_PERCENT


def all_captions(shapes=BASE_SHAPES, n_objects: int | None = None) -> list[str]:
    objs = [SceneObject(c, s) for c in COLOURS for s in shapes]
    out: list[str] = []
    if n_objects in (None, 1):
        for o in objs:
            out.append(caption([o]))
            for p in POSITIONS:
                out.append(caption([SceneObject(o.colour, o.shape, p)]))
    if n_objects in (None, 2):
        for pa, pb in PAIR_LAYOUTS:
            for a in objs:
                for b in objs:
                    if a != b:
                        out.append(caption([SceneObject(a.colour, a.shape, pa), SceneObject(b.colour, b.shape, pb)]))
    return out


def random_objects(rng: random.Random, shapes=BASE_SHAPES, two_prob: float = 0.45) -> list[SceneObject]:
    def pick():
        return rng.choice(COLOURS), rng.choice(shapes)

    if rng.random() < two_prob:
        pa, pb = rng.choice(PAIR_LAYOUTS)
        (c1, s1), (c2, s2) = pick(), pick()
        while (c2, s2) == (c1, s1):
            c2, s2 = pick()
        return [SceneObject(c1, s1, pa), SceneObject(c2, s2, pb)]
    c, s = pick()
    pos = rng.choice((None,) + POSITIONS)
    return [SceneObject(c, s, pos)]


def sample_scene(rng: random.Random, shapes=BASE_SHAPES, exclude_held_out: bool = True) -> tuple[Image.Image, str]:
    """One training scene and its caption; held-out captions are redrawn."""
    while True:
        objs = random_objects(rng, shapes)
        text = caption(objs)
        if not (exclude_held_out and is_held_out(text)):
            return render(layout(objs, rng)), text


def to_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.uint8)
