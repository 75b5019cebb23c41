"""Try adapter training recipes on the star task, quickly (16 star prompts, 16 prompts without the trigger).

Each argument is one variant as JSON: ``steps``, ``lr``, ``bs`` (batch), ``lr_schedule`` (default: the recipe), any
``hyperreal.methods.adapters.TrainRequest`` field (``kind``, ``rank``, ``prior_weight``, ``train_text_encoder``, ``class_images`` …).
``--prompts N`` measures on N star prompts and N without the trigger (default 16; ``eval adapter`` uses 32).
Everything a variant does not name is the default a newcomer gets; the dev split only (bench/star.py SPLITS).
Prints one JSON line per variant: the star of the colour asked, any star, drift, accuracy without the trigger
(and the base's; one-object prompts alone), training seconds.
Used to choose the defaults that ``python -m hyperreal eval adapter`` then measures on the full prompt sets.

    python bench/adapter_recipe.py '{"steps": 2000, "lr": 1e-3, "prior_weight": 10}' '{"steps": 2000, "lr": 1e-4, "kind": "full"}'
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import star as S  # noqa: E402
from hyperreal.loading import load_base  # noqa: E402
from hyperreal.methods import adapters as A  # noqa: E402
from hyperreal.shapes import evaluator  # noqa: E402


def main(argv: list[str]) -> int:
    n = 16
    if argv[:1] == ["--prompts"]:
        n, argv = int(argv[1]), argv[2:]
    variants = [json.loads(v) for v in argv]
    work = Path(tempfile.mkdtemp(prefix="adapter-recipe-"))
    data, star_pairs, plain = S.split_data(work, "dev", n)  # recipes are chosen on the dev split only
    base = load_base("tiny")
    base_plain, base_same = S.base_plain_images(base, plain)
    base_acc = evaluator.accuracy(base_plain, [p for p, _ in plain])["colour_shape"]
    for i, v in enumerate(variants):
        shown = dict(v)
        base = load_base("tiny")  # a fresh base per variant
        cfg = S.recipe_config(base, v.get("kind", "lora"), steps=v.pop("steps", None), lr=v.pop("lr", None),
                              batch_size=v.pop("bs", None), lr_schedule=v.pop("lr_schedule", None))
        req = A.TrainRequest(data=str(data), name="recipe", **v)  # the defaults, but for what the variant says
        r = S.star_trial(base, req, cfg, work / f"run{i}", star_pairs, plain, base_same)
        print(json.dumps({"variant": shown, "star_colour": r["star_colour_rate"], "star": r["star_rate"],
                          "drift": round(r["drift"], 2), "acc": r["colour_shape_accuracy"], "base_acc": base_acc,
                          "one": r["one_object_accuracy"],
                          "train_seconds": round(r["train_seconds"])}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
