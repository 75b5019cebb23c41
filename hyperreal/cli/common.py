"""What every ``train`` subcommand shares: the loop's options, the TrainConfig built from them, console progress,
and the summary at the end."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from .. import services
from ..loading import VAE_ENV, load_base
from ..training import TrainConfig, memory

REPOSITORY = Path(__file__).resolve().parents[2]


def bench(name: str):
    """A module of the repository's ``bench/`` package, where the benchmarks behind ``eval`` live (outside the
    runtime package). hyperreal runs from its checkout, so ``bench/`` sits beside ``hyperreal/``."""
    if str(REPOSITORY) not in sys.path:
        sys.path.append(str(REPOSITORY))
    return importlib.import_module(f"bench.{name}")


JSON_HELP = "print the figures as one JSON object on the last line"


BASE_HELP = ("tiny | hub id | local diffusers folder | one SD1.5 .safetensors checkpoint (configs from NAME.config/ "
             "beside it, else SD1.5's) (default: HYPERREAL_BASE, else auto)")
VAE_HELP = ("a VAE to use instead of the base's: a .safetensors VAE file (original or diffusers keys), a diffusers "
            "VAE folder or a hub id (default: HYPERREAL_VAE)")


def add_base_arg(p, default=None) -> None:
    """--base and --vae."""
    p.add_argument("--base", default=default, help=BASE_HELP)
    p.add_argument("--vae", default=os.environ.get(VAE_ENV) or None, help=VAE_HELP)


def load(args):
    """The base a command names (--base, --vae)."""
    return load_base(args.base, vae=getattr(args, "vae", None))


def add_eval_parser(esub, what: str, help_text: str, func):
    """An ``eval WHAT`` subcommand on the tiny base, with --json; the caller adds its own options."""
    p = esub.add_parser(what, help=help_text)
    add_base_arg(p, "tiny")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=func)
    return p


def add_output_args(p, name: str, name_help: str, func, sample_help: str = "prompt(s) for samples") -> None:
    """What every ``train`` subcommand writes (its file name, the prompts of its samples) and its handler."""
    p.add_argument("--sample-prompt", action="append", help=sample_help)
    p.add_argument("--name", default=name, help=name_help)
    p.set_defaults(func=func)


def run_training(args, req, check, train, method: str, variant: str | None = None, **options) -> int:
    """What every ``train`` subcommand does with its request: check what was given and ``check(req)`` before the
    base loads (a bad dataset fails at once), then ``train(base, req, cfg, out, ...)`` (a services function) with
    the loop's settings filled in from the base's recipe and the VRAM preset, and console progress."""
    train_config(args)
    out = Path(args.out)
    req = check(req, out)
    base = load(args)
    cfg = train_config(args, services.train_settings(base, method, variant, args.vram))
    report = train(base, req, cfg, out, on_event=console_progress(out), resume=args.resume, **options)
    return finish(args, report.figures)


def add_loop_args(p, lr_help: str = "") -> None:
    """Options of the shared training loop (hyperreal.training.train); unset ones come from the base's recipe and
    the VRAM preset for the card (services.train_settings)."""
    p.add_argument("--steps", type=int, help="training steps (default: the base's recipe)")
    p.add_argument("--batch-size", type=int, help="(default: the base's recipe, capped by the VRAM preset)")
    p.add_argument("--lr", type=float, help=lr_help or "learning rate (default: the base's recipe)")
    p.add_argument("--resolution", type=int, help="training images' side in pixels, a multiple of 64 (default: the "
                   "base's size, 512 on SD1.5)")
    p.add_argument("--vram", default="auto", help="auto (the detected card) | 8 | 12 | 16 | 24: GB of GPU memory; "
                   "sets the batch size's cap, gradient checkpointing and 8-bit Adam unless given")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in the backward pass: less memory, slower steps")
    p.add_argument("--use-8bit-adam", action=argparse.BooleanOptionalAction, default=None,
                   help="8-bit AdamW (bitsandbytes, CUDA only; the start line says if it fell back)")
    p.add_argument("--mixed-precision", default="auto", help="auto (the base's half dtype, none on fp32) | no | fp16 "
                   "| bf16")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--lr-schedule", help="constant | cosine | linear: the learning rate after the warm-up (cosine and "
                   "linear reach 0 after the last step; default: the base's recipe)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--sample-every", type=int, default=0, help="fixed-seed samples every N steps (0: at the end)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help=JSON_HELP)


def train_config(args, settings: dict | None = None) -> TrainConfig:
    """The loop's settings: what the command line gives, else ``settings`` (services.train_settings). Without
    settings (before the base is loaded) it checks only what was given, so a bad value fails at once."""
    chosen = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "lr_schedule", "gradient_checkpointing",
                                            "use_8bit_adam")}
    fallback = settings or {"steps": 1, "batch_size": 1, "lr": 1e-4, "lr_schedule": "constant",
                            "gradient_checkpointing": False, "use_8bit_adam": False}
    v = {k: fallback[k] if x is None else x for k, x in chosen.items()}
    cfg = TrainConfig(steps=v["steps"], batch_size=v["batch_size"], lr=v["lr"], grad_accum=args.grad_accum,
                      mixed_precision=args.mixed_precision, warmup=args.warmup, use_8bit_adam=v["use_8bit_adam"],
                      lr_schedule=v["lr_schedule"],
                      gradient_checkpointing=v["gradient_checkpointing"], checkpoint_every=args.checkpoint_every,
                      validate_every=args.sample_every, log_every=max(1, min(args.log_every, v["steps"])),
                      seed=args.seed)
    cfg.check()
    memory.preset("adapter", args.vram)  # an unknown --vram fails here too
    return cfg


def console_progress(out: Path):
    """An on_event for the CLI: info lines, step lines with loss and ETA; samples saved under OUT/samples."""

    def on_event(e) -> None:
        if e.kind in ("start", "info") and e.message:
            print(e.message, flush=True)
        elif e.kind == "step":
            print(f"step {e.step}/{e.total} loss {e.loss:.4f} eta {e.eta_s:.0f}s", flush=True)
        if e.kind in ("validation", "done") and e.images:
            folder = out / "samples"
            folder.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(e.images):
                img.save(folder / f"step-{e.step:06d}-{i}.png")
            print(f"samples at step {e.step} -> {folder}", flush=True)
        if e.kind in ("cancelled", "done") and e.message:
            print(e.message, flush=True)

    return on_event


def finish(args, figures: dict) -> int:
    """With --json, the figures (also in OUT/summary.json) as the last line."""
    if args.json:
        print(json.dumps(figures))
    return 0
