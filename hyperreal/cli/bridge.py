"""``train bridge`` and ``eval bridge``: an extra text encoder joined to the frozen base (fuse or swap)."""
from __future__ import annotations

import json
from pathlib import Path

from .. import services
from ..errors import HyperrealError
from ..methods import bridge
from ..registry import find_embedded
from . import common
from .common import bench

synonyms = bench("synonyms")


def add_train(tsub) -> None:
    tb = tsub.add_parser("bridge", help="an extra text encoder joined by cross-attention (fuse) or translated into "
                         "the base's text space (swap)")
    common.add_base_arg(tb)
    tb.add_argument("--encoder", help="hub id or local folder of a transformers encoder (BART, BERT, T5 encoder, "
                    "XLM-R or multilingual E5 for prompts in other languages), 'use-multilingual' (offline Universal "
                    "Sentence Encoder multilingual, 16 languages) or 'minilm' (offline all-MiniLM-L6-v2); default: "
                    "the base's own (use-multilingual on tiny, facebook/bart-base otherwise)")
    tb.add_argument("--mode", default="swap", help="swap (the default: a residual translator distilled against the "
                    "base text encoder from captions alone, blended by the scale) | fuse (decoupled cross-attention, "
                    "gates from 0; needs images)")
    tb.add_argument("--data", required=True, help="captions .txt (swap), a dataset folder/.zip with captions "
                    "(images needed for fuse and --diffusion-steps), or 'shapes' (the tiny base's world)")
    tb.add_argument("--out", required=True, help="output folder (NAME.safetensors, checkpoints, summary.json)")
    common.add_loop_args(tb, lr_help="learning rate (default: the base's recipe for the mode)")
    tb.add_argument("--diffusion-steps", type=int, default=0, help="swap: a second stage with the diffusion loss "
                    "through the frozen UNet (needs images)")
    tb.add_argument("--max-length", type=int, help="extra encoder tokens (default: the base tokenizer's length)")
    tb.add_argument("--width", type=int, default=256, help="the bridge's hidden width")
    tb.add_argument("--layers", type=int, default=3, help="swap: translator layers")
    tb.add_argument("--heads", type=int, default=4)
    tb.add_argument("--lora-rank", type=int, default=0, help="LoRA rank on the extra encoder's attention (0: off)")
    tb.add_argument("--base-dropout", type=float, default=0.5, help="fuse: how often the base text encoder is "
                    "given an empty prompt in training, so the new path learns to carry the prompt")
    tb.add_argument("--no-paraphrase", action="store_true", help="train on the captions as written only")
    tb.add_argument("--scenes", type=int, default=services.SHAPES_SCENES,
                    help="--data shapes: scenes rendered for the diffusion loss")
    common.add_output_args(tb, "bridge", "file name of the bridge", train)


def add_eval(esub) -> None:
    eb = common.add_eval_parser(esub, "bridge", "colour+shape accuracy of the tiny base alone and with bridges on "
                                "prompts with synonyms and other phrasings, and on the original captions", evaluate)
    eb.add_argument("--bridge", action="append", help="LABEL=FILE|NAME to measure (default: the embedded "
                    "tiny-bridge, both modes)")
    eb.add_argument("--synonym-prompts", type=int, default=96, help="English prompts with unseen words, per split")
    eb.add_argument("--language-prompts", type=int, default=32, help="prompts per other language, per split")
    eb.add_argument("--original-prompts", type=int, default=64, help="held-out captions per set (one, two objects)")
    eb.add_argument("--split", choices=("dev", "held-out", "both"), default="both",
                    help="the prompts' split (targets are judged on held-out)")


def train(args) -> int:
    req = bridge.TrainRequest(data=args.data, mode=args.mode, encoder=args.encoder, max_length=args.max_length,
                              width=args.width, layers=args.layers, heads=args.heads, lora_rank=args.lora_rank,
                              diffusion_steps=args.diffusion_steps, base_dropout=args.base_dropout,
                              paraphrase=not args.no_paraphrase, sample_prompts=args.sample_prompt or [],
                              resolution=args.resolution, name=args.name, seed=args.seed)
    return common.run_training(args, req, services.check_bridge_request, services.train_bridge, "bridge", args.mode,
                               scenes=args.scenes)


def evaluate(args) -> int:
    if min(args.synonym_prompts, args.original_prompts, args.language_prompts) < 2:
        raise HyperrealError("--synonym-prompts, --language-prompts and --original-prompts must be at least 2")
    if args.bridge:
        bridges = {}
        for item in args.bridge:
            label, sep, src = item.partition("=")
            bridges[label if sep else Path(item).stem] = src if sep else item
    else:
        art = find_embedded("tiny-bridge", "bridge")
        if art is None:
            raise HyperrealError("no embedded tiny-bridge; pass --bridge LABEL=FILE")
        bridges = {mode: f"tiny-bridge:{mode}" for mode in art.info.get("files", {})}
    for src in bridges.values():
        bridge.read_header(bridge.resolve_bridge_path(src))
    base = common.load(args)
    if base.name != "tiny":
        raise HyperrealError("eval bridge measures the tiny base's shapes world; use --base tiny")
    splits = ("dev", "held-out") if args.split == "both" else (args.split,)
    figures = synonyms.benchmark(base, bridges, args.synonym_prompts, args.original_prompts, args.language_prompts,
                                 splits)
    if args.json:
        print(json.dumps(figures))
    return 0
