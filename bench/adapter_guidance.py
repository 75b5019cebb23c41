"""Which guidance to sample a trained star adapter at: the eval's star prompts and prompts without the trigger, at
several classifier-free guidance scales, with the adapter on and with the base alone (the evidence behind a base's
``adapter_guidance``).

    python bench/adapter_guidance.py ADAPTER.safetensors [--split dev|held-out] [--seed N] [--guidance 1.5,2,3,5]
                                     [--weight 1.0] [--rescale 0.7] [--early 5:3]

ADAPTER is a file ``train adapter`` or ``eval adapter --work DIR`` wrote for the star task. The prompts are the
split's (``bench/star.py``); ``--seed`` draws other star prompts, seeds and prompts without the trigger instead, none
used before, so a choice made on a split can be checked where nothing was looked at. One JSON line per guidance:
the star of the colour asked, any star, what the misses drew ("orange -> red*": asked orange, found one red star;
"-": nothing; several objects are counted as such), and colour+shape accuracy without the trigger, adapter on and
base alone.
``--rescale`` applies diffusers' ``guidance_rescale`` (Lin et al. 2023); ``--early G:K`` samples the first K steps at
guidance G and the rest at each ``--guidance`` (a guidance schedule).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import star as S  # noqa: E402
from hyperreal.loading import load_base  # noqa: E402
from hyperreal.methods.adapters import job_adapters  # noqa: E402
from hyperreal.pipelines import generate_images  # noqa: E402
from hyperreal.shapes import evaluator  # noqa: E402
from hyperreal.shapes.world import parse_caption  # noqa: E402


def misses(images, pairs) -> dict[str, int]:
    """What the evaluator found where the star of the colour asked is missing, most frequent first."""
    found = collections.Counter()
    for img, (prompt, _) in zip(images, pairs):
        expected = parse_caption(prompt.replace(f" {S.STAR_TRIGGER} ", " "))
        s = evaluator.score(img, expected)
        if len(s.objects) == 1 and s.objects[0]["shape"] == "star" and s.colour_shape:
            continue
        got = ("-" if not s.objects else f"{len(s.objects)} objects" if len(s.objects) > 1 else
               s.objects[0]["colour"] + ("*" if s.objects[0]["shape"] == "star" else " " + s.objects[0]["shape"]))
        found[f"{expected[0].colour} -> {got}"] += 1
    return dict(found.most_common())


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapter")
    ap.add_argument("--split", default="dev", choices=sorted(S.SPLITS))
    ap.add_argument("--seed", type=int, help="other prompts and seeds than the split's")
    ap.add_argument("--prompts", type=int, default=64, help="star prompts, and prompts without the trigger")
    ap.add_argument("--guidance", default="1.5,2,3,5")
    ap.add_argument("--weight", type=float, default=1.0, help="the adapter's weight")
    ap.add_argument("--rescale", type=float, default=0.0, help="diffusers' guidance_rescale")
    ap.add_argument("--early", help="G:K, the first K steps at guidance G")
    args = ap.parse_args(argv)
    star_pairs, plain = S.split_prompts(args.split, args.prompts, args.seed)
    prompts = [p for p, _ in plain]
    base = load_base("tiny")
    steps = base.defaults["steps"]
    early_g, early_k = (float(args.early.split(":")[0]), int(args.early.split(":")[1])) if args.early else (None, 0)
    for g in (float(x) for x in args.guidance.split(",")):
        def schedule(pipe, i, t, kw, g=g):  # after step i: the guidance of step i + 1
            pipe._guidance_scale = early_g if i + 1 < early_k else g
            return {}
        kw = dict(guidance_rescale=args.rescale, **({"callback_on_step_end": schedule} if early_k else {}))
        g0 = early_g if early_k else g
        alone = evaluator.accuracy(generate_images(base.pipe, plain, steps, g0, **kw), prompts)["colour_shape"]
        with job_adapters(base.pipe, [{"path": args.adapter, "weight": args.weight}]):
            stars = generate_images(base.pipe, star_pairs, steps, g0, **kw)
            on = evaluator.accuracy(generate_images(base.pipe, plain, steps, g0, **kw), prompts)["colour_shape"]
        print(json.dumps({"split": args.split, "seed": args.seed, "guidance": g, "weight": args.weight,
                          "rescale": args.rescale, "early": args.early,
                          **S.star_scores(stars, star_pairs), "misses": misses(stars, star_pairs),
                          "without_trigger_adapter": on, "without_trigger_base": alone}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
