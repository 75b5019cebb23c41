"""What colour a star adapter paints at each guidance: the same adapter, "a <colour> sks star" for every colour on
the same seeds, sampled at several classifier-free guidance scales; per asked colour, the colours the evaluator
finds (``*``: the object is a star).

    python bench/star_guidance.py ADAPTER.safetensors [--seeds 8] [--guidance 1,3,5]

ADAPTER is a file ``train adapter`` or ``eval adapter --work DIR`` wrote for the star task.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.star import STAR_TRIGGER  # noqa: E402
from hyperreal.loading import load_base  # noqa: E402
from hyperreal.methods.adapters import job_adapters  # noqa: E402
from hyperreal.pipelines import generate_images  # noqa: E402
from hyperreal.shapes import evaluator  # noqa: E402
from hyperreal.shapes.world import COLOURS, parse_caption  # noqa: E402


def colours_found(pipe, steps: int, guidance: float, seeds: list[int]) -> dict:
    pairs = [(f"a {c} {STAR_TRIGGER} star", s) for s in seeds for c in COLOURS]
    found: dict[str, dict[str, int]] = {c: {} for c in COLOURS}
    right = 0
    for img, (prompt, _) in zip(generate_images(pipe, pairs, steps, guidance), pairs):
        s = evaluator.score(img, parse_caption(prompt.replace(f" {STAR_TRIGGER} ", " ")))
        right += bool(s.colour_shape)
        got = (s.objects[0]["colour"] + ("*" if s.objects[0]["shape"] == "star" else "")) if s.objects else "-"
        asked = prompt.split()[1]
        found[asked][got] = found[asked].get(got, 0) + 1
    return {"guidance": guidance, "star_of_the_colour_asked": right / len(pairs), "found": found}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapter")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--guidance", default="1,3,5")
    args = ap.parse_args(argv)
    base = load_base("tiny")
    seeds = [50_000 + i for i in range(args.seeds)]
    with job_adapters(base.pipe, [{"path": args.adapter, "weight": 1.0}]):
        for g in (float(x) for x in args.guidance.split(",")):
            print(json.dumps(colours_found(base.pipe, base.defaults["steps"], g, seeds)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
