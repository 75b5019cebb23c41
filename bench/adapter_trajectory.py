"""One adapter recipe on the star task, measured at every checkpoint of a single run: how the colour asked, any
star and drift move with the steps (a constant learning rate swings the colour from one checkpoint to the next).

    python bench/adapter_trajectory.py '{"steps": 3000}' [--every 500] [--split dev] [--prompts 32]

The variant is JSON as in ``bench/adapter_recipe.py`` (``steps``, ``lr``, ``bs``, ``lr_schedule`` and any
``TrainRequest`` field; everything else is the default a newcomer gets). Prints one JSON line per checkpoint:
the star of the colour asked at the guidance a job gets with an adapter on (``adapter_guidance``) and at the base's
own, any star, colour+shape accuracy on prompts without the trigger with the adapter on (and the base's alone, at
its own guidance), drift, and training seconds so far (measuring not counted).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import star as S  # noqa: E402
from hyperreal import training  # noqa: E402
from hyperreal.loading import load_base  # noqa: E402
from hyperreal.methods import adapters as A  # noqa: E402
from hyperreal.pipelines import generate_images  # noqa: E402
from hyperreal.shapes import evaluator  # noqa: E402


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant", nargs="?", default="{}")
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--split", default="dev", choices=sorted(S.SPLITS))
    ap.add_argument("--prompts", type=int, default=32)
    args = ap.parse_args(argv)
    v = json.loads(args.variant)
    work = Path(tempfile.mkdtemp(prefix="adapter-trajectory-"))
    data, star_pairs, plain = S.split_data(work, args.split, args.prompts)
    base = load_base("tiny")
    gen_steps, guidance, with_adapter = (base.defaults[k] for k in ("steps", "guidance", "adapter_guidance"))
    base_plain, base_same = S.base_plain_images(base, plain)
    prompts = [p for p, _ in plain]
    base_acc = evaluator.accuracy(base_plain, prompts)["colour_shape"]
    cfg = S.recipe_config(base, v.get("kind", "lora"), steps=v.pop("steps", None), lr=v.pop("lr", None),
                          batch_size=v.pop("bs", None), lr_schedule=v.pop("lr_schedule", None),
                          log_every=args.every, checkpoint_every=args.every)
    req = A.TrainRequest(data=str(data), name="trajectory", **v)
    learner = A.make_learner(base, req, work / "out",
                             info={"steps": cfg.steps, "lr": cfg.lr, "batch_size": cfg.batch_size})
    t0, measuring = time.time(), 0.0

    def on_event(e) -> None:
        nonlocal measuring
        if e.kind != "checkpoint":
            return
        m0 = time.time()
        at = {g: S.star_scores(generate_images(learner.sample_pipe, star_pairs, gen_steps, g), star_pairs)
              for g in {guidance, with_adapter}}
        d = A.drift(learner, plain, gen_steps, with_adapter, base_images=base_same)
        print(json.dumps({"variant": args.variant, "split": args.split, "step": e.step,
                          "guidance": with_adapter, "star_colour": at[with_adapter]["star_colour_rate"],
                          "star": at[with_adapter]["star_rate"],
                          "star_colour_base_guidance": at[guidance]["star_colour_rate"],
                          "acc": evaluator.accuracy(d["images"], prompts)["colour_shape"], "base_acc": base_acc,
                          "drift": round(d["drift"], 2), "train_seconds": round(time.time() - t0 - measuring)}),
              flush=True)
        measuring += time.time() - m0

    training.train(learner, cfg, work / "out", on_event=on_event)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
