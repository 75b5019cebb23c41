"""Exact evaluator for the shapes world: read an image back into objects and score it against a prompt.

Pixels are classified by nearest palette colour (white is background), the non-background mask is split into
connected components, each component gets its majority colour, a shape from rotation-invariant geometry
(solidity for stars, area over minimum enclosing circle for the rest) and a position from its centroid.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import permutations

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

from .world import BACKGROUND, PALETTE, SIZE, SceneObject, parse_caption

_NAMES = ("white",) + tuple(PALETTE)
_COLOURS = np.array([BACKGROUND] + list(PALETTE.values()), dtype=np.float32)
MAX_COLOUR_DISTANCE = 110.0  # farther than this from every palette colour: neither object nor background
MIN_AREA = 40  # px; smaller blobs are noise, the smallest real object (16 px circle) has ~200


@dataclass
class DetectedObject:
    colour: str
    shape: str
    cx: float
    cy: float
    area: int
    solidity: float
    circle_fill: float

    def in_position(self, position: str | None, size: int = SIZE) -> bool:
        if position is None:
            return True
        lo, hi = 0.4 * size, 0.6 * size
        return {
            "left": self.cx < lo,
            "right": self.cx > hi,
            "top": self.cy < lo,
            "bottom": self.cy > hi,
            "center": lo <= self.cx <= hi and lo <= self.cy <= hi,
        }[position]


def _shape_of(mask: np.ndarray) -> tuple[str, float, float]:
    ys, xs = np.nonzero(mask)
    area = float(len(xs))
    # corners of every pixel, so hulls and circles bound the pixel squares rather than their centres
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)]).astype(np.float32)
    hull = cv2.convexHull(corners)
    solidity = area / max(cv2.contourArea(hull), 1.0)
    _, radius = cv2.minEnclosingCircle(hull)
    circle_fill = area / (np.pi * radius * radius)
    if solidity < 0.78:
        shape = "star"
    elif circle_fill > 0.8:
        shape = "circle"
    elif circle_fill > 0.52:
        shape = "square"
    else:
        shape = "triangle"
    return shape, solidity, circle_fill


def detect(image: Image.Image | np.ndarray) -> list[DetectedObject]:
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    dist = np.linalg.norm(arr[:, :, None, :] - _COLOURS[None, None], axis=-1)
    label = dist.argmin(-1)
    near = dist.min(-1) < MAX_COLOUR_DISTANCE
    mask = (label > 0) & near
    comps, n = ndimage.label(mask)
    out: list[DetectedObject] = []
    for i in range(1, n + 1):
        comp = comps == i
        area = int(comp.sum())
        if area < MIN_AREA:
            continue
        colour_idx = np.bincount(label[comp], minlength=len(_NAMES))[1:].argmax() + 1
        filled = ndimage.binary_fill_holes(comp)
        shape, solidity, circle_fill = _shape_of(filled)
        ys, xs = np.nonzero(filled)
        out.append(DetectedObject(_NAMES[colour_idx], shape, float(xs.mean()), float(ys.mean()), area,
                                  float(solidity), float(circle_fill)))
    out.sort(key=lambda o: -o.area)
    return out


@dataclass
class Score:
    colour_shape: bool  # every named object found with its colour and shape
    position: bool  # ... and in its named place
    count: bool  # exactly as many objects as named
    objects: list[dict]

    def as_dict(self) -> dict:
        return asdict(self)


def _match(expected: list[SceneObject], found: list[DetectedObject], use_position: bool) -> bool:
    """Each expected object matched to a distinct detection (tiny sets: try every assignment)."""
    if len(found) < len(expected):
        return False
    for perm in permutations(range(len(found)), len(expected)):
        if all(found[j].colour == e.colour and found[j].shape == e.shape
               and (not use_position or found[j].in_position(e.position)) for e, j in zip(expected, perm)):
            return True
    return False


def score(image: Image.Image | np.ndarray, prompt: str | list[SceneObject]) -> Score:
    expected = parse_caption(prompt) if isinstance(prompt, str) else prompt
    if expected is None:
        raise ValueError(f"not a shapes-world prompt: {prompt!r}")
    found = detect(image)
    return Score(
        colour_shape=_match(expected, found, False),
        position=_match(expected, found, True),
        count=len(found) == len(expected),
        objects=[asdict(o) for o in found],
    )


def accuracy(images, prompts) -> dict:
    """Fractions over a set: colour+shape, position (only prompts that name one), exact count."""
    scores = [score(i, p) for i, p in zip(images, prompts)]
    positioned = [s for s, p in zip(scores, prompts)
                  if any(o.position for o in (parse_caption(p) if isinstance(p, str) else p))]
    n = max(len(scores), 1)
    return {
        "n": len(scores),
        "colour_shape": sum(s.colour_shape for s in scores) / n,
        "position": (sum(s.position for s in positioned) / len(positioned)) if positioned else None,
        "count": sum(s.count for s in scores) / n,
    }
