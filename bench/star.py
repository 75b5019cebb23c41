"""The adapter benchmark: teach the tiny base the reserved shape "star" (``python -m hyperreal eval adapter``).

Eight rendered stars of cycling colours, captioned "a <colour> sks star", class images from the base, then held-out
star prompts and seeds, and prompts without the trigger (drift and colour+shape accuracy against the base's).
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from hyperreal import training
from hyperreal.datasets import write_examples
from hyperreal.loading import load_base
from hyperreal.methods.adapters import TrainRequest, drift, make_learner
from hyperreal.pipelines import generate_images
from hyperreal.shapes import evaluator
from hyperreal.shapes.benchmark import held_out_prompts
from hyperreal.shapes.world import (COLOURS, POSITION_PHRASE, SceneObject, all_captions, is_held_out, layout,
                                    parse_caption, render)

STAR_TRIGGER = "sks"
STAR_SEED = 777
# Two splits of everything the benchmark draws: the recipe was chosen on "dev"; "held-out" renders other stars
# (other layouts, other colour order), asks other star prompts on other seeds and other prompts without the
# trigger, none of it in the repository or seen while tuning
SPLITS = {"dev": {"image_seed": STAR_SEED, "first_colour": 0, "prompt_seed": STAR_SEED, "prompt_offset": 50_000,
                  "plain_seed": 1234},
          "held-out": {"image_seed": 20_261_202, "first_colour": 3, "prompt_seed": 4242, "prompt_offset": 70_000,
                       "plain_seed": 9876}}


def star_dataset(folder: str | Path, n: int = 8, seed: int = STAR_SEED, first_colour: int = 0) -> Path:
    """``n`` rendered stars of cycling colours captioned "a <colour> sks star" (the base never saw a star)."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        colour = COLOURS[(i + first_colour) % len(COLOURS)]
        items.append((render(layout([SceneObject(colour, "star", None)], rng)), f"a {colour} {STAR_TRIGGER} star"))
    return write_examples(folder, items, prefix="star")


def star_prompts(n: int = 32, seed: int = STAR_SEED, offset: int = 50_000) -> list[tuple[str, int]]:
    """Held-out (prompt, seed) pairs: every colour, with and without a position, on seeds never trained on."""
    rng = random.Random(seed + 1)
    texts = [f"a {c} {STAR_TRIGGER} star" + (f" {POSITION_PHRASE[p]}" if p else "")
             for c in COLOURS for p in (None,) + tuple(POSITION_PHRASE)]
    rng.shuffle(texts)
    # unpositioned prompts first so that every colour's training prompt is among them
    texts.sort(key=lambda t: " on " in t or " at " in t or " in " in t)
    return [(texts[i % len(texts)], offset + i) for i in range(n)]


def star_scores(images, pairs) -> dict:
    star, colour_star = 0, 0
    for img, (prompt, _) in zip(images, pairs):
        expected = parse_caption(prompt.replace(f" {STAR_TRIGGER} ", " "))
        s = evaluator.score(img, expected)
        # one star and nothing else: an adapter that breaks images into fragments makes "stars" by accident
        # (thin pieces have a star's low solidity), so a star among several objects does not count
        one_star = s.count and s.objects[0]["shape"] == "star"
        star += one_star
        colour_star += one_star and s.colour_shape
    n = max(len(pairs), 1)
    return {"star_rate": star / n, "star_colour_rate": colour_star / n}


def shapes_class_prompts(n: int = 64, seed: int = STAR_SEED) -> list[str]:
    """Prior-preservation prompts for the shapes world: captions the base was trained on (never held-out ones),
    half with one object like the instance captions, half with two.

    Drawn from all captions, nearly all would have two objects (there are far more pairs than singles), and the
    one-object prompts nearest the trigger's would be the ones left unguarded.
    """
    rng = random.Random(seed)
    out = []
    for count, share in ((1, n - n // 2), (2, n // 2)):
        texts = [c for c in all_captions(n_objects=count) if not is_held_out(c)]
        rng.shuffle(texts)
        out += texts[:share]
    rng.shuffle(out)
    return out


def star_trial(base, req: TrainRequest, cfg, out: str | Path, star_pairs, plain_pairs, base_plain,
               on_event=None) -> dict:
    """One training run on the star task, measured: star rate (any colour, and the colour asked for) on
    ``star_pairs``; drift from ``base_plain`` and colour+shape accuracy on ``plain_pairs`` (prompts without the
    trigger; also on their one-object half); times; the file written. Images with the adapter on are drawn at the
    base's ``adapter_guidance``, as a job with an adapter is; ``base_plain`` is the base alone at that guidance
    (:func:`base_plain_images`). Used by ``star_benchmark`` and ``bench/adapter_recipe.py``."""
    out = Path(out)
    gen_steps, guidance = base.defaults["steps"], base.defaults["adapter_guidance"]
    t0 = time.time()
    learner = make_learner(base, req, out, info={"steps": cfg.steps, "lr": cfg.lr, "batch_size": cfg.batch_size})
    t_data = time.time() - t0
    t0 = time.time()
    paths = training.train(learner, cfg, out, on_event=on_event)
    t_train = time.time() - t0
    star = star_scores(generate_images(learner.sample_pipe, star_pairs, gen_steps, guidance), star_pairs)
    d = drift(learner, plain_pairs, gen_steps, guidance, base_images=base_plain)
    prompts = [p for p, _ in plain_pairs]
    ones = [i for i, p in enumerate(prompts) if " and " not in p]
    return {"lr": cfg.lr, "trained_parameters": learner.trained_parameter_count(),
            "scale": learner.spec.scale if req.kind != "full" else None, "trigger": learner.info.get("trigger"),
            "class_images": learner.info.get("class_images"),
            "star_rate": star["star_rate"], "star_colour_rate": star["star_colour_rate"],
            "drift": round(d["drift"], 3), "colour_shape_accuracy": evaluator.accuracy(d["images"], prompts)["colour_shape"],
            "one_object_accuracy": evaluator.accuracy([d["images"][i] for i in ones],
                                                      [prompts[i] for i in ones])["colour_shape"],
            "train_seconds": round(t_train, 1), "data_seconds": round(t_data, 1),
            "file": str(paths[0]), "file_mb": round(paths[0].stat().st_size / 1e6, 3)}


def base_plain_images(base, plain_pairs) -> tuple[list, list]:
    """The base alone on prompts without the trigger: at its own guidance (what a person gets with no adapter on:
    the accuracy to keep) and at its ``adapter_guidance`` (the adapter's images' guidance: what drift compares)."""
    steps, guidance, with_adapter = (base.defaults[k] for k in ("steps", "guidance", "adapter_guidance"))
    alone = generate_images(base.pipe, plain_pairs, steps, guidance)
    return alone, alone if with_adapter == guidance else generate_images(base.pipe, plain_pairs, steps, with_adapter)


def split_prompts(split: str, n_prompts: int, seed: int | None = None) -> tuple[list, list]:
    """The star prompts and prompts without the trigger of one split; with ``seed``, others that neither split
    uses (star prompt seeds from 90_000, far from the splits' 50_000 and 70_000)."""
    sp = SPLITS[split]
    if seed is None:
        star_pairs = star_prompts(n_prompts, seed=sp["prompt_seed"], offset=sp["prompt_offset"])
        plain_seed = sp["plain_seed"]
    else:
        star_pairs, plain_seed = star_prompts(n_prompts, seed=seed, offset=90_000), seed + 1
    one, two = held_out_prompts(n_prompts - n_prompts // 2, n_prompts // 2, seed=plain_seed)
    return star_pairs, one + two


def split_data(work: Path, split: str, n_prompts: int) -> tuple[Path, list, list]:
    """The star images, star prompts and prompts without the trigger of one split."""
    sp = SPLITS[split]
    data = star_dataset(work / f"stars-{split}", seed=sp["image_seed"], first_colour=sp["first_colour"])
    return (data, *split_prompts(split, n_prompts))


def targets_met(row: dict) -> dict:
    """Issue 19's targets for one kind's figures."""
    return {"star_colour_rate>=0.8": row["star_colour_rate"] >= 0.8,
            "accuracy_within_5_points": row["accuracy_change_points"] >= -5.0,
            "one_object_within_5_points": row["one_object_change_points"] >= -5.0,
            "train_seconds<=600": row["train_seconds"] <= 600}


def recipe_config(base, kind: str = "lora", **given) -> training.TrainConfig:
    """The loop's settings a newcomer gets for ``kind`` from the base's recipe (``full`` at its own learning rate),
    but for the ``TrainConfig`` fields ``given`` names (None: the recipe's); logs once, at the end, unless given."""
    recipe = base.defaults["adapter_train"]
    values = {"steps": recipe["steps"], "batch_size": recipe["batch_size"],
              "lr": recipe["full_lr"] if kind == "full" else recipe["lr"],
              "lr_schedule": recipe.get("lr_schedule", "constant")}
    values.update({k: v for k, v in given.items() if v is not None})
    values.setdefault("log_every", values["steps"])
    return training.TrainConfig(**values)


def star_benchmark(kinds: list[str], work: str | Path, splits=("dev", "held-out"), steps: int | None = None,
                   batch_size: int | None = None, n_prompts: int = 32, base_name: str = "tiny", log=print,
                   vae: str | None = None) -> dict:
    """Teach the reserved shape with each kind (and ``full``) exactly as a newcomer would: the folder of 8
    captioned stars and nothing else (the trigger, the token, prior preservation and the step budget are the
    defaults), then measure on the split's star prompts and prompts without the trigger. ``steps``/``batch_size``
    override the recipe for quick checks only."""
    work = Path(work)
    base = load_base(base_name, vae=vae)
    recipe = base.defaults["adapter_train"]
    gen_steps, guidance = base.defaults["steps"], base.defaults["guidance"]
    figures = {"base": base_name, "steps": steps or recipe["steps"], "batch_size": batch_size or recipe["batch_size"],
               "guidance": guidance, "adapter_guidance": base.defaults["adapter_guidance"],
               "images": 8, "star_prompts": n_prompts, "plain_prompts": n_prompts,
               "torch_threads": torch.get_num_threads(), "splits": {}}
    for split in splits:
        data, star_pairs, plain_pairs = split_data(work, split, n_prompts)
        base_plain, base_same = base_plain_images(base, plain_pairs)
        base_star = star_scores(generate_images(base.pipe, star_pairs, gen_steps, guidance), star_pairs)
        prompts = [p for p, _ in plain_pairs]
        ones = [i for i, p in enumerate(prompts) if " and " not in p]
        base_acc = evaluator.accuracy(base_plain, prompts)["colour_shape"]
        base_one = evaluator.accuracy([base_plain[i] for i in ones], [prompts[i] for i in ones])["colour_shape"]
        result = {"base_figures": {"star_rate": base_star["star_rate"], "star_colour_rate": base_star["star_colour_rate"],
                                   "colour_shape_accuracy": base_acc, "one_object_accuracy": base_one},
                  "kinds": {}}
        log(f"[{split}] base '{base_name}': star of the colour asked {100 * base_star['star_colour_rate']:.1f}%, "
            f"colour+shape on {len(plain_pairs)} prompts without the trigger {100 * base_acc:.1f}% "
            f"(one object {100 * base_one:.1f}%)")
        for kind in kinds:
            req = TrainRequest(data=str(data), kind=kind, name=f"star_{kind}")  # the defaults, nothing else
            cfg = recipe_config(base, kind, steps=steps, batch_size=batch_size,
                                log_every=max((steps or recipe["steps"]) // 4, 1))
            # a fresh base per kind: nothing carries over between runs
            row = star_trial(load_base(base_name, vae=vae), req, cfg, work / split / kind, star_pairs, plain_pairs,
                             base_same, on_event=lambda e, kind=kind: e.kind == "step" and log(
                                 f"  [{split}] {kind} step {e.step}/{e.total} loss {e.loss:.4f}"))
            row["accuracy_change_points"] = round(100 * (row["colour_shape_accuracy"] - base_acc), 1)
            row["one_object_change_points"] = round(100 * (row["one_object_accuracy"] - base_one), 1)
            result["kinds"][kind] = row
            log(f"[{split}] {kind}: star of the colour asked {100 * row['star_colour_rate']:.1f}% (any colour "
                f"{100 * row['star_rate']:.1f}%), without the trigger {100 * row['colour_shape_accuracy']:.1f}% "
                f"({row['accuracy_change_points']:+.1f} points; one object {row['one_object_change_points']:+.1f}), "
                f"drift {row['drift']:.2f}, trained in {row['train_seconds']:.0f}s")
        for kind, row in result["kinds"].items():
            if kind != "full":
                row["targets_met"] = targets_met(row)
        figures["splits"][split] = result
    return figures
