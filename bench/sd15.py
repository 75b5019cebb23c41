"""SD1.5-shaped pipelines with random weights, built from SD1.5's real configs and CLIP tokenizer
(``hyperreal/configs/sd15``): the full-size one, and a narrow one for the test suite with the same block structure,
layer counts and module names, VAE factor 8 and 77 tokens, but small widths.

    python -m bench.sd15 OUT [--narrow] [--dtype bf16]   # writes a diffusers folder that --base OUT loads
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from hyperreal.loading import SD15_CONFIGS

# widths only: every count (blocks, layers per block, attention layers, text-encoder layers) stays SD1.5's
NARROW = {
    "unet": {"block_out_channels": [32, 64, 64, 64], "cross_attention_dim": 64, "attention_head_dim": 8},
    "vae": {"block_out_channels": [32, 32, 32, 32]},
    "text_encoder": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "projection_dim": 64},
}


def config(part: str, narrow: bool) -> dict:
    name = "config.json" if part != "scheduler" else "scheduler_config.json"
    c = json.loads((SD15_CONFIGS / part / name).read_text())
    return {**c, **(NARROW.get(part, {}) if narrow else {})}


def build(narrow: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """A random-weight SD1.5-shaped pipeline (the same seed gives the same weights)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config({k: v for k, v in config("unet", narrow).items() if not k.startswith("_")})
    vae = AutoencoderKL.from_config({k: v for k, v in config("vae", narrow).items() if not k.startswith("_")})
    te_config = {k: v for k, v in config("text_encoder", narrow).items() if k not in ("architectures", "torch_dtype")}
    text_encoder = CLIPTextModel(CLIPTextConfig(**te_config))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(SD15_CONFIGS / "tokenizer"),
        unet=unet, scheduler=PNDMScheduler.from_config(config("scheduler", narrow)), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    return pipe.to(dtype=dtype)


def save(folder: str | Path, narrow: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """The pipeline as a diffusers folder (safetensors), loadable with ``--base FOLDER``."""
    folder = Path(folder)
    build(narrow, seed, dtype).save_pretrained(folder, safe_serialization=True)
    return folder


def parameter_counts(pipe) -> dict[str, int]:
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters())
            for name in ("unet", "vae", "text_encoder")}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--narrow", action="store_true")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    args = ap.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    save(args.out, args.narrow, dtype=dtype)
    print(json.dumps({"folder": args.out, **parameter_counts(StableDiffusionPipeline.from_pretrained(args.out))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
