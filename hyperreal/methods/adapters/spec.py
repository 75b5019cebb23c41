"""What an adapter is and how it is attached: kind, rank, alpha, placement (:class:`AdapterSpec`), PEFT injection
(:func:`attach`), which adapters a pipeline holds, and taking them out again.

A pipeline's adapters are listed beside it (:func:`loaded`): name -> kind, source, whether it has a strength, its
PEFT configs and any trigger tokens. Every adapter module of a pipeline is a PEFT tuner layer; the base weights
under them never change.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass

import torch
from diffusers.training_utils import cast_training_params
from diffusers.utils.peft_utils import recurse_remove_peft_layers
from peft import LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from ...errors import HyperrealError
from . import tokens

KINDS = ("lora", "dora", "loha", "lokr", "oft")
# module-name suffixes per placement; "attention+ff" is kohya's default set, "all" adds the ResNet convs (LoCon)
UNET_PLACEMENTS = {
    # only the keys and values that read the prompt (Custom Diffusion, Kumari et al. 2023): prompts without the
    # new words change least
    "cross-attention": ("attn2.to_k", "attn2.to_v"),
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "attention+ff": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),
    "all": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
            "conv1", "conv2", "conv_shortcut"),
}
TEXT_ENCODER_PLACEMENTS = {
    "cross-attention": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "attention+ff": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "all": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}
# alpha as a function of rank: kohya's default alpha 1 (scale 1/rank) or diffusers' alpha = rank (scale 1)
ALPHA_PRESETS = {"kohya-like": lambda rank: 1.0, "diffusers-like": lambda rank: float(rank)}
COMPONENTS = ("unet", "text_encoder")


# --- what to build ----------------------------------------------------------------------------------------

@dataclass
class AdapterSpec:
    kind: str = "lora"
    rank: int = 8  # LoRA/DoRA/LoHa/LoKr rank; for OFT the block size
    alpha: float | None = None  # None: from the preset
    preset: str = "diffusers-like"
    placement: str = "attention+ff"
    rslora: bool = False  # scale alpha/sqrt(rank) instead of alpha/rank (LoRA/DoRA only)
    text_encoder: bool = False  # also adapt the text encoder (then its embeddings cannot be cached)

    def check(self) -> None:
        if self.kind not in KINDS:
            raise HyperrealError(f"--kind must be one of {', '.join(KINDS)} (or full), got {self.kind!r}")
        if self.placement not in UNET_PLACEMENTS:
            raise HyperrealError(f"--placement must be one of {', '.join(UNET_PLACEMENTS)}, got {self.placement!r}")
        if self.preset not in ALPHA_PRESETS:
            raise HyperrealError(f"--preset must be one of {', '.join(ALPHA_PRESETS)}, got {self.preset!r}")
        if not 1 <= self.rank <= 1024:
            raise HyperrealError(f"--rank must be between 1 and 1024, got {self.rank}")
        if self.alpha is not None and not self.alpha > 0:
            raise HyperrealError(f"--alpha must be positive, got {self.alpha}")
        if self.kind == "oft" and self.placement == "all":
            # PEFT 0.21's OFT rotates an unfolded input with stride = kernel and no padding, so on a padded 3x3
            # convolution it is not the identity even at initialisation (measured: outputs off by ~7)
            raise HyperrealError("OFT cannot adapt the ResNet 3x3 convolutions (PEFT's OFT is wrong there); "
                                 "use --placement attention or attention+ff")
        if self.rslora and self.kind not in ("lora", "dora"):
            raise HyperrealError("--rslora applies to lora and dora only")

    @property
    def resolved_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else ALPHA_PRESETS[self.preset](self.rank)

    @property
    def scale(self) -> float | None:
        """The factor the low-rank update is multiplied by; OFT is a rotation and has none."""
        if self.kind == "oft":
            return None
        return self.resolved_alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def describe(self) -> str:
        if self.kind == "oft":
            return f"oft block size {self.rank}, placement {self.placement}"
        how = "alpha/sqrt(rank), rsLoRA" if self.rslora else "alpha/rank"
        return (f"{self.kind} rank {self.rank}, alpha {self.resolved_alpha:g}: effective scale {self.scale:.4g} "
                f"({how}), placement {self.placement}")

    def peft_config(self, targets: list[str]):
        if self.kind in ("lora", "dora"):
            # gaussian A / zero B as in diffusers' DreamBooth-LoRA script: the adapter starts as an exact no-op
            return LoraConfig(r=self.rank, lora_alpha=self.resolved_alpha, target_modules=targets,
                              init_lora_weights="gaussian", use_dora=self.kind == "dora", use_rslora=self.rslora)
        if self.kind == "loha":
            return LoHaConfig(r=self.rank, alpha=self.resolved_alpha, target_modules=targets)
        if self.kind == "lokr":
            return LoKrConfig(r=self.rank, alpha=self.resolved_alpha, target_modules=targets)
        return OFTConfig(r=0, oft_block_size=self.rank, target_modules=targets)


def target_modules(model, suffixes: tuple[str, ...]) -> list[str]:
    """The full names of the modules a placement adapts (explicit names, so the count can be reported)."""
    # a module another adapter already wraps counts by what it wraps (PEFT's get_base_layer)
    return [name for name, m in model.named_modules()
            if isinstance(getattr(m, "get_base_layer", lambda: m)(), (torch.nn.Linear, torch.nn.Conv2d))
            and name.endswith(tuple("." + s for s in suffixes))]


def components(pipe, with_text_encoder: bool = True):
    yield "unet", pipe.unet
    if with_text_encoder:
        yield "text_encoder", pipe.text_encoder


def attach(pipe, spec: AdapterSpec, name: str = "default", seed: int = 0) -> list[torch.nn.Parameter]:
    """Add a fresh adapter to the pipeline's UNet (and text encoder); returns exactly the new parameters."""
    spec.check()
    before = {id(p) for p in list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())}
    configs = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the adapter's initial values depend on the seed only
        for comp, model in components(pipe, spec.text_encoder):
            suffixes = (UNET_PLACEMENTS if comp == "unet" else TEXT_ENCODER_PLACEMENTS)[spec.placement]
            targets = target_modules(model, suffixes)
            if not targets:
                raise HyperrealError(f"placement '{spec.placement}' matches no module of the {comp}")
            try:
                configs[comp] = inject(model, spec.peft_config(targets), name)
            except ValueError as e:  # e.g. an OFT block size that does not divide a layer's width
                raise HyperrealError(f"cannot add a {spec.kind} adapter to the {comp}: {e}") from None
            # half-precision bases keep fp32 adapter weights (fp16 updates of small weights underflow)
            cast_training_params(model, torch.float32)
    new = [p for p in list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters()) if id(p) not in before]
    loaded(pipe)[name] = {"kind": spec.kind, "source": "trained", "scalable": spec.kind != "oft", "configs": configs}
    return new


def inject(model, config, name: str):
    """Add a PEFT adapter: diffusers' ``add_adapter`` on the UNet (so its own LoRA methods know it), PEFT's
    ``inject_adapter_in_model`` on the text encoder (transformers 5's ``add_adapter`` demands PEFT >= 0.22)."""
    if hasattr(model, "_hf_peft_config_loaded") and hasattr(model, "set_adapters"):  # a diffusers model
        model.add_adapter(config, adapter_name=name)
    else:
        inject_adapter_in_model(config, model, adapter_name=name)
    return config


def adapter_parameters(pipe, name: str) -> dict[str, torch.nn.Parameter]:
    """Named parameters belonging to one adapter (PEFT puts the adapter name in each parameter's path)."""
    out = {}
    for comp, model in components(pipe):
        for n, p in model.named_parameters():
            if f".{name}." in f".{n}.":
                out[f"{comp}.{n}"] = p
    return out


def remove_all(pipe) -> None:
    """Take every adapter out, restoring the base modules (the wrappers go too)."""
    tokens.set_tokens(pipe, {})
    for _, model in components(pipe):
        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            recurse_remove_peft_layers(model)
            for attr in ("peft_config", "_hf_peft_config_loaded"):
                if hasattr(model, attr):
                    with contextlib.suppress(AttributeError):
                        delattr(model, attr)
    loaded(pipe).clear()


# --- which adapters a pipeline holds -------------------------------------------------------------------

_LOADED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def loaded(pipe) -> dict:
    """name -> {kind, source, scalable}, kept beside the pipeline (a pipeline attribute would become config)."""
    return _LOADED.setdefault(pipe.unet, {})


def tuner_layers(pipe):
    for _, model in components(pipe):
        for m in model.modules():
            if isinstance(m, BaseTunerLayer):
                yield m


def sync_tokens(pipe, names) -> None:
    """Exactly the trigger tokens of these adapters in the tokenizer (none: the base's own tokenization)."""
    wanted: dict[str, tuple[str, torch.Tensor]] = {}
    for name in names:
        for word, vec in loaded(pipe).get(name, {}).get("tokens", {}).items():
            if word in wanted and wanted[word][0] != name:
                raise HyperrealError(f"adapters '{wanted[word][0]}' and '{name}' both bring a token for '{word}'; "
                                     "use one of them at a time")
            wanted[word] = (name, vec)
    tokens.set_tokens(pipe, wanted)


def adapter_tokens(pipe, name: str) -> dict[str, torch.Tensor]:
    """The trigger tokens an adapter brings (word -> vector); empty for most adapters."""
    return loaded(pipe).get(name, {}).get("tokens", {})


def remove_adapter(pipe, name: str) -> None:
    """Take one adapter out (its trigger tokens leave the tokenizer; other adapters' stay)."""
    if tokens.has_tokens(pipe):
        sync_tokens(pipe, tokens.token_owners(pipe) - {name})
    for layer in tuner_layers(pipe):
        if name in layer._all_available_adapter_names():
            layer.delete_adapter(name)
    for _, model in components(pipe):
        getattr(model, "peft_config", {}).pop(name, None)
    loaded(pipe).pop(name, None)
    if not any(layer._all_available_adapter_names() for layer in tuner_layers(pipe)):
        remove_all(pipe)  # the last one went: plain modules again, not empty wrappers


