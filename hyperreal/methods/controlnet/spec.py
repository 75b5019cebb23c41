"""What a ControlNet is: a trainable copy of the UNet's encoder (``ControlNetModel.from_unet``) joined to the
frozen UNet by zero-initialised convolutions, its conditioning embedding sized to the base's VAE factor.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import ControlNetModel

from ...errors import HyperrealError
from ...loading import plain

WHAT_LEARNS = ("ControlNet trains a copy of the UNet's encoder and middle block (initialised from the base) that "
               "reads a condition map; it joins the frozen UNet through zero-initialised 1x1 convolutions, so it "
               "starts as an exact no-op. The UNet, VAE and text encoder stay frozen, bit for bit; the loss is "
               "measured through the frozen UNet.")
EXTRACTOR_KINDS = ("canny", "softedge", "pose", "given")
PREPROCESS_KINDS = ("none", "canny", "softedge", "pose")


def conditioning_channels_for(vae_scale_factor: int) -> tuple[int, ...]:
    """The conditioning embedding must downsample the map by the VAE factor: one entry per halving, plus one.

    diffusers' default ``(16, 32, 96, 256)`` fits SD's factor 8; a base with factor 4 needs three entries.
    """
    f = int(vae_scale_factor)
    n = int(round(math.log2(f))) if f > 0 else -1
    if f < 1 or 2 ** n != f:
        raise HyperrealError(f"the base's VAE factor {vae_scale_factor} is not a power of two; ControlNet cannot "
                             "match its latent size")
    default = (16, 32, 96, 256)
    return default[:n + 1] if n + 1 <= len(default) else default + (256,) * (n + 1 - len(default))


def new_controlnet(pipe, conditioning_channels: tuple[int, ...] | None = None):
    """A fresh ControlNet for the pipeline's UNet: the encoder copied, every zero convolution at zero (fp32)."""
    chans = tuple(conditioning_channels or conditioning_channels_for(pipe.vae_scale_factor))
    cn = ControlNetModel.from_unet(plain(pipe.unet), conditioning_embedding_out_channels=chans)
    return cn.to(device=pipe.unet.device, dtype=torch.float32)


def zero_convolutions(controlnet) -> dict[str, torch.nn.Parameter]:
    """The parameters of the zero-initialised convolutions (the down/mid blocks' and the embedding's output)."""
    return {n: p for n, p in controlnet.named_parameters()
            if n.startswith(("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out."))}


def check_fits(controlnet, unet, source: str) -> None:
    """A ControlNet only fits the UNet family it was copied from."""
    a, b = controlnet.config, unet.config
    mismatch = [k for k in ("block_out_channels", "cross_attention_dim", "in_channels", "layers_per_block")
                if list(np.atleast_1d(getattr(a, k, None))) != list(np.atleast_1d(getattr(b, k, None)))]
    if mismatch:
        raise HyperrealError(
            f"ControlNet '{source}' was made for another base (its {', '.join(mismatch)} differ from this base's "
            f"UNet: {', '.join(f'{k}={getattr(a, k, None)} vs {getattr(b, k, None)}' for k in mismatch)}). Use a "
            "ControlNet trained for this base (python -m hyperreal models lists the embedded ones), or switch the "
            "base.")
