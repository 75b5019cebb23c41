"""The bridge benchmark (``python -m hyperreal eval bridge``): colour+shape accuracy on prompts with words and
phrasings the bridge never trained on (synonyms, other templates), and on the original held-out captions, for the
base alone and with each bridge, same seeds.

Kept apart from the training phrasings (``hyperreal/shapes/phrasing.py``): a test checks that none of these
words is among them.
"""
from __future__ import annotations

import random
import time

from hyperreal.methods.bridge import generate, get_bridge
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


def benchmark(base, bridges: dict[str, str], n_synonyms: int = 96, n_original: int = 64, log=print) -> dict:
    """Colour+shape accuracy of the base alone and with each bridge on (a) synonym/phrasing prompts and (b) the
    original held-out captions (one and two objects), same seeds; training time from each file's header."""
    steps, guidance = base.defaults["steps"], base.defaults["guidance"]
    syn = dev_prompts(n_synonyms)
    one, two = held_out_prompts(n_original, n_original)
    orig = one + two
    syn_pairs = [(p, s) for p, _, s in syn]
    syn_exp = [e for _, e, _ in syn]
    orig_exp = [parse_caption(p) for p, _ in orig]
    t0 = time.time()
    base_syn = colour_shape_accuracy(generate(base.pipe, None, syn_pairs, steps, guidance), syn_exp)
    base_orig = colour_shape_accuracy(generate(base.pipe, None, orig, steps, guidance), orig_exp)
    figures = {"base": base.name, "steps": steps, "guidance": guidance, "synonym_prompts": len(syn),
               "original_prompts": len(orig), "examples": [p for p, _ in syn_pairs[:6]],
               "base_synonym_accuracy": base_syn, "base_original_accuracy": base_orig, "modes": {}}
    log(f"base '{base.name}': synonyms {100 * base_syn:.1f}%, original captions {100 * base_orig:.1f}%")
    for label, source in bridges.items():
        lb = get_bridge(base, source)
        s = colour_shape_accuracy(generate(base.pipe, lb, syn_pairs, steps, guidance), syn_exp)
        o = colour_shape_accuracy(generate(base.pipe, lb, orig, steps, guidance), orig_exp)
        secs = lb.info.get("train_seconds")
        row = {"bridge": source, "mode": lb.spec.mode, "encoder": lb.spec.encoder, "synonym_accuracy": s,
               "original_accuracy": o, "original_change_points": round(100 * (o - base_orig), 1),
               "train_seconds": secs, "trained_parameters": sum(p.numel() for p in lb.bridge.parameters()),
               "layer_weights": lb.bridge.layer_weights()}
        if lb.spec.mode == "fuse":
            row["gates"] = [round(float(g), 4) for g in lb.bridge.gates]
        row["targets_met"] = {"synonym_accuracy>=0.70": s >= 0.70,
                              "original_within_3_points": abs(o - base_orig) <= 0.03 + 1e-9,
                              "train_seconds<=1200": secs is not None and secs <= 1200}
        figures["modes"][label] = row
        log(f"{label} ({source}): synonyms {100 * s:.1f}%, original captions {100 * o:.1f}% "
            f"({row['original_change_points']:+.1f} points), trained in {secs}s")
    figures["eval_seconds"] = round(time.time() - t0, 1)
    figures["targets_met"] = {k: all(v for v in r["targets_met"].values()) for k, r in figures["modes"].items()}
    return figures
