"""What fits on a GPU: presets by card size, the mixed precision a base calls for, and the message an out-of-memory
error turns into.

The presets follow the memory figures diffusers publishes for its SD1.5 training scripts at 512 px
(examples/dreambooth/README.md, examples/controlnet/README.md: batch size, gradient checkpointing and 8-bit Adam
are what bring a run from ~38 GB down to 16 and 12 GB); latents and text embeddings are always cached here, so
the VAE and text encoder never run in the training step. They have not been measured on a GPU in this repository.
"""
from __future__ import annotations

import contextlib

import torch

from ..errors import HyperrealError

# card size (GB, at least) -> settings, per method; the smallest tier is used below 12 GB
PRESETS = {
    "adapter": {8: {"batch_size": 1, "gradient_checkpointing": True, "use_8bit_adam": True},
                12: {"batch_size": 2, "gradient_checkpointing": True, "use_8bit_adam": True},
                16: {"batch_size": 4, "gradient_checkpointing": True, "use_8bit_adam": False},
                24: {"batch_size": 8, "gradient_checkpointing": False, "use_8bit_adam": False}},
    "controlnet": {8: {"batch_size": 1, "gradient_checkpointing": True, "use_8bit_adam": True},
                   12: {"batch_size": 1, "gradient_checkpointing": True, "use_8bit_adam": True},
                   16: {"batch_size": 2, "gradient_checkpointing": True, "use_8bit_adam": True},
                   24: {"batch_size": 4, "gradient_checkpointing": True, "use_8bit_adam": False}},
    "bridge": {8: {"batch_size": 1, "gradient_checkpointing": True, "use_8bit_adam": True},
               12: {"batch_size": 2, "gradient_checkpointing": True, "use_8bit_adam": True},
               16: {"batch_size": 4, "gradient_checkpointing": True, "use_8bit_adam": False},
               24: {"batch_size": 8, "gradient_checkpointing": False, "use_8bit_adam": False}},
}
TIERS = (8, 12, 16, 24)


def card_gb(device=None) -> float | None:
    """The GPU's memory in GB (None on the CPU)."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    return torch.cuda.get_device_properties(torch.device(device or "cuda")).total_memory / 1024 ** 3


def tier_for(gb: float) -> int:
    """The largest tier the card holds (a "24 GB" card reports a little less than 24)."""
    return max([t for t in TIERS if gb >= t * 0.93] or [TIERS[0]])


def preset(method: str, vram: str | int | None, device=None) -> tuple[int | None, dict]:
    """(tier, settings) for ``--vram auto|8|12|16|24``; auto detects the card, and the CPU gets none."""
    if vram in (None, "", "auto"):
        gb = card_gb(device)
        if gb is None:
            return None, {}
        tier = tier_for(gb)
    else:
        try:
            tier = int(vram)
        except (TypeError, ValueError):
            tier = -1
        if tier not in TIERS:
            raise HyperrealError(f"--vram must be auto or one of {', '.join(map(str, TIERS))} (GB), got {vram!r}")
    return tier, dict(PRESETS[method][tier])


def precision_for(dtype: torch.dtype) -> str:
    """The mixed precision that matches the frozen parts' dtype: their half type, or none for fp32."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no")


def autocast_for(dtype: torch.dtype, device) -> contextlib.AbstractContextManager:
    """Autocast to a half base's dtype (so fp32 trained weights and half frozen ones meet); nothing for fp32."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(torch.device(device).type, dtype=dtype)
    return contextlib.nullcontext()


def half_dtype() -> torch.dtype:
    """bf16 where the card runs it natively (Ampere and later), else fp16; T4 and V100 only emulate bf16."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def out_of_memory(method: str | None, batch_size: int, checkpointing: bool, device=None) -> HyperrealError:
    """What to do about a CUDA out-of-memory error, with the preset that fits a smaller card."""
    gb = card_gb(device)
    below = [t for t in TIERS if gb is None or t < tier_for(gb)]
    smaller = below[-1] if gb is not None and below else TIERS[0]
    settings = PRESETS.get(method or "adapter", PRESETS["adapter"])[smaller]
    what = ", ".join([f"batch {settings['batch_size']}"]
                     + (["gradient checkpointing"] if settings["gradient_checkpointing"] else [])
                     + (["8-bit Adam"] if settings["use_8bit_adam"] else []))
    card = f" on this {gb:.0f} GB card" if gb else ""
    return HyperrealError(
        f"the GPU ran out of memory{card} at batch {batch_size}"
        f"{' with' if checkpointing else ' without'} gradient checkpointing. Fix: pick --vram {smaller} ({what}; in "
        "the app: the VRAM preset), or lower --resolution; the last checkpoint is kept, continue with --resume.")


def check_resolution(resolution: int | None) -> None:
    """A training resolution the VAE and UNet take: a multiple of 64 (SD's factor 8 times the UNet's three
    halvings) between 64 and 2048."""
    if resolution is not None and (not 64 <= resolution <= 2048 or resolution % 64):
        raise HyperrealError(f"--resolution must be a multiple of 64 between 64 and 2048, got {resolution}")
