"""Bridges at generation time: fuse's decoupled cross-attention processors, swap's blended prompt embeddings,
encoders and bridges loaded once per base, and the ``bridge`` job key.
"""
from __future__ import annotations

import contextlib
import json

import torch
import torch.nn.functional as F

from ... import sources
from ...errors import HyperrealError
from ...pipelines import JobKey, generate_images
from .encoders import TextEncoder, load_encoder, resolve_encoder
from .files import load_bridge, read_header, resolve_bridge_path
from .spec import Bridge, BridgeSpec, LoadedBridge, base_linear, check_compatible, cross_attention_layers


# --- fuse: decoupled cross-attention processors ---------------------------------------------------------------

class FuseState:
    """What the processors read for one call: the extra tokens ([cond] and optionally [uncond]), mask, scale."""

    def __init__(self):
        self.tokens = self.mask = self.uncond_tokens = self.uncond_mask = None
        self.scale = 1.0

    def set(self, tokens, mask, uncond_tokens=None, uncond_mask=None, scale: float = 1.0) -> None:
        self.tokens, self.mask, self.uncond_tokens, self.uncond_mask = tokens, mask, uncond_tokens, uncond_mask
        self.scale = scale

    def clear(self) -> None:
        self.set(None, None)

    def for_batch(self, n: int):
        b = self.tokens.shape[0]
        if n == b:
            return self.tokens, self.mask
        if n == 2 * b and self.uncond_tokens is not None:  # classifier-free guidance: [uncond, cond]
            return torch.cat([self.uncond_tokens, self.tokens]), torch.cat([self.uncond_mask, self.mask])
        if n % b == 0:  # several images per prompt
            r = n // b
            return self.tokens.repeat_interleave(r, 0), self.mask.repeat_interleave(r, 0)
        raise RuntimeError(f"bridge: the UNet batch ({n}) does not match the extra tokens ({b})")


class FuseAttnProcessor:
    """Wraps a cross-attention layer's own processor: ``out = base(...) + g * scale * to_out(attn(q, k', v'))``.

    The base part is the layer's original processor, called unchanged, so at g = 0 the output is the base's bit
    for bit. The extra part is added before ``to_out``'s bias (as IP-Adapter does, ``to_out`` being linear).
    """

    def __init__(self, base_proc, bridge: Bridge, index: int, state: FuseState):
        self.base_proc, self.bridge, self.index, self.state = base_proc, bridge, index, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        out = self.base_proc(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, temb=temb)
        st = self.state
        if st.tokens is None or encoder_hidden_states is None or hidden_states.ndim != 3:
            return out
        tokens, mask = st.for_batch(hidden_states.shape[0])
        b = self.bridge
        dt = b.to_k[self.index].weight.dtype
        q = attn.to_q(hidden_states).to(dt)
        k = b.to_k[self.index](tokens.to(dt))
        v = b.to_v[self.index](tokens.to(dt))
        n, h = q.shape[0], attn.heads
        d = q.shape[-1] // h
        q, k, v = (t.view(n, -1, h, d).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bool()[:, None, None, :].to(q.device))
        a = a.transpose(1, 2).reshape(n, -1, h * d)
        lin = base_linear(attn.to_out[0])
        extra = F.linear(a, lin.weight.to(dt)) / attn.rescale_output_factor
        return out + (b.gates[self.index] * st.scale * extra).to(out.dtype)


@contextlib.contextmanager
def fuse_installed(unet, bridge: Bridge, state: FuseState):
    """Install the bridge's processors on ``unet`` for the duration; the previous processors come back on exit."""
    before = dict(unet.attn_processors)
    names = [n for n, _ in bridge.spec.fuse_layers]
    have = [n for n, _ in cross_attention_layers(unet)]
    if names != have:
        raise HyperrealError(f"this fuse bridge was trained for a UNet with cross-attention layers {names[:2]}..., "
                             "not this base's; train one for this base")
    procs = dict(before)
    for i, n in enumerate(names):
        procs[n] = FuseAttnProcessor(before[n], bridge, i, state)
    unet.set_attn_processor(procs)
    try:
        yield state
    finally:
        unet.set_attn_processor(before)


# --- inference ----------------------------------------------------------------------------------------------

MAX_CACHED = 4  # encoders, and bridges, kept loaded per base between jobs
_ENCODERS = sources.PerBaseCache(MAX_CACHED)
_BRIDGES = sources.PerBaseCache(MAX_CACHED)


def get_encoder(base, source: str) -> TextEncoder:
    return _ENCODERS.get(base.pipe.unet, resolve_encoder(source), lambda: load_encoder(source, base.pipe.device))


def get_bridge(base, source: str) -> LoadedBridge:
    """Load a bridge for this base once (encoders and bridges are cached beside the base)."""
    path = resolve_bridge_path(source)

    def load() -> LoadedBridge:
        spec = BridgeSpec(**read_header(path)["spec"])
        # a bridge with encoder LoRA changes its encoder: it loads a private copy
        lb = load_bridge(str(path), encoder=None if spec.lora_rank else get_encoder(base, spec.encoder),
                         device=base.pipe.device)
        check_compatible(base, lb, f"bridge '{source}'")
        return lb

    return _BRIDGES.get(base.pipe.unet, sources.identity(path), load)


@contextlib.contextmanager
def conditioning(pipe, lb: LoadedBridge, prompts: list[str], negatives: list[str] | None, scale: float = 1.0,
                 guidance: float = 5.0):
    """The pipeline keyword arguments (and, in fuse mode, the installed processors) for one call.

    Yields a dict that replaces ``prompt``/``negative_prompt`` in swap mode (``prompt_embeds`` = blend) and is
    empty in fuse mode, where the prompts stay and the processors read the extra tokens.
    """
    neg = [n or "" for n in (negatives or [""] * len(prompts))]
    # an empty negative prompt stays the base's own in both modes (the bridge never learnt "nothing"); guidance
    # multiplies any change to it (at 5, four times), on prompts the base reads as well
    empty = torch.tensor([not x for x in neg], device=pipe.unet.device)[:, None, None]
    with torch.no_grad():
        if lb.spec.mode == "swap":
            dev = pipe.text_encoder.device
            base_pos, _ = pipe.encode_prompt(prompts, dev, 1, False)
            ours, _ = lb.encode(prompts, base_pos)
            out = {"prompt_embeds": (1.0 - scale) * base_pos + scale * ours.to(base_pos.dtype)}
            if any(neg):
                base_neg, _ = pipe.encode_prompt(neg, dev, 1, False)
                theirs, _ = lb.encode(neg, base_neg)
                blend = (1.0 - scale) * base_neg + scale * theirs.to(base_neg.dtype)
                out["negative_prompt_embeds"] = torch.where(empty.to(dev), base_neg, blend)
            yield out
            return
        both, mask = lb.encode(prompts + neg)  # one call: the same padded length for cond and uncond
    n = len(prompts)
    # fuse: zero tokens add exactly nothing (its keys and values have no bias)
    uncond = torch.where(empty.to(both.device), torch.zeros_like(both[n:]), both[n:])
    state = FuseState()
    state.set(both[:n], mask[:n], uncond, mask[n:], scale)
    with fuse_installed(pipe.unet, lb.bridge, state):
        yield {}


def check_job_bridge(value, where: str = "job") -> dict:
    """Validate a job's ``"bridge": {"path": FILE|NAME, "scale": 1.0}``; the file must exist and be a bridge."""
    example = '{"path": "my_bridge.safetensors", "scale": 1.0}'
    if not isinstance(value, dict):
        raise HyperrealError(f"{where}: 'bridge' must be an object like {example}")
    unknown = sorted(set(value) - {"path", "scale"})
    if unknown:
        raise HyperrealError(f"{where}: 'bridge' has unknown key(s) {', '.join(map(repr, unknown))}; allowed: path, scale")
    path = value.get("path")
    if not isinstance(path, str) or not path.strip():
        raise HyperrealError(f"{where}: 'bridge' needs a \"path\" (a .safetensors file or an embedded name), e.g. {example}")
    s = value.get("scale", 1.0)
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s <= 2.0:
        raise HyperrealError(f"{where}: 'bridge' 'scale' must be a number between 0 and 2, got {json.dumps(s)}")
    try:
        read_header(resolve_bridge_path(path))
    except HyperrealError as e:
        raise HyperrealError(f"{where}: {e}") from None
    return {"path": path, "scale": float(s)}


@contextlib.contextmanager
def bridged(call, lb: LoadedBridge, scale: float = 1.0):
    """``call`` with the bridge on until the block ends: swap replaces the prompts by their blended embeddings,
    fuse installs its processors on the UNet (the prompts stay)."""
    prompt, negative = call.kwargs.get("prompt"), call.kwargs.get("negative_prompt")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative] if isinstance(negative, str) else list(negative or [""] * len(prompts))
    with conditioning(call.pipe, lb, prompts, negatives, scale, call.kwargs.get("guidance_scale", 5.0)) as extra:
        drop = tuple(k for k in ("prompt", "negative_prompt") if f"{k}_embeds" in extra)
        with call.changed(drop=drop, **extra):
            yield call


@contextlib.contextmanager
def apply_job_bridge(base, value: dict | None, call):
    """The ``bridge`` job key: changes ``call`` for one job, restores it on exit."""
    if not value:
        yield call
        return
    with bridged(call, get_bridge(base, value["path"]), value.get("scale", 1.0)):
        yield call


def generate(pipe, lb: LoadedBridge | None, pairs: list[tuple[str, int]], steps: int, guidance: float,
             scale: float = 1.0, batch: int = 16, **size) -> list:
    """Images for (prompt, seed) pairs with the bridge (``lb=None``: the base alone), seeds as in jobs."""
    edit = None if lb is None else (lambda call, first, last: bridged(call, lb, scale))
    return generate_images(pipe, pairs, steps, guidance, batch, edit=edit, **size)


def prepare_job_bridge(base, value: dict) -> dict:
    """The bridge and its encoder loaded before the job takes the base's lock, with a deadline."""
    sources.with_deadline(lambda: get_bridge(base, value["path"]), f"bridge '{value['path']}'")
    return value


JOB = JobKey("bridge", check_job_bridge, apply_job_bridge, prepare=prepare_job_bridge)
