"""``python -m hyperreal``: generate, models, train, eval."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

from .commands import adapter, bridge, controlnet
from .errors import HyperrealError

# each method's train/eval subcommands live in hyperreal/commands/<method>.py
METHOD_COMMANDS = [adapter, bridge, controlnet]


def _quiet() -> None:
    """Library chatter (deprecations, progress bars) is noise on a command line; our own messages stay."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


# --- generate -------------------------------------------------------------------------------------------

def cmd_generate(args) -> int:
    from .generation import job_from_dict, read_jobs, run_job, save_png
    from .loading import load_base

    if bool(args.prompt) == bool(args.jobs):
        raise HyperrealError("give either --prompt TEXT or --jobs FILE.jsonl")
    overrides = {k: v for k, v in (("steps", args.steps), ("guidance", args.guidance), ("width", args.width),
                                   ("height", args.height)) if v is not None}
    if args.jobs:
        if not args.out_dir:
            raise HyperrealError("--jobs needs --out-dir DIR (images are written as 0000.png, 0001.png, ...)")
        jobs = read_jobs(args.jobs)
        jobs = [job_from_dict({**overrides, **{k: v for k, v in vars(j).items() if v is not None}},
                              f"{Path(args.jobs).name} job {i}") for i, j in enumerate(jobs)]
        targets = [Path(args.out_dir) / f"{i:04d}.png" for i in range(len(jobs))]
    else:
        d = {"prompt": args.prompt, "seed": args.seed, "negative_prompt": args.negative_prompt, **overrides}
        jobs = [job_from_dict(d, "--prompt")]
        targets = [Path(args.out or (Path(args.out_dir or ".") / "0000.png"))]
    base = load_base(args.base)  # once for the whole file
    for job, target in zip(jobs, targets):
        t0 = time.perf_counter()
        image, params = run_job(base, job)
        save_png(image, target, params)
        print(f"wrote {target} ({time.perf_counter() - t0:.2f}s): {job.prompt}")
    return 0


# --- models ---------------------------------------------------------------------------------------------

def cmd_models(args) -> int:
    from .registry import embedded_artifacts

    arts = embedded_artifacts()
    if not arts:
        raise HyperrealError("no embedded models found under hyperreal/embedded (is the package installed whole?)")
    w = max(len(a.name) for a in arts)
    for a in arts:
        print(f"{a.name:<{w}}  {a.kind:<10}  {a.path}")
    return 0


# --- eval -----------------------------------------------------------------------------------------------

TARGETS = {"one_object_colour_shape": 0.85, "two_objects_colour_shape": 0.65, "seconds_per_image": 1.0,
           "weights_mb": 25.0}


def cmd_eval_base(args) -> int:
    from .loading import load_base
    from .shapes import benchmark

    base = load_base(args.base)
    steps = args.steps or base.defaults["steps"]
    guidance = args.guidance if args.guidance is not None else base.defaults["guidance"]
    t0 = time.time()
    res = benchmark.evaluate_base(base.pipe, steps, guidance, args.prompts, args.prompts)
    sec = benchmark.time_one_image(base.pipe, steps, guidance)
    size_mb = sum(f.stat().st_size for f in Path(base.source).rglob("*.safetensors")) / 1e6 \
        if Path(base.source).is_dir() else None
    one, two = res["one_object"], res["two_objects"]
    figures = {
        "base": base.name, "steps": steps, "guidance": guidance, "prompts_per_set": args.prompts,
        "one_object_colour_shape": one["colour_shape"], "one_object_position": one["position"],
        "one_object_count": one["count"],
        "two_objects_colour_shape": two["colour_shape"], "two_objects_position": two["position"],
        "two_objects_count": two["count"],
        "seconds_per_image": round(sec, 3), "weights_mb": round(size_mb, 2) if size_mb else None,
        "eval_seconds": round(time.time() - t0, 1),
    }
    met = {k: (figures[k] is not None and (figures[k] >= v if "colour_shape" in k else figures[k] <= v))
           for k, v in TARGETS.items()}
    figures["targets"] = TARGETS
    figures["targets_met"] = met
    print(f"held-out prompts ({args.prompts} per set, {steps} steps, guidance {guidance}) on '{base.name}':")
    for k in ("one_object", "two_objects"):
        r = res[k]
        pos = "n/a" if r["position"] is None else f"{100 * r['position']:.1f}%"
        print(f"  {k:<12} colour+shape {100 * r['colour_shape']:5.1f}%  position {pos}  count {100 * r['count']:.1f}%")
    print(f"  one 20-step image: {sec:.3f}s   weights: {figures['weights_mb']} MB")
    if args.json:
        print(json.dumps(figures))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m hyperreal", description="Adapt a frozen text-to-image model.")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="make images from a prompt or a JSONL file of jobs")
    g.add_argument("--base", default=None, help="tiny | hub id | local diffusers folder (default: auto)")
    g.add_argument("--prompt")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--jobs", help="JSONL file, one job per line: prompt, seed, [negative_prompt, steps, guidance, width, height]")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int)
    g.add_argument("--guidance", type=float)
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--out", help="output PNG for --prompt")
    g.add_argument("--out-dir", help="folder for 0000.png, 0001.png, ...")
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("models", help="list embedded artifacts: NAME  KIND  PATH")
    m.set_defaults(func=cmd_models)

    t = sub.add_parser("train", help="train a method on the frozen base")
    tsub = t.add_subparsers(dest="what", required=True)
    e = sub.add_parser("eval", help="measure a model on the shapes world")
    esub = e.add_subparsers(dest="what", required=True)
    eb = esub.add_parser("base", help="colour/shape/position accuracy of a base on held-out prompts")
    eb.add_argument("--base", default="tiny")
    eb.add_argument("--prompts", type=int, default=64, help="prompt/seed pairs per set (one and two objects)")
    eb.add_argument("--steps", type=int)
    eb.add_argument("--guidance", type=float)
    eb.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    eb.set_defaults(func=cmd_eval_base)
    for module in METHOD_COMMANDS:
        module.add_train(tsub)
        module.add_eval(esub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _quiet()
        return args.func(args)
    except HyperrealError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug of ours: say so in one line; the traceback only on request
        if os.environ.get("HYPERREAL_DEBUG"):
            raise
        print(f"internal error: {type(e).__name__}: {e} (set HYPERREAL_DEBUG=1 for the traceback and please report it)",
              file=sys.stderr)
        return 1
