"""``train adapter`` and ``eval adapter``."""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from .. import services
from ..errors import HyperrealError
from ..methods.adapters import DEFAULT_RANK, KINDS_AND_FULL, TrainRequest
from . import common
from .common import bench

star = bench("star")


def add_train(tsub) -> None:
    ta = tsub.add_parser("adapter", help="an adapter (LoRA, DoRA, LoHa, LoKr, OFT) on a folder of captioned images")
    common.add_base_arg(ta)
    ta.add_argument("--data", required=True, help="folder or .zip: metadata.jsonl or NAME.txt captions, or bare "
                    "images captioned by --trigger")
    ta.add_argument("--out", required=True, help="output folder (adapter files, checkpoints, samples, summary.json)")
    ta.add_argument("--kind", default="lora", help="lora | dora | loha | lokr | oft, or full (the whole UNet, for "
                    "comparison)")
    common.add_loop_args(ta, lr_help="learning rate (default: the base's recipe, its full_lr for --kind full)")
    ta.add_argument("--rank", type=int, default=DEFAULT_RANK, help="rank (OFT: block size)")
    ta.add_argument("--alpha", type=float, help="alpha (default from --preset); the scale is alpha/rank")
    ta.add_argument("--preset", default="diffusers-like", help="diffusers-like (alpha = rank) | kohya-like (alpha 1)")
    ta.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(rank) (LoRA/DoRA)")
    ta.add_argument("--placement", default="attention+ff", help="attention | attention+ff (kohya's default) | all (+ ResNet convs)")
    ta.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction, default=None,
                    help="a LoRA on the text encoder too (default: for adapter kinds when no trigger token is "
                         "trained, see --trigger-token; never for full)")
    ta.add_argument("--text-encoder-lr", type=float, help="learning rate of the text side: its LoRA and the trigger "
                    "tokens (default: --lr)")
    ta.add_argument("--trigger", help="trigger phrase, e.g. 'sks'; captions lacking it get it prepended (default: "
                    "the word every caption shares that the base does not know, e.g. 'sks' in 'a photo of sks dog')")
    ta.add_argument("--trigger-token", action=argparse.BooleanOptionalAction, default=True,
                    help="a trigger word the tokenizer cuts into pieces gets a new token whose embedding trains with "
                         "the adapter (pivotal tuning; saved in the file as a bundled embedding). Default: on")
    ta.add_argument("--class-prompt", action="append", help="prior preservation: class prompt(s) for base-generated "
                    "images (default: the prompts the base is known to draw well, its hyperreal.json's "
                    "prior_prompts; else the captions without the trigger: 'a photo of sks dog' -> 'a photo of dog')")
    ta.add_argument("--class-images", type=int, help="how many class images the frozen base generates, once per "
                    "base and cached (default: the base's recipe, 64 on tiny, 100 on SD1.5; 0: no prior "
                    "preservation)")
    ta.add_argument("--prior-weight", type=float, help="loss weight of class images (default: the base's recipe)")
    ta.add_argument("--prior-target", choices=("base", "noise"), default="base",
                    help="class images' target: the frozen base's own prediction (base: exactly 'leave these prompts "
                         "alone') or the added noise (noise: classic DreamBooth)")
    ta.add_argument("--snr-gamma", type=float, help="min-SNR-gamma loss weighting, e.g. 5 (default: the base's "
                    "recipe; 0: off)")
    ta.add_argument("--repeats", type=int, help="instance images per epoch (kohya's repeats; default: about as "
                    "many instance as class images per epoch, 1 without class images)")
    ta.add_argument("--flip", action="store_true", help="random horizontal flips")
    ta.add_argument("--caption-dropout", type=float, default=0.0, help="probability of training on an empty caption")
    ta.add_argument("--drift-samples", type=int, default=8, help="prompts without the trigger used to measure drift")
    common.add_output_args(ta, "adapter", "file name of the adapter", train,
                           "prompt(s) for samples (default: the first captions)")


def add_eval(esub) -> None:
    ea = common.add_eval_parser(esub, "adapter", "teach the tiny base the reserved shape 'star' with each adapter "
                                "kind and a full fine-tune, with the defaults only; the star of the colour asked, "
                                "accuracy without the trigger, drift and training time, on a dev and a held-out split",
                                evaluate)
    ea.add_argument("--kinds", default="lora,dora,loha,lokr,oft,full")
    ea.add_argument("--split", choices=("dev", "held-out", "both"), default="both",
                    help="dev: what the defaults were chosen on; held-out: other stars, prompts and seeds")
    ea.add_argument("--steps", type=int, help="(default: the base's recipe; for quick checks only)")
    ea.add_argument("--batch-size", type=int, help="(default: the base's recipe)")
    ea.add_argument("--prompts", type=int, default=64, help="star prompts (and prompts without the trigger, half "
                    "of them one object) per split")
    ea.add_argument("--work", help="folder for datasets and trained files (default: a temporary folder)")


def train(args) -> int:
    req = TrainRequest(
        data=args.data, kind=args.kind, rank=args.rank, alpha=args.alpha, preset=args.preset, placement=args.placement,
        rslora=args.rslora, train_text_encoder=args.train_text_encoder, text_encoder_lr=args.text_encoder_lr,
        trigger=args.trigger, trigger_token=args.trigger_token, class_prompts=args.class_prompt or [],
        class_images=args.class_images, prior_weight=args.prior_weight, prior_target=args.prior_target,
        snr_gamma=args.snr_gamma, repeats=args.repeats, flip=args.flip, caption_dropout=args.caption_dropout,
        sample_prompts=args.sample_prompt or [], resolution=args.resolution, name=args.name, seed=args.seed)
    return common.run_training(args, req, services.check_adapter_request, services.train_adapter, "adapter",
                               args.kind, drift_samples=args.drift_samples)


def evaluate(args) -> int:
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS_AND_FULL]
    if bad or not kinds:
        raise HyperrealError(f"--kinds takes a comma-separated list of {', '.join(KINDS_AND_FULL)}, "
                             f"got {args.kinds!r}")
    if (args.steps is not None and args.steps < 1) or args.prompts < 2:
        raise HyperrealError("--steps must be at least 1 and --prompts at least 2")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="hyperreal-eval-adapter-"))
    splits = ("dev", "held-out") if args.split == "both" else (args.split,)
    figures = star.star_benchmark(kinds, work, splits=splits, steps=args.steps, batch_size=args.batch_size,
                                  n_prompts=args.prompts, base_name=args.base, vae=args.vae)
    figures["work"] = str(work)
    if args.json:
        print(json.dumps(figures))
    return 0
