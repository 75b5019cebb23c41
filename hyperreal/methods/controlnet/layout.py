"""lllyasviel's original ControlNet layout (the keys of ``control_v11p_sd15_*.pth``, which AUTOMATIC1111's
sd-webui-controlnet, ComfyUI and diffusers' ``from_single_file`` read): the key mapping from diffusers' names,
written once (:func:`original_name`) and checked against diffusers' own forward conversion; what a file holds
(ControlNet of which family, or something else); a diffusers config from the weights' shapes."""
from __future__ import annotations

import inspect
import json
import re

from diffusers import ControlNetModel

from ...errors import HyperrealError

ORIGINAL_PREFIX = "control_model."  # lllyasviel's .pth keys; A1111, ComfyUI and diffusers strip it
# input_hint_block index of the conditioning embedding's last conv: lllyasviel's for SD's six inner convs, and the
# index diffusers' converter always reads (a shorter embedding keeps it there; its inner convs are 2, 4, ...)
HINT_OUT = 14
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_CN_PARAMS = set(inspect.signature(ControlNetModel.__init__).parameters) - {"self"}
# SD1.5's real widths: A1111 and ComfyUI build these and nothing else (their cldm classes are fixed)
_SD_TOOL_WIDTHS = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "in_channels": 4,
                   "conditioning_embedding_out_channels": [16, 32, 96, 256],
                   "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]}


def _same(a, b) -> bool:
    return (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b)


class LayoutError(ValueError):
    """A ControlNet the lllyasviel layout cannot hold exactly (diffusers' converter would not give it back)."""


# --- the key mapping (written once) ----------------------------------------------------------------------------

def original_name(key: str, layers_per_block: int) -> str | None:
    """diffusers ControlNetModel key -> lllyasviel (cldm) key without prefix; None when it has no place there
    (SDXL's add_embedding, class embeddings). ``layers_per_block`` places the CompVis ``input_blocks`` indices."""
    n = int(layers_per_block) + 1  # input_blocks per down block: its resnets (+ attentions), then a downsampler
    match key.split("."):
        case ["time_embedding", ("linear_1" | "linear_2") as lin, leaf]:
            return f"time_embed.{0 if lin == 'linear_1' else 2}.{leaf}"
        case ["conv_in", leaf]:
            return f"input_blocks.0.0.{leaf}"
        case ["down_blocks", b, "resnets", j, part, leaf] if part in _RESNET:
            return f"input_blocks.{1 + int(b) * n + int(j)}.0.{_RESNET[part]}.{leaf}"
        case ["down_blocks", b, "attentions", j, *rest] if rest:
            return f"input_blocks.{1 + int(b) * n + int(j)}.1.{'.'.join(rest)}"
        case ["down_blocks", b, "downsamplers", "0", "conv", leaf]:
            return f"input_blocks.{(int(b) + 1) * n}.0.op.{leaf}"
        case ["mid_block", "resnets", j, part, leaf] if part in _RESNET:
            return f"middle_block.{2 * int(j)}.{_RESNET[part]}.{leaf}"
        case ["mid_block", "attentions", "0", *rest] if rest:
            return f"middle_block.1.{'.'.join(rest)}"
        case ["controlnet_down_blocks", i, leaf]:
            return f"zero_convs.{int(i)}.0.{leaf}"
        case ["controlnet_mid_block", leaf]:
            return f"middle_block_out.0.{leaf}"
        case ["controlnet_cond_embedding", "conv_in", leaf]:
            return f"input_hint_block.0.{leaf}"
        case ["controlnet_cond_embedding", "blocks", i, leaf]:
            return f"input_hint_block.{2 * int(i) + 2}.{leaf}"
        case ["controlnet_cond_embedding", "conv_out", leaf]:
            return f"input_hint_block.{HINT_OUT}.{leaf}"
    return None


def to_original(state_dict: dict, config: dict, prefix: str = ORIGINAL_PREFIX) -> dict:
    """A diffusers ControlNet state dict in lllyasviel's layout (same tensor objects, keys renamed).

    Raises :class:`LayoutError` unless diffusers' own ``convert_controlnet_checkpoint`` maps the result back to
    exactly ``state_dict`` (every key, the very same tensors), so what we write is what diffusers, A1111 and ComfyUI
    read."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    out: dict = {}
    for k, v in state_dict.items():
        name = original_name(k, config["layers_per_block"])
        if name is None or prefix + name in out:
            raise LayoutError(f"'{k}' has no place of its own in the lllyasviel layout")
        out[prefix + name] = v
    back = convert_controlnet_checkpoint(out, dict(config))
    if back.keys() != state_dict.keys() or any(back[k] is not state_dict[k] for k in state_dict):
        wrong = sorted(set(back) ^ set(state_dict)) or [k for k in state_dict if back[k] is not state_dict[k]]
        raise LayoutError(f"diffusers' converter would not read it back exactly (e.g. {wrong[:3]})")
    return out


def from_original(state_dict: dict, config: dict, model_keys) -> dict:
    """lllyasviel layout (prefix already stripped) -> diffusers keys, by inverting :func:`original_name` over the
    model's own keys. Keys with no counterpart are left out (the caller reports missing/unexpected tensors)."""
    sd = dict(state_dict)
    hint = [int(k.split(".")[1]) for k in sd if re.fullmatch(r"input_hint_block\.\d+\.weight", k)]
    if hint and f"input_hint_block.{HINT_OUT}.weight" not in sd and max(hint) < HINT_OUT:
        last = max(hint)  # a short embedding numbered as a Sequential (conv_out right after its last inner conv)
        for leaf in ("weight", "bias"):
            if f"input_hint_block.{last}.{leaf}" in sd:
                sd[f"input_hint_block.{HINT_OUT}.{leaf}"] = sd.pop(f"input_hint_block.{last}.{leaf}")
    names = {original_name(k, config["layers_per_block"]): k for k in model_keys}
    return {names[k]: v for k, v in sd.items() if k in names}


# --- what a file holds ----------------------------------------------------------------------------------------

def _layout(keys: list[str]) -> tuple[str | None, str]:
    """('lllyasviel' | 'diffusers' | None, the prefix to strip)."""
    ks = set(keys)
    if f"{ORIGINAL_PREFIX}input_hint_block.0.weight" in ks or f"{ORIGINAL_PREFIX}zero_convs.0.0.weight" in ks:
        return "lllyasviel", ORIGINAL_PREFIX
    if "input_hint_block.0.weight" in ks or "zero_convs.0.0.weight" in ks:
        return "lllyasviel", ""
    if "controlnet_cond_embedding.conv_in.weight" in ks or "controlnet_down_blocks.0.weight" in ks:
        return "diffusers", ""
    return None, ""


def what_it_looks_like(keys: list[str], meta: dict | None = None) -> str:
    """A few words on a .safetensors file that is not a ControlNet (for error messages)."""
    kind = (meta or {}).get("hyperreal_kind")
    if kind and kind != "controlnet":
        return f"a hyperreal {kind} file"
    ks = set(keys)

    def starts(*p):
        return any(k.startswith(p) for k in keys)

    def has(*s):
        return any(x in k for k in keys for x in s)

    if "lora_controlnet" in ks:
        return "a Control-LoRA (a ControlNet stored as low-rank weights), which hyperreal does not read"
    if starts("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_") or has(".lora_down.", ".lora_A.", ".hada_w1_",
                                                                          ".lokr_w1", "lora.down."):
        return "a LoRA / LyCORIS adapter"
    if starts("model.diffusion_model."):
        return "a full Stable Diffusion checkpoint (UNet, VAE and text encoder)"
    if has("image_proj.") and has("ip_adapter."):
        return "an IP-Adapter"
    if starts("adapter.") or "body.0.in_conv.weight" in ks or "body.0.block1.weight" in ks:
        return "a T2I-Adapter"
    if starts("up_blocks.") or "conv_norm_out.weight" in ks:
        return "a diffusers UNet"
    if starts("output_blocks.", "out.0."):
        return "a UNet in the original (CompVis) layout"
    if starts("encoder.down", "decoder.", "first_stage_model.", "quant_conv."):
        return "a VAE"
    if starts("text_model.", "cond_stage_model.", "conditioner.", "transformer.text_model."):
        return "a text encoder"
    return f"an unknown model (first tensors: {', '.join(sorted(keys)[:3]) or 'none'})"


def _not_a_controlnet(source: str, keys: list[str], meta: dict) -> HyperrealError:
    return HyperrealError(f"'{source}' is not a ControlNet: it looks like {what_it_looks_like(keys, meta)}. A "
                          "ControlNet file holds input_hint_block/zero_convs tensors (lllyasviel layout, e.g. "
                          "control_v11p_sd15_canny) or controlnet_cond_embedding/controlnet_down_blocks (diffusers)")


def _sdxl_error(source: str) -> HyperrealError:
    return HyperrealError(f"'{source}' is an SDXL ControlNet (it has SDXL's size conditioning, label_emb / "
                          "add_embedding); hyperreal's bases are SD1.5-family: use a ControlNet made for SD1.5 "
                          "(e.g. lllyasviel/control_v11p_sd15_canny) or one trained here")


def _family_error(source: str, shapes: dict, base: dict) -> HyperrealError | None:
    """An SDXL or SD2.x ControlNet, named as such (shapes in lllyasviel names, prefix stripped)."""
    if "label_emb.0.0.weight" in shapes:
        return _sdxl_error(source)
    ctx = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    if ctx in (1024, 2048) and ctx != base.get("cross_attention_dim"):  # other widths: checked against the base
        family = {1024: "an SD2.x", 2048: "an SDXL"}[ctx]
        return HyperrealError(f"'{source}' is {family} ControlNet (its cross-attention width is {ctx}, the base's "
                              f"{base.get('cross_attention_dim')}): it was made for another base. Use a ControlNet "
                              "trained for this base (python -m hyperreal models lists the embedded ones)")
    return None


def sd15_unet_config() -> dict:
    from ...loading import SD15_CONFIGS

    return json.loads((SD15_CONFIGS / "unet" / "config.json").read_text())


def _cn_config(unet_config: dict) -> dict:
    return {k: v for k, v in dict(unet_config).items() if k in _CN_PARAMS and not k.startswith("_")}


def config_from_weights(shapes: dict[str, list[int]], unet_config: dict | None = None, source: str = "") -> dict:
    """A ControlNetModel config for a headerless file (shapes in lllyasviel names, prefix stripped): the base's UNet
    config (``unet_config``; SD1.5's own when None, never the hub), with what the weights say about the
    conditioning embedding. With an explicit ``unet_config`` a file of other widths is refused; without one, the
    widths and block types are read off the weights (heads, norms and the rest stay SD1.5's)."""
    base = dict(unet_config) if unet_config is not None else sd15_unet_config()
    err = _family_error(source, shapes, base)
    if err is not None:
        raise err
    def idx(pattern: str) -> list[int]:
        return sorted({int(m.group(1)) for k in shapes if (m := re.fullmatch(pattern, k))})

    ops, inputs = idx(r"input_blocks\.(\d+)\.0\.op\.weight"), idx(r"input_blocks\.(\d+)\..*")
    hint = idx(r"input_hint_block\.(\d+)\.weight")
    per = ops[0] if ops else len(inputs) - 1  # input_blocks per down block (layers + its downsampler)
    n_down = len(ops) + 1
    starts = [1 + b * per for b in range(n_down)]
    if (not inputs or per < 2 or len(inputs) != n_down * per or len(hint) < 2
            or "input_blocks.0.0.weight" not in shapes or "input_hint_block.0.weight" not in shapes
            or any(f"input_blocks.{s}.0.out_layers.3.weight" not in shapes for s in starts)):
        raise HyperrealError(f"ControlNet file '{source}' has an input_blocks/input_hint_block structure hyperreal "
                             "does not recognise (not an SD1.5-shaped ControlNet)")
    proj = next((s for k, s in shapes.items() if k.endswith("proj_in.weight")), None)
    depth = {s: len(idx(rf"input_blocks\.{s}\.1\.transformer_blocks\.(\d+)\..*")) for s in starts}
    found = {
        "in_channels": shapes["input_blocks.0.0.weight"][1],
        "block_out_channels": [shapes[f"input_blocks.{s}.0.out_layers.3.weight"][0] for s in starts],
        "layers_per_block": per - 1,
        "down_block_types": ["CrossAttnDownBlock2D" if depth[s] else "DownBlock2D" for s in starts],
        "cross_attention_dim": next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")),
                                    base.get("cross_attention_dim")),
    }
    if unet_config is not None:
        wrong = [k for k in found if not _same(found[k], base.get(k))]
        if wrong:
            raise HyperrealError(f"ControlNet '{source}' was made for another base (its "
                                 + ", ".join(f"{k}={found[k]} vs the base's {base.get(k)}" for k in wrong)
                                 + "). Use a ControlNet trained for this base, or switch the base.")
    cfg = _cn_config(base)
    cfg.update(found)
    cfg["use_linear_projection"] = bool(proj is not None and len(proj) == 2)
    depths = {d for d in depth.values() if d}
    if len(depths) == 1:
        cfg["transformer_layers_per_block"] = depths.pop()
    cfg["mid_block_type"] = ("UNetMidBlock2DCrossAttn" if "middle_block.1.proj_in.weight" in shapes
                             else "UNetMidBlock2D")
    inner = [i for i in hint if i not in (0, max(hint))]  # conv_in, then pairs (same width, stride-2 wider)
    cfg["conditioning_channels"] = shapes["input_hint_block.0.weight"][1]
    cfg["conditioning_embedding_out_channels"] = [shapes["input_hint_block.0.weight"][0]] + [
        shapes[f"input_hint_block.{i}.weight"][0] for i in inner[1::2]]
    return cfg
