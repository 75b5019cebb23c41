"""The adapters an ``eval adapter`` run trained, sampled again at the guidance a job with an adapter gets now
(the base's ``adapter_guidance``), without training them again: the same JSON as the eval's, for
``bench/star_table.py``. Training is not touched by the sampling guidance, so the files are what the eval would
train today; their training figures (time, parameters) are the eval's.

    python bench/star_resample.py EVAL.json [--guidance G] | tail -1 > resampled.json

EVAL.json is what ``python -m hyperreal eval adapter --work WORK --json`` printed; its files must still be in WORK.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import star as S  # noqa: E402
from hyperreal.loading import load_base  # noqa: E402
from hyperreal.methods.adapters import job_adapters, mean_abs_difference  # noqa: E402
from hyperreal.pipelines import generate_images  # noqa: E402
from hyperreal.shapes import evaluator  # noqa: E402


@contextlib.contextmanager
def trained(base, kind: str, file: str):
    """The base with the trained file on: an adapter as a job loads it, a full fine-tune's UNet in place of the
    base's (diffusers' own loader, from the folder the eval wrote)."""
    if kind != "full":
        with job_adapters(base.pipe, [{"path": file, "weight": 1.0}]):
            yield base.pipe
        return
    from diffusers import UNet2DConditionModel

    frozen = base.pipe.unet
    base.pipe.unet = UNet2DConditionModel.from_pretrained(Path(file).parent, torch_dtype=frozen.dtype)
    try:
        yield base.pipe
    finally:
        base.pipe.unet = frozen


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("eval_json")
    ap.add_argument("--guidance", type=float, help="default: the base's adapter_guidance")
    args = ap.parse_args(argv)
    figures = json.loads(Path(args.eval_json).read_text().strip().splitlines()[-1])
    base = load_base(figures["base"])
    steps = base.defaults["steps"]
    g = base.defaults["adapter_guidance"] if args.guidance is None else args.guidance
    figures.update(adapter_guidance=g, resampled_from=str(args.eval_json))
    for split, result in figures["splits"].items():
        star_pairs, plain = S.split_prompts(split, figures["star_prompts"])
        prompts = [p for p, _ in plain]
        ones = [i for i, p in enumerate(prompts) if " and " not in p]
        base_same = generate_images(base.pipe, plain, steps, g)
        b = result["base_figures"]
        for kind, row in result["kinds"].items():
            with trained(base, kind, row["file"]) as pipe:
                star = S.star_scores(generate_images(pipe, star_pairs, steps, g), star_pairs)
                images = generate_images(pipe, plain, steps, g)
            acc = evaluator.accuracy(images, prompts)["colour_shape"]
            one = evaluator.accuracy([images[i] for i in ones], [prompts[i] for i in ones])["colour_shape"]
            row.update(star_rate=star["star_rate"], star_colour_rate=star["star_colour_rate"],
                       drift=round(mean_abs_difference(images, base_same), 3), colour_shape_accuracy=acc,
                       one_object_accuracy=one,
                       accuracy_change_points=round(100 * (acc - b["colour_shape_accuracy"]), 1),
                       one_object_change_points=round(100 * (one - b["one_object_accuracy"]), 1))
            if "targets_met" in row:
                row["targets_met"] = S.targets_met(row)
            print(f"[{split}] {kind} at guidance {g:g}: star of the colour asked {100 * row['star_colour_rate']:.1f}%",
                  file=sys.stderr, flush=True)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
