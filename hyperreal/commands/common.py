"""What every ``train`` subcommand shares: the loop's options, the TrainConfig built from them, console progress."""
from __future__ import annotations

import json
from pathlib import Path



def add_base_arg(p, default=None) -> None:
    p.add_argument("--base", default=default, help="tiny | hub id | local diffusers folder (default: auto)")


def add_loop_args(p, steps: int, batch_size: int, lr: float | None, lr_help: str = "") -> None:
    """Options of the shared training loop (hyperreal.training.train)."""
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr, help=lr_help or "learning rate")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--mixed-precision", default="no", help="no | fp16 | bf16 (GPU only)")
    p.add_argument("--use-8bit-adam", action="store_true", help="8-bit AdamW when bitsandbytes is installed")
    p.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--sample-every", type=int, default=0, help="fixed-seed samples every N steps (0: at the end)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")


def train_config(args, lr: float):
    from ..training import TrainConfig

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, grad_accum=args.grad_accum,
                      mixed_precision=args.mixed_precision, warmup=args.warmup,
                      use_8bit_adam=args.use_8bit_adam, checkpoint_every=args.checkpoint_every,
                      validate_every=args.sample_every, log_every=max(1, min(args.log_every, args.steps)),
                      seed=args.seed)
    cfg.check()
    return cfg


def console_progress(out: Path):
    """An on_event for the CLI: step lines with loss and ETA; samples saved under OUT/samples."""

    def on_event(e) -> None:
        if e.kind == "start" and e.message:
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


def finish(args, out: Path, figures: dict) -> int:
    """Write OUT/summary.json and, with --json, print the figures as the last line."""
    (out / "summary.json").write_text(json.dumps(figures, indent=2) + "\n")
    if args.json:
        print(json.dumps(figures))
    return 0
