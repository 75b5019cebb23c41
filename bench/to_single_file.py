"""A diffusers SD1.x pipeline folder as ONE .safetensors in the original CompVis/A1111 layout (the layout of the
realism checkpoints people download: ``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.text_model.*``), or its VAE alone in the original layout (``encoder.down.0...``, like
``vae-ft-mse-840000-ema-pruned.safetensors``).

    python -m bench.to_single_file FOLDER OUT.safetensors [--half] [--with-config] [--vae-only]

``--with-config`` also writes ``OUT.config/``: the folder's configs and tokenizer without weights, which
``--base OUT.safetensors`` picks up beside the file (hyperreal.single_file.beside_config); the test suite uses it
for its narrow SD1.5-shaped models, whose widths differ from SD1.5's own configs.

Where the conversion comes from: diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py``
(huggingface/diffusers, Apache-2.0, last changed at edc154da09). It is not in the installed wheel (its RECORD has no
``scripts/``), so the UNet and VAE tables below are copied from it (SD1.x only: no OpenCLIP/SD2 text encoder). One
change for transformers 5: ``CLIPTextModel`` lost its ``text_model.`` level and saves ``embeddings.*`` /
``encoder.*``; the original layout (and diffusers' own single-file loader, A1111, ComfyUI) needs
``cond_stage_model.transformer.text_model.*``, so the prefix is put back.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# --- UNet: (stable-diffusion, diffusers) name pieces, from the diffusers script -------------------------------------

UNET_MAP = [
    ("time_embed.0.weight", "time_embedding.linear_1.weight"),
    ("time_embed.0.bias", "time_embedding.linear_1.bias"),
    ("time_embed.2.weight", "time_embedding.linear_2.weight"),
    ("time_embed.2.bias", "time_embedding.linear_2.bias"),
    ("input_blocks.0.0.weight", "conv_in.weight"),
    ("input_blocks.0.0.bias", "conv_in.bias"),
    ("out.0.weight", "conv_norm_out.weight"),
    ("out.0.bias", "conv_norm_out.bias"),
    ("out.2.weight", "conv_out.weight"),
    ("out.2.bias", "conv_out.bias"),
]
UNET_MAP_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]
UNET_MAP_LAYER = []
for i in range(4):  # SD1.x's 4 down/up blocks, 2 resnets (+ attentions) down, 3 up
    for j in range(2):
        UNET_MAP_LAYER.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
        if i < 3:
            UNET_MAP_LAYER.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
    for j in range(3):
        UNET_MAP_LAYER.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
        if i > 0:
            UNET_MAP_LAYER.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
    if i < 3:
        UNET_MAP_LAYER.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        UNET_MAP_LAYER.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
UNET_MAP_LAYER.append(("middle_block.1.", "mid_block.attentions.0."))
for j in range(2):
    UNET_MAP_LAYER.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))


def _replace(mapping: dict, pairs: list, only: str = "") -> None:
    """Each (ours, theirs) piece replaced in the new names of the keys that contain ``only``, in order."""
    for k, v in mapping.items():
        if only in k:
            for ours, theirs in pairs:
                v = v.replace(theirs, ours)
            mapping[k] = v


def convert_unet(sd: dict) -> dict:
    """diffusers UNet2DConditionModel keys -> the original UNet's (the order of the replacements matters)."""
    mapping = {k: k for k in sd}
    for ours, theirs in UNET_MAP:
        if theirs in mapping:
            mapping[theirs] = ours
    _replace(mapping, UNET_MAP_RESNET, "resnets")
    _replace(mapping, UNET_MAP_LAYER)
    return {v: sd[k] for k, v in mapping.items()}


# --- VAE -------------------------------------------------------------------------------------------------------------

VAE_MAP = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
for i in range(4):
    for j in range(2):
        VAE_MAP.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
    if i < 3:
        VAE_MAP.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
        VAE_MAP.append((f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
    for j in range(3):  # up blocks are numbered in reverse
        VAE_MAP.append((f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
for i in range(2):
    VAE_MAP.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
VAE_MAP_ATTN = [("norm.", "group_norm."), ("q.", "query."), ("k.", "key."), ("v.", "value."), ("proj_out.", "proj_attn.")]
VAE_EXTRA = [("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _as_conv(w: torch.Tensor) -> torch.Tensor:
    return w if w.ndim == 1 else w.reshape(*w.shape, 1, 1)  # linear -> 1x1 conv weights


def convert_vae(sd: dict) -> dict:
    """diffusers AutoencoderKL keys -> the original VAE's (mid-block attention as 1x1 convolutions)."""
    mapping = {k: k for k in sd}
    _replace(mapping, VAE_MAP)
    _replace(mapping, VAE_MAP_ATTN, "attentions")
    out = {v: sd[k] for k, v in mapping.items()}
    renames = {}
    for k, v in out.items():
        for name in ("q", "k", "v", "proj_out"):
            if f"mid.attn_1.{name}.weight" in k:
                out[k] = _as_conv(v)
        for new, old in VAE_EXTRA:
            if f"mid.attn_1.{new}.weight" in k or f"mid.attn_1.{new}.bias" in k:
                renames[k] = k.replace(new, old)
    for k, v in renames.items():
        out[v] = _as_conv(out.pop(k))
    return out


# --- text encoder ----------------------------------------------------------------------------------------------------

def convert_text_encoder(sd: dict) -> dict:
    """SD1.x's CLIP-L keeps transformers' names; transformers 5 drops ``text_model.``, the original layout has it."""
    if "text_model.encoder.layers.22.layer_norm2.bias" in sd or "encoder.layers.22.layer_norm2.bias" in sd:
        raise ValueError("a 23-layer (OpenCLIP, SD2.x) text encoder: this converter writes SD1.x only")
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


# --- files -----------------------------------------------------------------------------------------------------------

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx")


def pipeline_state_dict(folder: str | Path) -> dict:
    folder = Path(folder)
    unet = convert_unet(load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    vae = convert_vae(load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    te = convert_text_encoder(load_file(folder / "text_encoder" / "model.safetensors"))
    sd = {**{"model.diffusion_model." + k: v for k, v in unet.items()},
          **{"first_stage_model." + k: v for k, v in vae.items()},
          **{"cond_stage_model.transformer." + k: v for k, v in te.items()}}
    return {k: v.contiguous() for k, v in sd.items()}


def vae_state_dict(folder: str | Path) -> dict:
    """The VAE of a pipeline folder (or a VAE folder), original layout without a prefix."""
    folder = Path(folder)
    vae = folder / "vae" if (folder / "vae").is_dir() else folder
    return {k: v.contiguous() for k, v in convert_vae(load_file(vae / "diffusion_pytorch_model.safetensors")).items()}


def copy_configs(folder: str | Path, dest: str | Path) -> Path:
    """The folder's configs and tokenizer, no weights: what from_single_file needs besides the file."""
    dest = Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns(*(f"*{s}" for s in WEIGHT_SUFFIXES)))
    return dest


def write(folder: str | Path, out: str | Path, half: bool = False, with_config: bool = False,
          vae_only: bool = False) -> Path:
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError("the output must be a .safetensors file")
    sd = vae_state_dict(folder) if vae_only else pipeline_state_dict(folder)
    if half:
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out), metadata={"format": "pt"})
    if with_config and not vae_only:
        copy_configs(folder, out.with_suffix(".config"))
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a diffusers SD1.x pipeline folder (model_index.json, unet/, vae/, text_encoder/)")
    ap.add_argument("out", help="the .safetensors file to write")
    ap.add_argument("--half", action="store_true", help="store fp16 weights (as most downloaded checkpoints do)")
    ap.add_argument("--with-config", action="store_true", help="also write OUT.config/ (configs + tokenizer)")
    ap.add_argument("--vae-only", action="store_true", help="write the VAE alone (a --vae file)")
    args = ap.parse_args(argv)
    path = write(args.folder, args.out, args.half, args.with_config, args.vae_only)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
