"""The bridge benchmark (``python -m hyperreal eval bridge``): colour+shape accuracy on prompts with words and
phrasings the bridge never trained on (synonyms, other templates), and on the original held-out captions, for the
base alone and with each bridge, same seeds.

Kept apart from the training phrasings (``hyperreal/shapes/phrasing.py``): a test checks that none of these
words is among them.
"""
from __future__ import annotations

import json
import random
import time

from hyperreal.methods.bridge import generate, get_bridge

from . import languages as L
from hyperreal.shapes import evaluator
from hyperreal.shapes.benchmark import held_out_prompts
from hyperreal.shapes.world import SceneObject, all_captions, article, is_held_out, parse_caption

DEV_COLOURS = {"red": ("crimson", "scarlet"), "green": ("emerald", "grass-green"), "blue": ("azure", "navy"),
               "yellow": ("golden", "lemon"), "purple": ("violet", "plum"), "orange": ("tangerine", "amber")}
DEV_SHAPES = {"circle": ("ball", "disc", "round dot"), "square": ("cube", "box", "block"),
              "triangle": ("arrowhead", "pyramid", "wedge")}
DEV_POSITIONS = {"left": ("on the left side", "to the left"), "right": ("on the right side", "to the right"),
                 "top": ("near the top", "up top"), "bottom": ("near the bottom", "down at the bottom"),
                 "center": ("in the middle", "right in the middle")}
DEV_TEMPLATES = ("{a} {c} {s}{p}", "one {c} {s}, please{p}", "I would like {a} {c} {s}{p}", "{c} {s}{p}",
                 "can you make {a} {c} {s}{p}", "{a} single {c} {s}{p}")


def dev_prompts(n: int = 96, seed: int = 4321) -> list[tuple[str, list, int]]:
    """(prompt, expected objects, seed) with synonyms and other phrasings, from held-out one-object captions and
    unpositioned ones; the expected objects are in canonical words for the evaluator."""
    rng = random.Random(seed)
    caps = [c for c in all_captions(n_objects=1) if is_held_out(c) or parse_caption(c)[0].position is None]
    rng.shuffle(caps)
    out = []
    for i in range(n):
        o = parse_caption(caps[i % len(caps)])[0]
        c, s = rng.choice(DEV_COLOURS[o.colour]), rng.choice(DEV_SHAPES[o.shape])
        p = f" {rng.choice(DEV_POSITIONS[o.position])}" if o.position else ""
        t = rng.choice(DEV_TEMPLATES)
        text = t.format(a=article(c), c=c, s=s, p=p).replace(", please ", " ").strip()
        if "please" in t and p:
            text = f"one {c} {s}{p}, please"
        out.append((text, [SceneObject(o.colour, o.shape, o.position)], 60_000 + i))
    return out


def colour_shape_accuracy(images, expected: list) -> float:
    return sum(evaluator.score(img, e).colour_shape for img, e in zip(images, expected)) / max(len(expected), 1)


def prompt_sets(split: str, n_synonyms: int = 96, n_language: int = 32) -> dict[str, list]:
    """The benchmark's prompt sets for one split: ``en`` (English with words and phrasings never trained on; dev:
    :func:`dev_prompts`, held-out: ``bench/languages.py``) and each other language."""
    sets = {"en": dev_prompts(n_synonyms) if split == "dev" else L.language_prompts("en", split, n_synonyms)}
    for lang in L.TARGET_LANGUAGES + L.REPORTED_LANGUAGES:
        sets[lang] = L.language_prompts(lang, split, n_language)
    return sets


def _accuracies(pipe, lb, sets: dict[str, list], steps: int, guidance: float) -> dict[str, float]:
    out = {}
    for label, prompts in sets.items():
        images = generate(pipe, lb, [(p, s) for p, _, s in prompts], steps, guidance)
        out[label] = round(colour_shape_accuracy(images, [e for _, e, _ in prompts]), 4)
    return out


def benchmark(base, bridges: dict[str, str], n_synonyms: int = 96, n_original: int = 64, n_language: int = 32,
              splits=L.SPLITS, log=print) -> dict:
    """Colour+shape accuracy of the base alone and with each bridge, same seeds: on English prompts with words
    and phrasings the bridges never trained on, on prompts in other languages (per split), and on the original
    held-out captions (one and two objects); training time from each file's header. The targets are judged on
    the held-out split."""
    steps, guidance = base.defaults["steps"], base.defaults["guidance"]
    sets = {split: prompt_sets(split, n_synonyms, n_language) for split in splits}
    one, two = held_out_prompts(n_original, n_original)
    orig = [(p, [*parse_caption(p)], s) for p, s in one + two]
    t0 = time.time()
    base_acc = {split: _accuracies(base.pipe, None, sets[split], steps, guidance) for split in splits}
    base_orig = _accuracies(base.pipe, None, {"original": orig}, steps, guidance)["original"]
    figures = {"base": base.name, "steps": steps, "guidance": guidance, "splits": list(splits),
               "prompts": {split: {k: len(v) for k, v in sets[split].items()} for split in splits},
               "original_prompts": len(orig),
               "examples": {split: {k: v[0][0] for k, v in sets[split].items()} for split in splits},
               "base_accuracy": base_acc, "base_original_accuracy": base_orig, "modes": {}}
    log(f"base '{base.name}': {json.dumps(base_acc)}, original captions {100 * base_orig:.1f}%")
    judged = "held-out" if "held-out" in splits else splits[-1]
    for label, source in bridges.items():
        lb = get_bridge(base, source)
        acc = {split: _accuracies(base.pipe, lb, sets[split], steps, guidance) for split in splits}
        o = _accuracies(base.pipe, lb, {"original": orig}, steps, guidance)["original"]
        secs = lb.info.get("train_seconds")
        row = {"bridge": source, "mode": lb.spec.mode, "encoder": lb.spec.encoder, "accuracy": acc,
               "original_accuracy": o, "original_change_points": round(100 * (o - base_orig), 1),
               "train_seconds": secs, "trained_parameters": sum(p.numel() for p in lb.bridge.parameters()),
               "layer_weights": lb.bridge.layer_weights()}
        if lb.spec.mode == "fuse":
            row["gates"] = [round(float(g), 4) for g in lb.bridge.gates]
        a = acc[judged]
        row["targets_met"] = {"english_unseen_words>=0.75": a["en"] >= 0.75,
                              **{f"{lang}>=0.60": a[lang] >= 0.60 for lang in L.TARGET_LANGUAGES},
                              "original_within_2_points": abs(o - base_orig) <= 0.02 + 1e-9,
                              "train_seconds<=1200": secs is not None and secs <= 1200}
        figures["modes"][label] = row
        log(f"{label} ({source}): {json.dumps(acc)}, original captions {100 * o:.1f}% "
            f"({row['original_change_points']:+.1f} points), trained in {secs}s")
    figures["judged_on"] = judged
    figures["eval_seconds"] = round(time.time() - t0, 1)
    figures["targets_met"] = {k: all(v for v in r["targets_met"].values()) for k, r in figures["modes"].items()}
    return figures
