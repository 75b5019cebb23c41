"""Held-out prompt sets and the base model's accuracy measurement (``eval base`` and the tiny model's training)."""
from __future__ import annotations

import random
import time

from ..pipelines import generate_images
from . import evaluator
from .world import all_captions, is_held_out

EVAL_SEED = 1234


def held_out_prompts(n_one: int = 64, n_two: int = 64, seed: int = EVAL_SEED
                     ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(prompt, seed) pairs from captions never seen in training; one-object captions cycle with new seeds.
    Another ``seed`` gives another order and other image seeds (a second split of the same held-out captions)."""
    rng = random.Random(seed)
    one = [c for c in all_captions(n_objects=1) if is_held_out(c)]
    two = [c for c in all_captions(n_objects=2) if is_held_out(c)]
    rng.shuffle(one)
    rng.shuffle(two)
    pairs_one = [(one[i % len(one)], seed + i) for i in range(n_one)]
    pairs_two = [(two[i % len(two)], seed + 1000 + i) for i in range(n_two)]
    return pairs_one, pairs_two


def time_one_image(pipe, steps: int = 20, guidance: float = 7.5, repeats: int = 3) -> float:
    """Best-of wall time for one 64x64 image (after a warm-up run)."""
    generate_images(pipe, [("a red circle", 0)], steps, guidance)
    best = float("inf")
    for r in range(repeats):
        t0 = time.perf_counter()
        generate_images(pipe, [("a blue square on the left", r)], steps, guidance)
        best = min(best, time.perf_counter() - t0)
    return best


def evaluate_base(pipe, steps: int = 20, guidance: float = 7.5, n_one: int = 64, n_two: int = 64) -> dict:
    one, two = held_out_prompts(n_one, n_two)
    res = {"steps": steps, "guidance": guidance}
    for name, pairs in (("one_object", one), ("two_objects", two)):
        imgs = generate_images(pipe, pairs, steps, guidance)
        res[name] = evaluator.accuracy(imgs, [p for p, _ in pairs])
    return res
