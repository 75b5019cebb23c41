"""Train the embedded ``tiny-canny`` ControlNet for the tiny base on the shapes world (CPU is enough).

    python -m bench.train_tiny_canny --out hyperreal/embedded/tiny-canny

Stages: (1) render training scenes (training captions only: held-out captions never appear) into a captioned
image folder; (2) train through the same path as ``python -m hyperreal train controlnet`` (``controlnet.make_learner``
and the shared loop ``training.train``: Canny maps computed from the images, cached latents and embeddings, 50%
caption dropout); (3) write the diffusers ControlNet folder (fp16, to keep it small) with ``hyperreal.json``;
(4) measure it with ``bench.edges.benchmark`` on held-out scenes and write the model card.
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from hyperreal import training
from hyperreal.datasets import write_examples
from hyperreal.loading import load_base
from hyperreal.methods import controlnet
from hyperreal.methods.controlnet.files import DIFFUSERS_SUBFOLDER
from hyperreal.shapes.world import is_held_out, sample_scene

from .edges import benchmark


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_dataset(folder: Path, n: int, seed: int) -> Path:
    """``n`` training scenes (random layouts, one or two objects, never a held-out caption) as an imagefolder."""
    meta = folder / "metadata.jsonl"
    stamp = folder / "made_with.json"
    want = {"n": n, "seed": seed}
    if meta.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == want:
        return folder
    rng = random.Random(seed)
    items = [sample_scene(rng) for _ in range(n)]
    assert not any(is_held_out(t) for _, t in items)
    write_examples(folder, items, prefix="scene")
    stamp.write_text(json.dumps(want))
    return folder


def card(figures: dict, record: dict, command: str) -> str:
    c, b = figures["controlnet_figures"], figures["base_figures"]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    return f"""# tiny-canny

A ControlNet (arXiv 2302.05543) for the embedded `tiny` base, conditioned on Canny edge maps
(cv2 Canny on RGB, thresholds {record['canny'][0]}/{record['canny'][1]}, white edges on black, 64x64). A trainable copy of the
tiny UNet's encoder and middle block, joined to the frozen UNet by zero-initialised convolutions; the UNet, VAE and
text encoder were frozen throughout. Stored in fp16 in the diffusers layout (`ControlNetModel.from_pretrained`
loads this folder); {record['parameters']:,} parameters, {record['size_mb']} MB.

## Use

```bash
python -m hyperreal generate --base tiny --jobs jobs.jsonl --out-dir out/
# jobs.jsonl: {{"prompt": "a red circle on the left", "seed": 1, "controlnet": [{{"path": "tiny-canny", "image": "edges.png"}}]}}
# a photo instead of a map: add "preprocess": "canny" to the unit
```

## Training

{record['scenes']} shapes-world scenes (random layouts, one or two objects, training captions only; the held-out
captions never appear), Canny maps computed from the images, cached VAE latents and text embeddings, 50% of
captions replaced by the empty string. {record['steps']} steps at batch {record['batch_size']}, AdamW lr {record['lr']},
{record['prediction_type']} loss through the frozen UNet: **{record['train_minutes']} minutes** on
{record['torch_threads']} CPU threads (data preparation {record['data_seconds']} s). Final loss (mean of the last 50
steps) {record['final_loss']:.4f}.

Made with:

```bash
{command}
```

## Measured

{figures['scenes']} held-out scenes (held-out captions, fresh layouts, seed {figures['seed']}), condition = the Canny map
of the rendered scene, {figures['steps']} steps, guidance {figures['guidance']}, conditioning scale {figures['scale']}; edge F1 =
Canny of the output against the condition map with 1-pixel tolerance; colour+shape by the shapes-world evaluator.

| | edge F1 | precision | recall | colour+shape | position | count |
|---|---|---|---|---|---|---|
| tiny + tiny-canny | {c['edge_f1']:.3f} | {c['edge_precision']:.3f} | {c['edge_recall']:.3f} | {pct(c['colour_shape'])} | {pct(c['position'])} | {pct(c['count'])} |
| tiny alone (same captions, seeds) | {b['edge_f1']:.3f} | {b['edge_precision']:.3f} | {b['edge_recall']:.3f} | {pct(b['colour_shape'])} | {pct(b['position'])} | {pct(b['count'])} |

Targets: edge F1 >= 0.60 ({'met' if figures['targets_met']['edge_f1>=0.60'] else 'NOT met'}); colour+shape within 5 points of
the base ({figures['accuracy_change_points']:+.1f} points: {'met' if figures['targets_met']['accuracy_within_5_points'] else 'NOT met'}).
One {figures['steps']}-step image with the ControlNet: {figures['seconds_per_image']} s (best of 3). Re-measure with:

```bash
python -m hyperreal eval controlnet --json
```
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the artifact folder, e.g. hyperreal/embedded/tiny-canny")
    ap.add_argument("--work", default="/tmp/hyperreal-tiny-canny", help="dataset, checkpoints and samples")
    ap.add_argument("--scenes", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-scenes", type=int, default=64)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--measure-only", action="store_true", help="no training: measure the artifact in --out again "
                    "and rewrite its model card")
    args = ap.parse_args(argv)
    command = "python -m bench.train_tiny_canny " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    work, out = Path(args.work), Path(args.out)
    if args.measure_only:
        record = json.loads((out / "hyperreal.json").read_text())
        return measure(out, record, args.eval_scenes, record.get("command") or record_command(out, record, work),
                       extra=command)
    t0 = time.time()
    data = make_dataset(work / "data", args.scenes, seed=args.seed + 100)
    log(f"dataset: {args.scenes} scenes in {data}")
    base = load_base("tiny")
    req = controlnet.TrainRequest(data=str(data), extractor="canny", caption_dropout=0.5, name="tiny-canny",
                                  seed=args.seed)
    learner = controlnet.make_learner(base, req, work / "run")
    data_seconds = time.time() - t0
    log(f"maps, latents and embeddings cached in {data_seconds:.0f}s; training "
        f"{learner.trained_parameter_count():,} parameters")
    cfg = training.TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                               log_every=50, checkpoint_every=500, seed=args.seed)

    def on_event(e):
        if e.kind == "step":
            log(f"step {e.step}/{e.total} loss {e.loss:.4f} eta {e.eta_s:.0f}s")
        elif e.kind in ("done", "cancelled"):
            log(e.message)

    t1 = time.time()
    training.train(learner, cfg, work / "run", on_event=on_event, resume=args.resume)
    train_seconds = time.time() - t1
    losses = json.loads((work / "run" / "losses.json").read_text())

    # the artifact: the diffusers folder itself (fp16), its hyperreal.json and the card
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    controlnet.save_controlnet(learner.controlnet, tmp, learner.info, name="tiny-canny", dtype=torch.float16)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in (tmp / DIFFUSERS_SUBFOLDER).iterdir():
        shutil.copy2(f, out / f.name)
    shutil.rmtree(tmp)
    size_mb = round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6, 2)
    record = {"kind": "controlnet", "base": "tiny", "extractor": "canny", "canny": [100, 200], "scale": 1.0,
              "scenes": args.scenes, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
              "caption_dropout": 0.5, "prediction_type": learner.prediction_type,
              "parameters": learner.trained_parameter_count(), "size_mb": size_mb,
              "train_minutes": round(train_seconds / 60, 1), "data_seconds": round(data_seconds, 1),
              "torch_threads": torch.get_num_threads(), "final_loss": sum(losses[-50:]) / len(losses[-50:]),
              "command": command}
    (out / "hyperreal.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"wrote {out} ({size_mb} MB); trained in {train_seconds / 60:.1f} min; measuring on "
        f"{args.eval_scenes} held-out scenes")
    return measure(out, record, args.eval_scenes, command)


def record_command(out: Path, record: dict, work: Path) -> str:
    """The training command, rebuilt from the record (for records written before it kept the command)."""
    return (f"python -m bench.train_tiny_canny --out {out} --work {work} --scenes {record['scenes']} "
            f"--steps {record['steps']} --batch-size {record['batch_size']} --lr {record['lr']:g}")


def measure(out: Path, record: dict, n: int, command: str, extra: str | None = None) -> int:
    base = load_base("tiny")
    figures = benchmark(base, str(out), n=n, log=log)
    figures.pop("images")
    record["measured"] = {k: figures[k] for k in ("scenes", "seed", "edge_f1", "base_edge_f1", "colour_shape",
                                                  "base_colour_shape", "accuracy_change_points", "targets_met")}
    record["command"] = command
    (out / "hyperreal.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "README.md").write_text(card(figures, record, command + (f"\n{extra}" if extra else "")))
    log(json.dumps(record["measured"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
