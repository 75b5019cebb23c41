"""Why a star adapter misses: what the evaluator finds for each held-out star prompt, split by prompts with and
without a position, and with the adapter only partly on (text encoder only; UNet only from step K on).

    python bench/star_failures.py ADAPTER.safetensors [--prompts 32] [--each]

ADAPTER is a file `eval adapter` or `train adapter` wrote for the star task (e.g. WORK/lora/star_lora.safetensors).
Prints one line per setting: one-star prompts, object counts, and the one-star rate with and without a position.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.star import STAR_TRIGGER, star_prompts  # noqa: E402
from hyperreal.loading import load_base  # noqa: E402
from hyperreal.methods.adapters import job_adapters  # noqa: E402
from hyperreal.shapes import evaluator  # noqa: E402
from hyperreal.shapes.world import POSITION_PHRASE, parse_caption  # noqa: E402


def positioned(prompt: str) -> bool:
    return any(prompt.endswith(" " + phrase) for phrase in POSITION_PHRASE.values())


def unet_layers(pipe):
    return [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]


def generate(base, pairs, unet_from: int | None):
    """The star prompts with the adapter's text encoder part on, its UNet part on from step ``unet_from``
    (None: never); the prompt embeddings are made once, before the first step, so the text part stays on."""
    layers = unet_layers(base.pipe)

    def switch(on: bool):
        for layer in layers:
            layer.enable_adapters(on)

    def at_step_end(pipe, i, t, kwargs):
        switch(unet_from is not None and i + 1 >= unet_from)
        return kwargs

    switch(unet_from == 0)
    gens = [torch.Generator().manual_seed(s) for _, s in pairs]
    out = base.pipe([p for p, _ in pairs], num_inference_steps=base.defaults["steps"],
                    guidance_scale=base.defaults["adapter_guidance"], generator=gens, callback_on_step_end=at_step_end)
    return out.images


def report(label, images, pairs, each=False):
    rows = []
    for img, (prompt, seed) in zip(images, pairs):
        s = evaluator.score(img, parse_caption(prompt.replace(f" {STAR_TRIGGER} ", " ")))
        shapes = [o["shape"] for o in s.objects]
        rows.append((prompt, shapes == ["star"], len(shapes)))
        if each:
            print(f"    {prompt:42s} seed {seed}: " + ", ".join(
                f"{o['colour']} {o['shape']} at ({o['cx']:.0f}, {o['cy']:.0f})" for o in s.objects))
    counts = {}
    for _, _, n in rows:
        counts[n] = counts.get(n, 0) + 1
    pos = [ok for p, ok, _ in rows if positioned(p)]
    plain = [ok for p, ok, _ in rows if not positioned(p)]
    print(f"{label:34s} one star {sum(ok for _, ok, _ in rows)}/{len(rows)}; objects per image "
          f"{dict(sorted(counts.items()))}; with a position {sum(pos)}/{len(pos)}, without {sum(plain)}/{len(plain)}",
          flush=True)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapter")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--each", action="store_true", help="print what the evaluator finds in every image")
    args = ap.parse_args(argv)
    base = load_base("tiny")
    pairs = star_prompts(args.prompts)
    report("base alone", generate(base, pairs, None), pairs)
    with job_adapters(base.pipe, [{"path": args.adapter, "weight": 1.0}]):
        report("adapter", generate(base, pairs, 0), pairs, args.each)
        report("adapter's text encoder only", generate(base, pairs, None), pairs)
        for k in (4, 8, 12):
            report(f"UNet part from step {k} of {base.defaults['steps']}", generate(base, pairs, k), pairs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
