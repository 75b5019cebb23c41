"""Method 1: an extra pretrained text encoder (BART, BERT, T5 encoder, ...) joined to the frozen base.

The base keeps its own text encoder and UNet untouched; only the new side learns.

- **fuse** (default): decoupled cross-attention (IP-Adapter's pattern). Every cross-attention layer of the UNet gets
  new key/value projections, initialised as copies of that layer's own, reading all tokens of the extra encoder
  (with a key-padding mask); the layer's output becomes ``attn_base + g * attn_extra`` with one gate ``g`` per layer,
  initialised to 0, so the start is exactly the base and the gates still get gradients.
- **swap**: a small translator maps the extra encoder's tokens into the base text encoder's output space (77x768 on
  SD1.5). It is trained first by distillation against the base text encoder on captions alone
  (GlueGen's idea: no images, no UNet backward pass), then optionally with the diffusion loss through the frozen
  UNet. At inference ``condition = (1 - a) * base + a * bridge``; ``a = 0`` is the original. A *residual* swap
  bridge (the default for new ones) reads the base encoder's output too and adds a correction to it, whose last
  layer starts at zero: at the start it returns the base's own condition exactly, and it learns to leave prompts
  the base already reads alone, so what the base knew is kept at ``a = 1`` as well.

A pooled sentence encoder (one vector per text, e.g. USE multilingual) is read as one token and projected to
``pooled_tokens`` tokens by a learned linear layer, as IP-Adapter projects an image embedding.

Both read a learned weighted mix of all of the encoder's layer outputs (each layer normalised), not only the last.
Optionally LoRA (PEFT) on the extra encoder's attention learns too. One small ``.safetensors`` file holds the bridge,
the new attention weights and any encoder LoRA, with its description (base, encoder id, mode, max length, ...) as
JSON in the header; the encoder itself is referenced by id and loaded through transformers (safetensors only,
never remote code).

This module holds what a bridge is (:class:`BridgeSpec`, the :class:`Bridge` module) and a loaded one with its
encoder (:class:`LoadedBridge`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import HyperrealError
from .encoders import TextEncoder

MODES = ("fuse", "swap")
FORMAT = "hyperreal-bridge-1"
WHAT_LEARNS = ("Frozen: the base's UNet, VAE and text encoder, and the extra encoder. Learns: the bridge (a learned "
               "mix of the extra encoder's layers and a small network); in fuse mode also new key/value projections "
               "and one gate per UNet cross-attention layer (gates start at 0: the exact base); optionally LoRA on "
               "the extra encoder's attention.")


@dataclass
class BridgeSpec:
    mode: str
    encoder: str
    encoder_width: int
    encoder_states: int
    max_length: int
    base_width: int  # the base text encoder's width = the UNet's cross-attention width
    base_length: int  # the base tokenizer's length (swap output length)
    width: int = 256
    layers: int = 3
    heads: int = 4
    lora_rank: int = 0
    fuse_layers: list = field(default_factory=list)  # [[processor name, inner dim], ...]
    pooled_tokens: int = 0  # > 0: the encoder gives one vector per text, projected to this many tokens
    residual: bool = False  # swap: base condition + a zero-initialised correction (files before it: False)

    def check(self) -> None:
        if self.mode not in MODES:
            raise HyperrealError(f"--mode must be fuse or swap, got {self.mode!r}")
        if self.width % self.heads:
            raise HyperrealError(f"--width ({self.width}) must be a multiple of --heads ({self.heads})")
        if not 1 <= self.max_length <= 512:
            raise HyperrealError(f"--max-length must be between 1 and 512, got {self.max_length}")
        if not 0 <= self.pooled_tokens <= 77:
            raise HyperrealError(f"pooled tokens must be between 0 and 77, got {self.pooled_tokens}")


def cross_attention_layers(unet) -> list[tuple[str, object]]:
    """(processor name, Attention module) for every cross-attention layer of a UNet, in a fixed order."""
    out = []
    for name, m in unet.named_modules():
        if name.endswith("attn2") and getattr(m, "is_cross_attention", False):
            out.append((f"{name}.processor", m))
    return out


def base_linear(m):
    """A linear layer under any PEFT wrapper (adapters may wrap the UNet's projections)."""
    return m.get_base_layer() if hasattr(m, "get_base_layer") else m


class Bridge(nn.Module):
    def __init__(self, spec: BridgeSpec):
        super().__init__()
        spec.check()
        self.spec = spec
        self.mix_logits = nn.Parameter(torch.zeros(spec.encoder_states))
        w = spec.width
        if spec.pooled_tokens:
            self.expand = nn.Linear(spec.encoder_width, spec.pooled_tokens * spec.encoder_width)
        if spec.mode == "swap":
            self.inp = nn.Linear(spec.encoder_width, w)
            self.queries = nn.Parameter(torch.randn(spec.base_length, w) * 0.02)
            if spec.residual:
                self.base_in = nn.Linear(spec.base_width, w)
            self.blocks = nn.ModuleList(
                nn.TransformerDecoderLayer(w, spec.heads, 2 * w, dropout=0.0, batch_first=True, norm_first=True)
                for _ in range(spec.layers))
            self.out_norm = nn.LayerNorm(w)
            self.out = nn.Linear(w, spec.base_width)
            if spec.residual:  # the correction starts at exactly zero: the base's own condition
                nn.init.zeros_(self.out.weight)
                nn.init.zeros_(self.out.bias)
        else:
            self.proj = nn.Sequential(nn.Linear(spec.encoder_width, w), nn.GELU(), nn.Linear(w, spec.base_width))
            self.out_norm = nn.LayerNorm(spec.base_width)
            self.to_k = nn.ModuleList(nn.Linear(spec.base_width, inner, bias=False) for _, inner in spec.fuse_layers)
            self.to_v = nn.ModuleList(nn.Linear(spec.base_width, inner, bias=False) for _, inner in spec.fuse_layers)
            self.gates = nn.Parameter(torch.zeros(len(spec.fuse_layers)))

    @classmethod
    def create(cls, spec: BridgeSpec, unet=None, seed: int = 0) -> "Bridge":
        """A fresh bridge; in fuse mode its key/value projections start as copies of ``unet``'s own."""
        if spec.mode == "fuse":
            layers = cross_attention_layers(unet)
            spec.fuse_layers = [[n, int(base_linear(m.to_k).weight.shape[0])] for n, m in layers]
            if any(base_linear(m.to_k).weight.shape[1] != spec.base_width for _, m in layers):
                raise HyperrealError("the UNet's cross-attention width differs from its text encoder's")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            b = cls(spec)
        if spec.mode == "fuse":
            with torch.no_grad():
                for i, (_, m) in enumerate(cross_attention_layers(unet)):
                    b.to_k[i].weight.copy_(base_linear(m.to_k).weight.float())
                    b.to_v[i].weight.copy_(base_linear(m.to_v).weight.float())
        return b

    def mix(self, states: list[torch.Tensor]) -> torch.Tensor:
        """Learned weighted mix of all layer outputs, each normalised (softmax weights, uniform at the start)."""
        w = torch.softmax(self.mix_logits, 0)
        return sum(w[i] * F.layer_norm(s.float(), s.shape[-1:]) for i, s in enumerate(states))

    def token_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The mask of the tokens the bridge reads: a pooled vector's projected tokens are all real."""
        if not self.spec.pooled_tokens:
            return mask
        return torch.ones(mask.shape[0], self.spec.pooled_tokens, dtype=mask.dtype, device=mask.device)

    def tokens(self, states: list[torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The extra encoder's reading as tokens and their mask (a pooled vector projected to a few tokens)."""
        x = self.mix(states)
        if self.spec.pooled_tokens:
            n, k = x.shape[0], self.spec.pooled_tokens
            x = F.layer_norm(self.expand(x[:, 0]).view(n, k, -1), (self.spec.encoder_width,))
        return x, self.token_mask(mask)

    def forward(self, states: list[torch.Tensor], mask: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """Swap: the condition for the UNet (a residual bridge needs ``base``, the base encoder's output for the same
        prompt); fuse: the extra tokens for the new key/value projections."""
        x, mask = self.tokens(states, mask)
        if self.spec.mode == "swap":
            h = self.inp(x)
            q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
            if self.spec.residual:
                if base is None:
                    raise RuntimeError("a residual swap bridge needs the base encoder's output")
                q = q + self.base_in(base.float())
            pad = mask == 0
            for blk in self.blocks:
                q = blk(q, h, memory_key_padding_mask=pad)
            out = self.out(self.out_norm(q))
            return base.float() + out if self.spec.residual else out
        return self.out_norm(self.proj(x))

    def layer_weights(self) -> list[float]:
        return [round(float(v), 4) for v in torch.softmax(self.mix_logits.detach(), 0)]


class LoadedBridge:
    """A bridge with its encoder (shared from the base's cache, or a private copy when it carries encoder LoRA)."""

    def __init__(self, bridge: Bridge, encoder: TextEncoder, info: dict | None = None):
        self.bridge, self.encoder, self.info = bridge, encoder, dict(info or {})

    @property
    def spec(self) -> BridgeSpec:
        return self.bridge.spec

    def encode(self, texts: list[str], base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The bridge's output for ``texts`` (``base``: the base encoder's output for them, for a residual bridge)
        and the mask of the extra tokens."""
        states, mask = self.encoder.read(texts, self.spec.max_length)
        return self.bridge(states, mask, base), self.bridge.token_mask(mask)


POOLED_TOKENS = 4  # tokens a pooled vector is projected to (IP-Adapter uses 4 for an image embedding)


def new_spec(base, encoder: TextEncoder, mode: str, max_length: int | None = None, width: int = 256,
             layers: int = 3, heads: int = 4, lora_rank: int = 0, residual: bool = True) -> BridgeSpec:
    te = base.pipe.text_encoder
    return BridgeSpec(mode=mode, encoder=encoder.source, encoder_width=encoder.width,
                      encoder_states=encoder.n_states, max_length=max_length or base.pipe.tokenizer.model_max_length,
                      base_width=int(te.config.hidden_size), base_length=int(base.pipe.tokenizer.model_max_length),
                      width=width, layers=layers, heads=heads, lora_rank=lora_rank,
                      pooled_tokens=POOLED_TOKENS if encoder.pooled else 0, residual=residual and mode == "swap")


def check_compatible(base, lb: LoadedBridge, where: str = "bridge") -> None:
    s = lb.spec
    te_width = int(base.pipe.text_encoder.config.hidden_size)
    if s.base_width != te_width or (s.mode == "swap" and s.base_length != base.pipe.tokenizer.model_max_length):
        raise HyperrealError(f"{where}: this bridge was made for a base with text width {s.base_width} and length "
                             f"{s.base_length} (base '{lb.info.get('base', '?')}'), not '{base.name}' "
                             f"({te_width}, {base.pipe.tokenizer.model_max_length})")
