"""Make the embedded ``tiny-bridge``: an offline extra encoder (USE multilingual) joined to the tiny base, both modes.

    python -m bench.train_tiny_bridge            # trains swap and fuse, measures, writes the folder
    python -m bench.train_tiny_bridge --modes fuse   # trains fuse again, keeps the shipped swap, measures both

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

from hyperreal.methods.bridge.encoders import POOLED
from hyperreal.methods.bridge.spec import POOLED_TOKENS

from .bridge_table import accuracy_table
from .synonyms import benchmark

OUT = EMBEDDED_DIR / "tiny-bridge"


EXAMPLES = ["un triángulo azul a la derecha", "un cercle jaune en bas", "ein grünes Quadrat oben",
            "фиолетовый круг слева", "一个橙色的三角形", "مربع أحمر في الوسط", "a crimson orb near the top",
            "a blue square on the left"]


def write_card(folder: Path, record: dict) -> None:
    f = record["figures"]
    enc = record["encoder"]
    licence, what = POOLED.get(enc, ("see the encoder's own card", enc))
    timing = "\n".join(f"| {mode} | {r['train_seconds'] / 60:.1f} min | {r['trained_parameters']:,} | "
                       f"{json.dumps(r['targets_met'])} |" for mode, r in f["modes"].items())
    runs = "\n".join(f"- {mode}: `{json.dumps(cfg)}`" for mode, cfg in record["runs"].items())
    remeasured = "".join(f"The {', '.join(r['modes'])} figures were measured again on the same files, prompts and seeds "
                         f"after a change to how bridges run: `{r['command']}`.\n\n"
                         for r in record.get("remeasured", []))
    tables = "\n\n".join(f"### {split} prompts\n{accuracy_table(f, split)}" for split in f["splits"])
    text = f"""---
tags: [hyperreal, shapes-world, tiny, bridge, multilingual]
---
# hyperreal `tiny-bridge` — prompts in other languages and other words for the tiny base

The extra encoder is `{enc}`: {what}. Licence: {licence}. It is joined to the frozen `tiny` base, which knows only
its own English training words. The base (UNet, VAE, CLIP text encoder) and the encoder stay frozen; only the
bridge learns, from **English captions only** (no image and no word of another language is trained on). A
sentence encoder that puts "un círculo rojo" near "a red circle" lets the base follow prompts in languages it
never saw.

- `swap.safetensors` (the default, `"bridge": {{"path": "tiny-bridge", "scale": 1.0}}`): a residual translator. It
  reads the encoder's vector (projected to {record['pooled_tokens']} tokens) and the base encoder's own output, and
  adds a correction whose last layer started at zero (so it started as the exact base). It was distilled against
  the base text encoder on captions alone: other English phrasings of a caption map to the caption's embedding,
  and half the time the base side reads nothing or letters it cannot read, as it does for another language.
  scale = blend α.
- `fuse.safetensors` (`"path": "tiny-bridge:fuse"`): decoupled cross-attention in the UNet's
  {record['fuse_layers']} cross-attention layers, reading the encoder's tokens, behind gates that start at 0;
  trained with the diffusion loss on rendered scenes, and where the base reads the caption the target is the
  frozen base's own prediction (what the base knew is kept). scale multiplies the gates.

## Measured (colour+shape accuracy, fixed seeds, {f['steps']} steps, guidance {f['guidance']})
One-object prompts that are never trained on: English with colour and shape words and phrasings the bridge never
saw, and prompts written in each language (`bench/languages.py`; development and held-out templates and seeds).
Original: {f['original_prompts']} held-out captions of the base's own world (one and two objects). Targets are
judged on the held-out split: English >= 75%, Spanish, French, German and Russian >= 60%, original captions within
2 points, training <= 20 min.

{tables}

| bridge | training (2 CPU threads) | parameters | targets met |
|---|---|---|---|
{timing}

Last made by `{record['command']}` in {record['total_seconds'] / 60:.1f} min on {record['threads']} CPU threads
(torch {record['torch']}), measurements included; runs:
{runs}

{remeasured}Re-measure: `python -m hyperreal eval bridge --json`. Full record: `training_record.json`.
"""
    (folder / "README.md").write_text(text)


def remeasure(record: dict, new: dict, source: str) -> None:
    """Replace the record's rows by those of ``new`` (an eval of the same files on the same prompts and seeds)."""
    f = record["figures"]
    for key in ("base_accuracy", "base_original_accuracy", "prompts", "original_prompts"):
        if new[key] != f[key]:  # the same prompts and seeds give the base the same figures, bit for bit
            raise SystemExit(f"{source}: its {key} differs from the record's; it measured something else")
    for row in new["modes"].values():
        f["modes"][row["mode"]] = {**row, "bridge": f["modes"][row["mode"]]["bridge"]}
    f["targets_met"] = {k: all(r["targets_met"].values()) for k, r in f["modes"].items()}
    record.setdefault("remeasured", []).append(
        {"modes": [r["mode"] for r in new["modes"].values()],
         "command": "python -m hyperreal eval bridge " + " ".join(
             f"--bridge {r['mode']}={r['bridge']}" for r in new["modes"].values()) + " --json"})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="use-multilingual")
    ap.add_argument("--swap-steps", type=int, default=2000)
    ap.add_argument("--fuse-steps", type=int, default=2000)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--modes", default="swap,fuse")
    ap.add_argument("--work", default="/tmp/hyperreal-tiny-bridge")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--synonym-prompts", type=int, default=96)
    ap.add_argument("--language-prompts", type=int, default=32)
    ap.add_argument("--original-prompts", type=int, default=64)
    ap.add_argument("--card-only", action="store_true", help="rewrite README.md from training_record.json")
    ap.add_argument("--figures", help="with --card-only: the last line of `python -m hyperreal eval bridge --json` on "
                    "the shipped files; its bridges' rows replace the record's (after a change to how bridges run, "
                    "with no training)")
    args = ap.parse_args(argv)
    if args.card_only:
        out = Path(args.out)
        record = json.loads((out / "training_record.json").read_text())
        if args.figures:
            remeasure(record, json.loads(Path(args.figures).read_text().strip().splitlines()[-1]), args.figures)
            (out / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")
        write_card(out, record)
        return 0
    t_all = time.time()
    base = load_base("tiny")
    work, out = Path(args.work), Path(args.out)
    modes = [m for m in args.modes.split(",") if m]
    runs, files = {}, {}
    for mode in modes:
        d = base.defaults["bridge_train"][mode]
        steps = args.swap_steps if mode == "swap" else args.fuse_steps
        req = B.TrainRequest(data="shapes", mode=mode, encoder=args.encoder, width=args.width, layers=args.layers,
                             name=mode, sample_prompts=["un círculo rojo", "a blue square on the left"])
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
    # a mode not trained by this command keeps its shipped file and its run's record
    earlier = json.loads((out / "training_record.json").read_text()) if (out / "training_record.json").exists() else {}
    args_text = " ".join(argv if argv is not None else sys.argv[1:])
    command = f"python -m bench.train_tiny_bridge {args_text}".strip()
    for mode in runs:
        runs[mode]["command"] = command
    kept = {m: r for m, r in earlier.get("runs", {}).items()
            if m not in files and (out / f"{m}.safetensors").exists() and earlier.get("encoder") == args.encoder}
    runs = {m: {"command": earlier.get("command", ""), **kept[m]} if m in kept else runs[m]
            for m in B.MODES[::-1] if m in kept or m in runs}  # swap first
    for mode, p in files.items():
        shutil.copy(p, out / f"{mode}.safetensors")
    shipped = list(runs)
    info = {"kind": "bridge", "base": "tiny", "encoder": args.encoder,
            "default": "swap" if "swap" in shipped else shipped[0], "files": {m: f"{m}.safetensors" for m in shipped},
            "examples": EXAMPLES}
    (out / "hyperreal.json").write_text(json.dumps(info, indent=2) + "\n")
    # measured on the files as shipped
    bridges = {m: str(out / f"{m}.safetensors") for m in shipped}
    figures = benchmark(load_base("tiny"), bridges, args.synonym_prompts, args.original_prompts, args.language_prompts)
    for m, r in figures["modes"].items():
        r["bridge"] = "tiny-bridge" if m == info["default"] else f"tiny-bridge:{m}"
    record = {"command": command, "encoder": args.encoder,
              "pooled_tokens": POOLED_TOKENS if args.encoder in POOLED else 0,
              "runs": runs, "figures": figures, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "fuse_layers": len(cross_attention_layers(base.pipe.unet)),
              "total_seconds": round(time.time() - t_all, 1),
              "sizes_mb": {m: round((out / f"{m}.safetensors").stat().st_size / 1e6, 2) for m in shipped}}
    (out / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")
    write_card(out, record)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
