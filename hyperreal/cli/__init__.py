"""``python -m hyperreal``: generate, models, train, eval."""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from ..errors import HyperrealError
from . import adapter, base, bridge, common, controlnet

# each method's train/eval subcommands live in hyperreal/cli/<method>.py
METHOD_COMMANDS = [adapter, bridge, controlnet]


def _quiet() -> None:
    """Library chatter (deprecations, progress bars) is noise on a command line; our own messages stay."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m hyperreal", description="Adapt a frozen text-to-image model.")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="make images from a prompt or a JSONL file of jobs")
    common.add_base_arg(g)
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
    g.set_defaults(func=base.cmd_generate)

    m = sub.add_parser("models", help="list embedded artifacts: NAME  KIND  PATH")
    m.set_defaults(func=base.cmd_models)

    t = sub.add_parser("train", help="train a method on the frozen base")
    tsub = t.add_subparsers(dest="what", required=True)
    e = sub.add_parser("eval", help="measure a model on the shapes world")
    esub = e.add_subparsers(dest="what", required=True)
    eb = common.add_eval_parser(esub, "base", "colour/shape/position accuracy of a base on held-out prompts",
                                base.cmd_eval_base)
    eb.add_argument("--prompts", type=int, default=64, help="prompt/seed pairs per set (one and two objects)")
    eb.add_argument("--steps", type=int)
    eb.add_argument("--guidance", type=float)
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
