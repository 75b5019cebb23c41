"""ControlNet single files at full SD1.5 size (random weights, CPU, ~1 minute, ~8 GB RAM): the file hyperreal writes
has exactly the 340 tensor names of lllyasviel's ``control_v11p_sd15_*`` files, diffusers' own converter gives back
every tensor, ``ControlNetModel.from_single_file`` loads it offline with the folder's config and with SD1.5's UNet
config (``config=hyperreal/configs/sd15, subfolder="unet"``), and hyperreal reads it without its header.

    python -m bench.controlnet_files [--out DIR]

``lllyasviel_keys`` is the key list from lllyasviel's module structure (ControlNet/cldm/cldm.py), independent of
hyperreal's mapping; the tests use it too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def wb(name: str) -> list[str]:
    return [f"{name}.weight", f"{name}.bias"]


def lllyasviel_keys(widths, layers: int = 2, attention=(True, True, True, False), hint_inner: int = 6,
                    prefix: str = "control_model.") -> set[str]:
    """The tensor names of lllyasviel's ControlNet (cldm.py; the keys of control_v11p_sd15_*.pth, what A1111's cldm
    and ComfyUI's comfy/cldm build), from its module structure: time_embed; input_blocks of ResBlock
    (+ SpatialTransformer) and a Downsample ``op`` per level but the last; a zero conv after every input block;
    middle_block ResBlock / SpatialTransformer / ResBlock and its zero conv; input_hint_block, a Sequential whose convs
    sit at even indices, the last at 14 for SD's (16, 32, 96, 256) embedding (diffusers always reads it there)."""
    def res(p, skip):
        return [k for m in ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3")
                for k in wb(f"{p}.{m}")] + (wb(f"{p}.skip_connection") if skip else [])

    def transformer(p):
        t = f"{p}.transformer_blocks.0"
        keys = wb(f"{p}.norm") + wb(f"{p}.proj_in") + wb(f"{p}.proj_out")
        for a in ("attn1", "attn2"):
            keys += [f"{t}.{a}.to_q.weight", f"{t}.{a}.to_k.weight", f"{t}.{a}.to_v.weight"] + wb(f"{t}.{a}.to_out.0")
        return keys + [k for m in ("norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2") for k in wb(f"{t}.{m}")]

    keys = wb("time_embed.0") + wb("time_embed.2") + wb("input_blocks.0.0")
    i, ch = 1, widths[0]
    for level, w in enumerate(widths):
        for _ in range(layers):
            keys += res(f"input_blocks.{i}.0", ch != w) + (transformer(f"input_blocks.{i}.1") if attention[level]
                                                            else [])
            ch, i = w, i + 1
        if level < len(widths) - 1:
            keys, i = keys + wb(f"input_blocks.{i}.0.op"), i + 1
    keys += [k for z in range(i) for k in wb(f"zero_convs.{z}.0")]
    keys += res("middle_block.0", False) + transformer("middle_block.1") + res("middle_block.2", False)
    keys += wb("middle_block_out.0")
    keys += [k for h in (0, *range(2, 2 * hint_inner + 1, 2), 14) for k in wb(f"input_hint_block.{h}")]
    return {prefix + k for k in keys}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="where to write the files (default: a temporary folder)")
    args = ap.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.torch import load_file, save_file

    from hyperreal.loading import SD15_CONFIGS
    from hyperreal.methods import controlnet
    from hyperreal.methods.controlnet import files

    t0 = time.time()
    out = Path(args.out or tempfile.mkdtemp(prefix="cn-full-"))
    torch.manual_seed(0)
    cn = ControlNetModel.from_config(files._cn_config(json.loads((SD15_CONFIGS / "unet" / "config.json").read_text())))
    with torch.no_grad():
        for p in controlnet.zero_convolutions(cn).values():
            p.normal_(0, 0.02)
    folder, single = files.save_controlnet(cn, out, {"base": "sd15", "extractor": "canny"}, name="full")
    ref = cn.state_dict()

    def same(m) -> bool:
        got = m.state_dict()
        return got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)

    tensors = load_file(single)
    back = convert_controlnet_checkpoint(dict(tensors), dict(cn.config))
    bare = out / "bare.safetensors"
    save_file(tensors, str(bare))  # no header: as another tool's file
    checks = {
        "keys == lllyasviel SD1.5 (340)": set(tensors) == lllyasviel_keys([320, 640, 1280, 1280])
                                           and len(tensors) == 340,
        "diffusers converter gives every tensor back": back.keys() == ref.keys() and all(
            torch.equal(back[k], ref[k]) for k in ref),
        "from_single_file, config=folder": same(ControlNetModel.from_single_file(
            str(single), config=str(folder), local_files_only=True)),
        "from_single_file, config=sd15 unet": same(ControlNetModel.from_single_file(
            str(single), config=str(SD15_CONFIGS), subfolder="unet", local_files_only=True)),
        "hyperreal, headerless": same(controlnet.load_controlnet(str(bare))),
        "card lists A1111 and ComfyUI": "models/ControlNet" in (out / "README.md").read_text()
                                        and files.fits_a1111_comfyui(dict(cn.config)),
    }
    for name, ok in checks.items():
        print(f"{'ok ' if ok else 'BAD'} {name}")
    print(f"{out}: {single.stat().st_size / 1e6:.0f} MB, {time.time() - t0:.0f}s")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
