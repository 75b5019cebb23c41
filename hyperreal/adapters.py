"""Method 2: small adapters (LoRA, DoRA, LoHa, LoKr, OFT through PEFT) added to the frozen base, and only they train.

One module holds the method:
- building: :class:`AdapterSpec` says what to add (kind, rank, alpha, placement) and :func:`attach` adds it;
- training: :class:`AdapterLearner` (and :class:`FullFineTune`, the whole-UNet comparison) are ``Trainable``\\ s for
  :func:`hyperreal.training.train`, on DreamBooth-style data (:class:`DreamBoothData`);
- files: :func:`save_adapter` writes the diffusers/PEFT form and a kohya/LyCORIS-keyed ``.safetensors``;
  :func:`load_adapter` reads ours and other tools' LoRA files;
- inference: :func:`activate` (several adapters, a weight each), :func:`adapters_disabled`, :func:`fuse`,
  and :func:`job_adapters`, the hook ``generation.run_job`` uses so one job's adapters never leak into the next;
- measuring: drift against the base and the shapes-world star benchmark behind ``eval adapter``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import re
import time
import weakref
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .errors import HyperrealError

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
# where each kind's kohya-keyed file is read; written into the file header and printed by the CLI
LOADS_IN = {
    "lora": "diffusers (load_lora_weights), AUTOMATIC1111, ComfyUI, kohya, hyperreal",
    "dora": "hyperreal; ComfyUI/LyCORIS read dora_scale (output axis) with their own normalisation; "
            "diffusers drops dora_scale and would load a plain LoRA",
    "loha": "AUTOMATIC1111, ComfyUI (LyCORIS hada_* keys), hyperreal; not diffusers",
    "lokr": "AUTOMATIC1111, ComfyUI (LyCORIS lokr_* keys), hyperreal; not diffusers' SD1.x loader",
    "oft": "hyperreal and PEFT only (PEFT keys; A1111/ComfyUI/diffusers do not read PEFT's OFT)",
}
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te"}
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
        from peft import LoHaConfig, LoKrConfig, LoraConfig, OFTConfig

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


def _components(pipe, with_text_encoder: bool = True):
    yield "unet", pipe.unet
    if with_text_encoder:
        yield "text_encoder", pipe.text_encoder


def attach(pipe, spec: AdapterSpec, name: str = "default", seed: int = 0) -> list[torch.nn.Parameter]:
    """Add a fresh adapter to the pipeline's UNet (and text encoder); returns exactly the new parameters."""
    from diffusers.training_utils import cast_training_params

    spec.check()
    before = {id(p) for p in list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())}
    configs = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the adapter's initial values depend on the seed only
        for comp, model in _components(pipe, spec.text_encoder):
            suffixes = (UNET_PLACEMENTS if comp == "unet" else TEXT_ENCODER_PLACEMENTS)[spec.placement]
            targets = target_modules(model, suffixes)
            if not targets:
                raise HyperrealError(f"placement '{spec.placement}' matches no module of the {comp}")
            try:
                configs[comp] = _inject(model, spec.peft_config(targets), name)
            except ValueError as e:  # e.g. an OFT block size that does not divide a layer's width
                raise HyperrealError(f"cannot add a {spec.kind} adapter to the {comp}: {e}") from None
            # half-precision bases keep fp32 adapter weights (fp16 updates of small weights underflow)
            cast_training_params(model, torch.float32)
    new = [p for p in list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters()) if id(p) not in before]
    _registry(pipe)[name] = {"kind": spec.kind, "source": "trained", "scalable": spec.kind != "oft", "configs": configs}
    return new


def _inject(model, config, name: str):
    """Add a PEFT adapter: diffusers' ``add_adapter`` on the UNet (so its own LoRA methods know it), PEFT's
    ``inject_adapter_in_model`` on the text encoder (transformers 5's ``add_adapter`` demands PEFT >= 0.22)."""
    from peft import inject_adapter_in_model

    if hasattr(model, "_hf_peft_config_loaded") and hasattr(model, "set_adapters"):  # a diffusers model
        model.add_adapter(config, adapter_name=name)
    else:
        inject_adapter_in_model(config, model, adapter_name=name)
    return config


def adapter_parameters(pipe, name: str) -> dict[str, torch.nn.Parameter]:
    """Named parameters belonging to one adapter (PEFT puts the adapter name in each parameter's path)."""
    out = {}
    for comp, model in _components(pipe):
        for n, p in model.named_parameters():
            if f".{name}." in f".{n}.":
                out[f"{comp}.{n}"] = p
    return out


def remove_all(pipe) -> None:
    """Take every adapter out, restoring the base modules (the wrappers go too)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if pipe.text_encoder in _TOKENS:
        _trigger_tokens(pipe).set(pipe, {})
    for _, model in _components(pipe):
        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            from diffusers.utils.peft_utils import recurse_remove_peft_layers

            recurse_remove_peft_layers(model)
            for attr in ("peft_config", "_hf_peft_config_loaded"):
                if hasattr(model, attr):
                    with contextlib.suppress(AttributeError):
                        delattr(model, attr)
    _registry(pipe).clear()


def plain(model):
    """``model`` without PEFT wrappers: itself when it has none, else a copy holding only the base weights.

    The shared base keeps loaded adapters (switched off) for reuse between jobs; code that copies the base
    (``ControlNetModel.from_unet``, full fine-tuning) must copy the frozen weights alone, not the wrappers.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        return model
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    clone = copy.deepcopy(model)
    for m in clone.modules():
        if isinstance(m, BaseTunerLayer) and m.merged:
            m.unmerge()
    recurse_remove_peft_layers(clone)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        with contextlib.suppress(AttributeError):
            delattr(clone, attr)
    return clone


# --- inference: which adapters are on, and how strongly ----------------------------------------------------

_LOADED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _registry(pipe) -> dict:
    """name -> {kind, source, scalable}, kept beside the pipeline (a pipeline attribute would become config)."""
    return _LOADED.setdefault(pipe.unet, {})


def _tuner_layers(pipe):
    from peft.tuners.tuners_utils import BaseTunerLayer

    for _, model in _components(pipe):
        for m in model.modules():
            if isinstance(m, BaseTunerLayer):
                yield m


def activate(pipe, weights: dict[str, float]) -> None:
    """Turn on exactly these adapters, each at its weight; every other loaded adapter is off.

    Written here rather than with diffusers' ``set_adapters`` because that calls ``set_scale`` on every layer,
    which OFT layers do not support (a rotation has no strength), and it covers only LoRA-family adapters.
    """
    known = _registry(pipe)
    for name, w in weights.items():
        if name not in known:
            raise HyperrealError(f"no adapter named '{name}' is loaded")
        if not known[name]["scalable"] and w != 1.0:
            raise HyperrealError(f"adapter '{name}' is {known[name]['kind']}, which has no strength: use weight 1.0")
    names = list(weights)
    _sync_tokens(pipe, [n for n, w in weights.items() if w != 0])  # weight 0 is off, its token too
    for layer in _tuner_layers(pipe):
        layer.set_adapter(names, inference_mode=True) if _accepts_inference_mode(layer) else layer.set_adapter(names)
        layer.enable_adapters(bool(names))
        for name, w in weights.items():
            if known[name]["scalable"] and hasattr(layer, "set_scale"):
                layer.set_scale(name, w)


def _accepts_inference_mode(layer) -> bool:
    import inspect

    return "inference_mode" in inspect.signature(layer.set_adapter).parameters


@contextlib.contextmanager
def adapters_disabled(pipe):
    """The plain base for the duration (the adapters stay loaded); restores what was active."""
    layers = list(_tuner_layers(pipe))
    was = [(layer, layer.disable_adapters) for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield pipe
    finally:
        for layer, disabled in was:
            layer.enable_adapters(not disabled)


def fuse(pipe, names: list[str] | None = None) -> None:
    """Merge the active adapters into the base weights for speed (undo with :func:`unfuse`).

    Unmerging subtracts the update again, which is exact only up to float rounding, so generation jobs do not fuse
    (a later job without adapters must get the base bit for bit).
    """
    for layer in _tuner_layers(pipe):
        layer.merge(safe_merge=True, adapter_names=names)


def unfuse(pipe) -> None:
    for layer in _tuner_layers(pipe):
        layer.unmerge()


# --- trigger tokens: a trigger word the tokenizer cuts into pieces gets one new token (pivotal tuning) ---------

# "sks" is s, k, s to a tokenizer that never saw it, so "a red sks star on the left" is ten tokens and its last
# words sit where the base only ever read a second object's (README: Adapters). A new token for the word, whose
# embedding trains beside the adapter (diffusers' advanced DreamBooth ``--train_text_encoder_ti``, A1111's and
# OneTrainer's bundled embeddings), makes the trigger one word again, and prompts without it encode exactly as
# the base encodes them. The tokens are in the tokenizer only while an adapter that defines them is active.

_TOKENS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def split_trigger_words(tokenizer, trigger: str | None) -> list[str]:
    """The words of the trigger that the tokenizer cuts into several tokens (each would get a token of its own)."""
    words = dict.fromkeys(re.findall(r"\w+", (trigger or "").lower()))
    return [w for w in words if len(tokenizer.tokenize(w)) > 1]


def initial_token_vectors(pipe, words: list[str]) -> dict[str, torch.Tensor]:
    """Each word's starting embedding: the mean of its pieces' (roughly what the base read, as one vector)."""
    table = pipe.text_encoder.get_input_embeddings().weight
    return {w: table[pipe.tokenizer(w, add_special_tokens=False).input_ids].detach().float().mean(0).clone()
            for w in words}


class _TriggerTokens:
    """The words added to one text encoder's tokenizer, each with the vector of the adapter that defines it.

    The vectors replace the table's rows through a forward hook on the input embedding, so a vector in training
    stays a float32 parameter that gradients reach (the table itself may be half precision and stays frozen).
    """

    def __init__(self):
        self.words: dict[str, tuple[str, torch.Tensor]] = {}  # word -> (adapter name, vector)
        self.ids: dict[int, torch.Tensor] = {}
        self.handle = None

    def set(self, pipe, wanted: dict[str, tuple[str, torch.Tensor]]) -> None:
        from transformers import AddedToken

        drop = [w for w in self.words if w not in wanted]
        if drop:  # diffusers' own removal: out of the tokenizer, and the rows out of the table
            pipe.unload_textual_inversion(tokens=drop, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
        new = [w for w in wanted if w not in self.words]
        if new:
            # single_word: "sks" inside "tasks" stays part of that word (diffusers' load_textual_inversion adds
            # plain tokens, which match inside words)
            pipe.tokenizer.add_tokens([AddedToken(w, single_word=True, normalized=False) for w in new])
            pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
        self.words = dict(wanted)
        self.ids = {pipe.tokenizer.convert_tokens_to_ids(w): v for w, (_, v) in self.words.items()}
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if self.ids:  # resizing replaces the embedding module, so the hook goes on the current one
            self.handle = pipe.text_encoder.get_input_embeddings().register_forward_hook(self._substitute)

    def _substitute(self, module, args, output):
        # no "is the token there?" test first: on a GPU that would wait for the device at every encoding
        for tid, vec in self.ids.items():
            output = torch.where((args[0] == tid)[..., None], vec.to(output.device, output.dtype), output)
        return output


def _trigger_tokens(pipe) -> _TriggerTokens:
    return _TOKENS.setdefault(pipe.text_encoder, _TriggerTokens())


def _sync_tokens(pipe, names) -> None:
    """Exactly the trigger tokens of these adapters in the tokenizer (none: the base's own tokenization)."""
    wanted: dict[str, tuple[str, torch.Tensor]] = {}
    for name in names:
        for word, vec in _registry(pipe).get(name, {}).get("tokens", {}).items():
            if word in wanted and wanted[word][0] != name:
                raise HyperrealError(f"adapters '{wanted[word][0]}' and '{name}' both bring a token for '{word}'; "
                                     "use one of them at a time")
            wanted[word] = (name, vec)
    if wanted or pipe.text_encoder in _TOKENS:
        _trigger_tokens(pipe).set(pipe, wanted)


def adapter_tokens(pipe, name: str) -> dict[str, torch.Tensor]:
    """The trigger tokens an adapter brings (word -> vector); empty for most adapters."""
    return _registry(pipe).get(name, {}).get("tokens", {})


# --- files ------------------------------------------------------------------------------------------------

def _kohya_name(prefix: str, module: str) -> str:
    return f"{prefix}_{module.replace('.', '_')}"


def _peft_config_dicts(pipe, name: str) -> dict[str, dict]:
    configs = _registry(pipe)[name]["configs"]
    return {comp: json.loads(json.dumps(c.to_dict(), default=sorted)) for comp, c in configs.items()}  # sets -> lists


def _lokr_full(sd: dict, module: str) -> bool:
    """LyCORIS readers scale a LoKr update by alpha/rank only when a factor is rank-decomposed; else by 1."""
    return f"{module}.lokr_w2" in sd and f"{module}.lokr_w1" in sd


def kohya_state_dict(pipe, name: str, spec: AdapterSpec) -> dict[str, torch.Tensor]:
    """The adapter under kohya/LyCORIS keys (what AUTOMATIC1111 and ComfyUI read).

    PEFT's state dict is already in the LyCORIS layouts (hada_w1_a..., lokr_w1...; LoRA's A/B are kohya's
    down/up), so this is a renaming plus the per-module alpha, with two conversions readers need:
    rsLoRA's scale folded into the alpha (readers apply alpha/rank), and LoKr's scale folded into lokr_w1 where
    both factors are full matrices (readers apply no scale there).
    """
    from peft import get_peft_model_state_dict

    if spec.kind == "oft":
        raise HyperrealError("OFT has no kohya/LyCORIS form that PEFT's OFT maps onto; it is saved with PEFT keys")
    alpha = spec.scale * spec.rank  # the alpha a reader needs so that alpha/rank is the trained scale
    out: dict[str, torch.Tensor] = {}
    for comp, model in _components(pipe, spec.text_encoder):
        sd = get_peft_model_state_dict(model, adapter_name=name)
        modules = sorted({k.rsplit(".", 2)[0] if k.endswith((".lora_A.weight", ".lora_B.weight"))
                          else k.rsplit(".", 1)[0] for k in sd})
        for module in modules:
            key = _kohya_name(KOHYA_PREFIX[comp], module)
            if spec.kind in ("lora", "dora"):
                out[f"{key}.lora_down.weight"] = sd[f"{module}.lora_A.weight"]
                out[f"{key}.lora_up.weight"] = sd[f"{module}.lora_B.weight"]
                if spec.kind == "dora":
                    mag = sd[f"{module}.lora_magnitude_vector"]
                    # PEFT normalises each output row; (out, 1[, 1, 1]) marks that axis for LyCORIS/ComfyUI readers
                    out[f"{key}.dora_scale"] = mag.reshape(-1, *[1] * (out[f"{key}.lora_down.weight"].dim() - 1))
            elif spec.kind == "loha":
                for part in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
                    out[f"{key}.{part}"] = sd[f"{module}.{part}"]
            else:  # lokr
                for part in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"):
                    if f"{module}.{part}" in sd:
                        out[f"{key}.{part}"] = sd[f"{module}.{part}"]
                if _lokr_full(sd, module):
                    out[f"{key}.lokr_w1"] = out[f"{key}.lokr_w1"] * spec.scale
            out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return {k: v.detach().float().contiguous().cpu() for k, v in out.items()}


def _header(spec: AdapterSpec, info: dict, configs: dict) -> dict[str, str]:
    """kohya's ss_* training metadata (what webui/ComfyUI show) plus ours; safetensors headers hold strings."""
    kohya_module = {"lora": "networks.lora", "dora": "lycoris.kohya", "loha": "lycoris.kohya",
                    "lokr": "lycoris.kohya", "oft": "peft.oft"}[spec.kind]
    meta = {
        "ss_network_module": kohya_module,
        "ss_network_dim": str(spec.rank),
        "ss_network_alpha": f"{spec.scale * spec.rank:g}" if spec.scale is not None else "",
        "ss_network_args": json.dumps({"algo": {"lora": "lora", "dora": "lora", "loha": "loha", "lokr": "lokr",
                                                "oft": "oft"}[spec.kind], "dora_wd": spec.kind == "dora",
                                       "conv_dim": spec.rank if spec.placement == "all" else 0}),
        "ss_sd_model_name": str(info.get("base", "")),
        "ss_base_model_version": "sd_v1",
        "ss_max_train_steps": str(info.get("steps", "")),
        "ss_steps": str(info.get("steps_done", info.get("steps", ""))),
        "ss_learning_rate": str(info.get("lr", "")),
        "ss_batch_size_per_device": str(info.get("batch_size", "")),
        "ss_resolution": str(info.get("resolution", "")),
        "ss_num_train_images": str(info.get("images", "")),
        "ss_num_reg_images": str(info.get("class_images", "")),
        "ss_prior_loss_weight": str(info.get("prior_weight", "")),
        "ss_num_repeats": str(info.get("repeats", "")),
        "ss_training_comment": f"hyperreal {spec.describe()}; trigger: {info.get('trigger') or '(none)'}",
        "hyperreal_kind": spec.kind,
        "hyperreal_spec": json.dumps(asdict(spec)),
        "hyperreal_scale": "" if spec.scale is None else f"{spec.scale:.8g}",
        "hyperreal_trained_alpha": f"{spec.resolved_alpha:g}",
        "hyperreal_trigger": str(info.get("trigger") or ""),
        "hyperreal_loads_in": LOADS_IN[spec.kind],
        "hyperreal_peft_config": json.dumps(configs),
        "hyperreal_trigger_tokens": json.dumps(list(info.get("trigger_tokens") or [])),
    }
    return meta


def save_adapter(pipe, name: str, spec: AdapterSpec, out: str | Path, info: dict | None = None,
                 file_name: str = "adapter") -> list[Path]:
    """Write the adapter's files; the first path is the one to share (kohya-keyed, or PEFT-keyed for OFT)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = info or {}
    configs = _peft_config_dicts(pipe, name)
    tokens = {w: v.detach().float().reshape(1, -1).contiguous().cpu() for w, v in adapter_tokens(pipe, name).items()}
    meta = _header(spec, {**info, "trigger_tokens": list(tokens)}, configs)
    # trigger tokens ride in the same file as A1111's bundled embeddings (ComfyUI reads these keys too)
    bundled = {f"bundle_emb.{w}.string_to_param.*": v for w, v in tokens.items()}
    paths = []
    main = out / f"{file_name}.safetensors"
    if spec.kind == "oft":
        sd = {f"{comp}.{k}": v.detach().float().contiguous().cpu() for comp, model in _components(pipe, spec.text_encoder)
              for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
        save_file({**sd, **bundled}, main, metadata={**meta, "hyperreal_format": "peft"})
    else:
        save_file({**kohya_state_dict(pipe, name, spec), **bundled}, main,
                  metadata={**meta, "hyperreal_format": "kohya"})
    paths.append(main)
    if spec.kind in ("lora", "dora"):
        from diffusers import StableDiffusionPipeline

        # PEFT keys as they are: diffusers' loader reads them natively. convert_state_dict_to_diffusers (what its
        # attention-only example scripts use) renames only attention keys, and the loader then silently drops
        # them when proj_in/ff keys in PEFT form sit beside them (seen with diffusers 0.42)
        layers = {comp: get_peft_model_state_dict(model, adapter_name=name)
                  for comp, model in _components(pipe, spec.text_encoder)}
        folder = out / "diffusers"
        # the adapter metadata (PEFT's LoraConfig) keeps alpha, rsLoRA and DoRA: without it diffusers assumes
        # alpha = rank and the weights would load at the wrong strength
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers.get("text_encoder"),
            unet_lora_adapter_metadata=configs["unet"],
            text_encoder_lora_adapter_metadata=configs.get("text_encoder"), safe_serialization=True)
        paths.append(folder / "pytorch_lora_weights.safetensors")
    loads_in = {paths[0]: LOADS_IN[spec.kind], **({paths[1]: "diffusers (load_lora_weights), hyperreal"}
                                                  if len(paths) > 1 else {})}
    for word, v in tokens.items() if spec.kind in ("lora", "dora") else ():
        # beside the diffusers LoRA, the form diffusers' advanced DreamBooth script writes (key "clip_l")
        emb = out / "diffusers" / f"{_safe_name(word)}_emb.safetensors"
        emb.parent.mkdir(parents=True, exist_ok=True)
        save_file({"clip_l": v}, emb, metadata={"hyperreal_token": word})
        paths.append(emb)
        loads_in[emb] = (f"diffusers: pipe.load_textual_inversion(load_file(path)['clip_l'], token='{word}') "
                         "beside the LoRA")
    (out / "adapter.json").write_text(json.dumps({
        "kind": spec.kind, "spec": asdict(spec), "scale": spec.scale, "files": [str(p.relative_to(out)) for p in paths],
        "loads_in": {str(p.relative_to(out)): text for p, text in loads_in.items()},
        "trigger_tokens": list(tokens),
        **{k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, type(None)))}}, indent=2) + "\n")
    return paths


def _read_header(path: Path) -> tuple[dict[str, str], list[str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), list(f.keys())
    except Exception as e:
        raise HyperrealError(f"'{path}' is not a readable .safetensors file ({type(e).__name__})") from None


def _resolve_source(source: str) -> tuple[str, Path | None]:
    """FILE | DIR | embedded NAME -> a local .safetensors (or diffusers folder); anything else is a hub id."""
    from .registry import find_embedded

    art = find_embedded(source, "adapter")
    p = art.path if art is not None else Path(source).expanduser()
    if p.is_dir():
        info = p / "adapter.json"
        if info.is_file():  # one of our output folders: its shareable file
            return "file", p / json.loads(info.read_text())["files"][0]
        files = sorted(p.glob("*.safetensors"))
        if (p / "pytorch_lora_weights.safetensors").is_file():
            return "file", p / "pytorch_lora_weights.safetensors"
        if len(files) == 1:
            return "file", files[0]
        raise HyperrealError(f"adapter folder '{source}' holds {len(files)} .safetensors files; name the file")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise HyperrealError(f"adapter '{source}': only .safetensors files are read (no pickled .bin/.ckpt/.pt)")
        return "file", p
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith((".", "/", "~")):
        return "hub", None
    raise HyperrealError(f"adapter '{source}' is not a file, a folder, an embedded adapter or a hub id")


def load_adapter(pipe, source: str, name: str | None = None) -> str:
    """Load an adapter file (ours in any kind, or another tool's LoRA in kohya or diffusers keys) or hub id.

    Returns its adapter name on the pipeline. kohya/diffusers LoRA goes through diffusers' ``load_lora_weights``
    (which converts kohya keys); DoRA, LoHa, LoKr and OFT files we wrote carry their PEFT config in the header
    and are injected with PEFT directly, because diffusers' SD loader drops ``dora_scale`` and reads no LyCORIS keys.
    """
    from peft import LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, set_peft_model_state_dict

    how, path = _resolve_source(source)
    name = name or _safe_name(Path(source).stem if path else source)
    if name in _registry(pipe):
        raise HyperrealError(f"an adapter named '{name}' is already loaded")
    if how == "hub":
        return _load_with_diffusers(pipe, source, name, source)
    meta, keys = _read_header(path)
    kind = meta.get("hyperreal_kind")
    tokens = _bundled_tokens(pipe, path, keys, source)
    if "hyperreal_peft_config" not in meta or meta.get("hyperreal_format") not in ("kohya", "peft"):
        if any(".hada_" in k or ".lokr_" in k or k.endswith(".dora_scale") for k in keys):
            raise HyperrealError(f"adapter '{source}': LoHa/LoKr/DoRA files are read only when hyperreal wrote them "
                                 "(their PEFT config is in the header); plain LoRA files from any tool load")
        where = str(path)
        if tokens:  # diffusers' LoRA loader does not know bundled embeddings: give it the LoRA tensors alone
            from safetensors.torch import load_file

            where = {k: v for k, v in load_file(str(path)).items() if not k.startswith("bundle_emb.")}
        name = _load_with_diffusers(pipe, where, name, source, kind or "lora")
        if tokens:
            _registry(pipe)[name]["tokens"] = tokens
        return name
    from safetensors.torch import load_file

    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith("bundle_emb.")}
    spec = AdapterSpec(**json.loads(meta["hyperreal_spec"]))
    config_cls = {"lora": LoraConfig, "dora": LoraConfig, "loha": LoHaConfig, "lokr": LoKrConfig, "oft": OFTConfig}[kind]
    configs = {}
    for comp, config in json.loads(meta["hyperreal_peft_config"]).items():
        model = getattr(pipe, comp)
        known = set(getattr(config_cls, "__dataclass_fields__", {}))
        config = configs[comp] = _inject(model, config_cls(**{k: v for k, v in config.items() if k in known}), name)
        if kind == "oft":
            sd = {k[len(comp) + 1:]: v for k, v in tensors.items() if k.startswith(comp + ".")}
        else:
            sd = _kohya_to_peft(tensors, model, KOHYA_PREFIX[comp], spec, name)
        try:
            res = set_peft_model_state_dict(model, sd, adapter_name=name)
            # PEFT lists every base weight as missing too; only this adapter's own tensors count
            missing = [k for k in res.missing_keys if f".{name}." in k + "." and any(
                t in k for t in ("lora_", "hada_", "lokr_", "oft_"))]
            problem = (f"{len(missing)} missing, {len(res.unexpected_keys)} unexpected tensors"
                       if res.unexpected_keys or missing else None)
        except RuntimeError as e:  # shape mismatches
            problem = str(e).splitlines()[-1].strip()[:200]
        if problem:
            remove_adapter(pipe, name)
            raise HyperrealError(f"adapter '{source}' does not fit this base's {comp} ({problem})")
    _registry(pipe)[name] = {"kind": kind, "source": str(path), "scalable": kind != "oft", "configs": configs,
                             **({"tokens": tokens} if tokens else {})}
    return name


_BUNDLED = re.compile(r"bundle_emb\.(.+)\.(string_to_param\.\*|clip_l)")


def _bundled_tokens(pipe, path: Path, keys: list[str], source: str) -> dict[str, torch.Tensor]:
    """Trigger tokens bundled in a LoRA file (A1111's ``bundle_emb.WORD.string_to_param.*``, OneTrainer's
    ``bundle_emb.WORD.clip_l``), one vector each, checked against this base's text encoder."""
    from safetensors import safe_open

    found = {m.group(1): k for k in keys if (m := _BUNDLED.fullmatch(k))}
    if not found:
        return {}
    width = pipe.text_encoder.get_input_embeddings().embedding_dim
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for word, key in found.items():
            v = f.get_tensor(key).float()
            if v.dim() != 2 or v.shape != (1, width):
                raise HyperrealError(f"adapter '{source}': its embedding for '{word}' has shape {tuple(v.shape)}; "
                                     f"this base's text encoder takes one vector of {width}")
            out[word] = v[0].to(pipe.text_encoder.device)
    return out


def _kohya_to_peft(tensors: dict, model, prefix: str, spec: AdapterSpec, name: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`kohya_state_dict` for one component (module names found through the model itself)."""
    by_kohya = {_kohya_name(prefix, n): n for n, _ in model.named_modules()}
    sd: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        key, part = k.split(".", 1)
        if not key.startswith(prefix + "_") or part == "alpha":
            continue
        module = by_kohya.get(key)
        if module is None:
            raise HyperrealError(f"adapter tensor '{k}' names no module of this base")
        if part == "lora_down.weight":
            sd[f"{module}.lora_A.weight"] = v
        elif part == "lora_up.weight":
            sd[f"{module}.lora_B.weight"] = v
        elif part == "dora_scale":
            # PEFT keeps (out,) for linear layers and (1, out, 1, 1) for convolutions
            shape = model.get_submodule(module).lora_magnitude_vector[name].weight.shape
            sd[f"{module}.lora_magnitude_vector"] = v.reshape(shape)
        else:
            sd[f"{module}.{part}"] = v
    if spec.kind == "lokr":  # undo the scale folded into lokr_w1 where both factors are full
        for module in {k.rsplit(".", 1)[0] for k in sd}:
            if _lokr_full(sd, module):
                sd[f"{module}.lokr_w1"] = sd[f"{module}.lokr_w1"] / spec.scale
    return sd


def _load_with_diffusers(pipe, where: str | dict, name: str, source: str, kind: str = "lora") -> str:
    try:
        path = Path(where) if isinstance(where, str) else None
        if path is None:  # a state dict
            pipe.load_lora_weights(where, adapter_name=name)
        elif path.is_file():
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name, use_safetensors=True)
        else:
            pipe.load_lora_weights(where, adapter_name=name, use_safetensors=True)  # never a pickle
    except Exception as e:
        with contextlib.suppress(Exception):
            remove_adapter(pipe, name)
        raise HyperrealError(f"could not load adapter '{source}': {str(e).splitlines()[0][:300] if str(e) else type(e).__name__}"
                             ". It must be a LoRA for this base (kohya or diffusers keys, .safetensors)") from None
    _registry(pipe)[name] = {"kind": kind, "source": source, "scalable": True}
    return name


def remove_adapter(pipe, name: str) -> None:
    if pipe.text_encoder in _TOKENS:  # its trigger tokens leave the tokenizer; others' stay
        _sync_tokens(pipe, {owner for owner, _ in _TOKENS[pipe.text_encoder].words.values() if owner != name})
    for layer in _tuner_layers(pipe):
        if name in layer._all_available_adapter_names():
            layer.delete_adapter(name)
    for _, model in _components(pipe):
        getattr(model, "peft_config", {}).pop(name, None)
    _registry(pipe).pop(name, None)
    if not any(layer._all_available_adapter_names() for layer in _tuner_layers(pipe)):
        remove_all(pipe)  # the last one went: plain modules again, not empty wrappers


def _safe_name(text: str) -> str:
    return re.sub(r"\W+", "_", text).strip("_")[:48] or "adapter"


def describe_file(path: str | Path) -> dict:
    """What a saved adapter file says about itself (kind, rank, alpha, scale, where it loads)."""
    meta, keys = _read_header(Path(path))
    return {"kind": meta.get("hyperreal_kind", "lora"), "rank": meta.get("ss_network_dim"),
            "alpha": meta.get("ss_network_alpha"), "scale": meta.get("hyperreal_scale"),
            "loads_in": meta.get("hyperreal_loads_in", "diffusers, AUTOMATIC1111, ComfyUI (LoRA keys)"),
            "trigger_tokens": [m.group(1) for k in keys if (m := _BUNDLED.fullmatch(k))],
            "tensors": len(keys)}


# --- generation jobs ---------------------------------------------------------------------------------------

MAX_LOADED = 8  # adapters kept loaded on a shared pipeline between jobs


def check_job_adapters(items, where: str = "job") -> list[dict]:
    """Validate a job's ``"adapters": [{"path": ..., "weight": 1.0}]`` and fill in the weight."""
    if not isinstance(items, list):
        raise HyperrealError(f"{where}: 'adapters' must be a list like [{{\"path\": \"my_lora.safetensors\", \"weight\": 1.0}}]")
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, dict) or not isinstance(it.get("path"), str) or not it["path"].strip():
            raise HyperrealError(f"{where}: adapters[{i}] needs a \"path\" (a file, folder, embedded name or hub id)")
        unknown = sorted(set(it) - {"path", "weight"})
        if unknown:
            raise HyperrealError(f"{where}: adapters[{i}] has unknown key(s) {', '.join(map(repr, unknown))}")
        w = it.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not -4.0 <= w <= 4.0:
            raise HyperrealError(f"{where}: adapters[{i}] 'weight' must be a number between -4 and 4, got {json.dumps(w)}")
        out.append({"path": it["path"], "weight": float(w)})
    return out


@contextlib.contextmanager
def job_adapters(pipe, items: list[dict] | None):
    """Load (or reuse) a job's adapters, activate them at their weights, and switch them all off afterwards.

    A shared pipeline keeps loaded adapters for reuse, but every job sets the active set itself and the ``finally``
    disables everything, so a later job that asks for no adapters runs the plain base.
    """
    if not items:
        _sync_tokens(pipe, [])
        with adapters_disabled(pipe):
            yield []
        return
    reg = _registry(pipe)
    by_source = {v["source"]: k for k, v in reg.items() if v.get("job")}
    weights: dict[str, float] = {}
    for it in items:
        how, path = _resolve_source(it["path"])
        key = f"{path.resolve()}@{path.stat().st_mtime_ns}" if path else it["path"]
        name = by_source.get(key)
        if name is None:
            job_loaded = [k for k, v in reg.items() if v.get("job")]
            if len(job_loaded) >= MAX_LOADED:
                remove_adapter(pipe, job_loaded[0])
            name = load_adapter(pipe, it["path"], name=f"job{len(reg)}_{_safe_name(Path(it['path']).stem)}"
                                if path else f"job{len(reg)}_{_safe_name(it['path'])}")
            reg[name].update(source=key, job=True)
            by_source[key] = name
        weights[name] = weights.get(name, 0.0) + it["weight"]
    try:
        activate(pipe, weights)
        yield list(weights)
    finally:
        _sync_tokens(pipe, [])  # the next job tokenizes as the base does
        for layer in _tuner_layers(pipe):
            layer.enable_adapters(False)


# --- training data ------------------------------------------------------------------------------------------

def instance_examples(data: str | Path, trigger: str | None) -> list[tuple[object, str]]:
    """(image, caption) pairs: a captioned folder/zip, or a folder of bare images captioned by the trigger alone."""
    from PIL import Image

    from .datasets import IMAGE_SUFFIXES, load_examples

    p = Path(data)
    if p.is_dir() and not (p / "metadata.jsonl").is_file() and not list(p.glob("*.txt")):
        images = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if images and not trigger:
            raise HyperrealError(f"dataset '{data}' has images but no captions: pass --trigger 'a photo of sks dog' "
                                 "to caption them all, or add NAME.txt / metadata.jsonl")
        if images:
            return [(Image.open(f).convert("RGB"), trigger) for f in images]
    examples = load_examples(p)
    out = []
    for e in examples:
        text = e.text
        if trigger and trigger.lower() not in text.lower():
            text = f"{trigger}, {text}"  # kohya's habit: the trigger leads every caption
        out.append((Image.open(e.image).convert("RGB"), text))
    return out


class DreamBoothData:
    """Instance (and class) images as cached latents, captions as cached embeddings when the text encoder is frozen.

    Sampling follows kohya: instance images appear ``repeats`` times per epoch next to the class images, each
    example carries a loss weight (1 for instances, ``prior_weight`` for class images); ``is_class`` marks class
    examples, whose target the learner may replace with the frozen base's own prediction.
    """

    def __init__(self, pipe, instances: list, classes: list | None = None, prior_weight: float = 1.0,
                 repeats: int = 1, flip: bool = False, caption_dropout: float = 0.0, cache_text: bool = True,
                 prior_uncond: float = 0.0,
                 size: tuple[int, int] | None = None):
        from .datasets import encode_images, image_tensor

        if repeats < 1:
            raise HyperrealError(f"--repeats must be at least 1, got {repeats}")
        if not 0 <= caption_dropout < 1:
            raise HyperrealError(f"--caption-dropout must be in [0, 1), got {caption_dropout}")
        classes = classes or []
        width, height = size or (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
        items = list(instances) + list(classes)
        tensors = [image_tensor(img, width, height) for img, _ in items]
        self.latents = encode_images(pipe.vae, tensors)
        # flipped copies are encoded too: flipping a latent is not the latent of the flipped image
        self.flipped = encode_images(pipe.vae, [t.flip(-1) for t in tensors]) if flip else None
        self.n_instances, self.repeats, self.caption_dropout = len(instances), repeats, caption_dropout
        # class images also teach the empty prompt now and then: classifier-free guidance subtracts the empty
        # prompt's prediction from every prompt's, so an adapter that moves it moves every image (measured on
        # the star task: drift 9 without guidance, 25 at guidance 5)
        self.prior_uncond = prior_uncond
        self.weights = torch.tensor([1.0] * len(instances) + [float(prior_weight)] * len(classes))
        self.texts = sorted({t for _, t in items} | {""})
        self.text_index = torch.tensor([self.texts.index(t) for _, t in items])
        self.empty = self.texts.index("")
        self.cache_text = cache_text
        if cache_text:
            from .datasets import encode_prompts

            self.embeddings = encode_prompts(pipe, self.texts)
        else:
            tok = pipe.tokenizer
            self.token_ids = tok(self.texts, padding="max_length", max_length=tok.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
        self.captions = [t for _, t in instances]

    def __len__(self) -> int:
        return len(self.weights)

    def batches(self, batch_size: int, seed: int, num_train_timesteps: int) -> Iterator[dict]:
        """Endless, deterministic in ``seed``: shuffled epochs, flips, caption dropout, noise and timesteps."""
        g = torch.Generator().manual_seed(seed)
        n_total = len(self.weights)
        epoch = list(range(self.n_instances)) * self.repeats + list(range(self.n_instances, n_total))
        queue: list[int] = []
        while True:
            while len(queue) < batch_size:
                queue += [epoch[i] for i in torch.randperm(len(epoch), generator=g).tolist()]
            idx, queue = torch.tensor(queue[:batch_size]), queue[batch_size:]
            latents = self.latents[idx]
            if self.flipped is not None:
                flip = torch.rand(batch_size, generator=g) < 0.5
                latents = torch.where(flip[:, None, None, None], self.flipped[idx], latents)
            text = self.text_index[idx].clone()
            if self.caption_dropout:
                text[torch.rand(batch_size, generator=g) < self.caption_dropout] = self.empty
            if self.prior_uncond:
                is_class = idx >= self.n_instances
                text[is_class & (torch.rand(batch_size, generator=g) < self.prior_uncond)] = self.empty
            yield {
                "latents": latents,
                "text": self.embeddings[text] if self.cache_text else self.token_ids[text],
                "weights": self.weights[idx],
                "is_class": idx >= self.n_instances,
                "noise": torch.randn(latents.shape, generator=g),
                "timesteps": torch.randint(0, num_train_timesteps, (batch_size,), generator=g),
            }


def class_images(pipe, prompts: list[str], count: int, folder: Path, steps: int, guidance: float,
                 seed: int = 0) -> list[tuple[object, str]]:
    """Prior-preservation images from the frozen base, cached in ``folder`` (reused when the prompts match)."""
    from PIL import Image

    from .datasets import write_examples
    from .shapes.benchmark import generate_batch

    if count < 1 or not prompts:
        return []
    wanted = [prompts[i % len(prompts)] for i in range(count)]
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
        if [r["text"] for r in rows] == wanted:
            return [(Image.open(folder / r["file_name"]).convert("RGB"), r["text"]) for r in rows]
    with adapters_disabled(pipe):
        images = generate_batch(pipe, [(p, seed + i) for i, p in enumerate(wanted)], steps, guidance)
    write_examples(folder, list(zip(images, wanted)), prefix="class")
    return list(zip(images, wanted))


# --- the Trainables ----------------------------------------------------------------------------------------

class _DiffusionLearner:
    """What adapter training and full fine-tuning share: the denoising loss and fixed-seed samples."""

    unet: torch.nn.Module
    sample_pipe: object

    def __init__(self, pipe, data: DreamBoothData, sample_prompts: list[str] | None = None,
                 sample_steps: int = 20, sample_guidance: float = 5.0, sample_seed: int = 0,
                 prior_target: str = "base"):
        from .training import DenoisingObjective

        if prior_target not in PRIOR_TARGETS:
            raise HyperrealError(f"prior target must be one of {', '.join(PRIOR_TARGETS)}, got {prior_target!r}")
        self.pipe, self.data, self.prior_target = pipe, data, prior_target
        self.objective = DenoisingObjective(pipe.scheduler.config)
        self.sample_prompts = sample_prompts or data.captions[:2]
        self.sample_steps, self.sample_guidance, self.sample_seed = sample_steps, sample_guidance, sample_seed
        self.text_encoder = pipe.text_encoder
        self.steps_done = 0

    def batches(self, batch_size: int, seed: int) -> Iterator:
        return self.data.batches(batch_size, seed, self.objective.num_train_timesteps)

    def loss(self, batch) -> torch.Tensor:
        dev, dtype = self.unet.device, self.unet.dtype
        latents, noise, t = batch["latents"].to(dev), batch["noise"].to(dev), batch["timesteps"].to(dev)
        noisy = self.objective.noisy(latents, noise, t)
        if self.data.cache_text:
            cond = batch["text"].to(dev, dtype)
        else:
            cond = self.text_encoder(batch["text"].to(dev))[0].to(dtype)
        pred = self.unet(noisy.to(dtype), t, cond).sample.float()
        target = self.objective.target(latents, noise, t)
        is_class = batch.get("is_class")
        if self.prior_target == "base" and is_class is not None and bool(is_class.any()):
            # Prior preservation as distillation: on class images the target is what the frozen base itself
            # predicts for the same noisy latent and prompt, so the prior loss is exactly "leave these prompts'
            # outputs alone" (drift), not "fit the base's sampled images", which guidance has already sharpened.
            sel = is_class.to(dev)
            with torch.no_grad(), self.base_only():
                base_cond = cond[sel] if self.data.cache_text else self.pipe.text_encoder(batch["text"].to(dev)[sel])[0]
                base_pred = self.pipe.unet(noisy[sel].to(dtype), t[sel], base_cond.to(dtype)).sample.float()
            target = target.clone()
            target[sel] = base_pred
        per_example = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        return (per_example * batch["weights"].to(dev)).mean()

    def validate(self) -> tuple[list, list[str]]:
        """Fixed seeds through the inference pipeline and scheduler, so samples match what generation gives."""
        from .shapes.benchmark import generate_batch

        pairs = [(p, self.sample_seed + i) for i, p in enumerate(self.sample_prompts)]
        images = generate_batch(self.sample_pipe, pairs, self.sample_steps, self.sample_guidance)
        return images, [f"{p} (seed {s})" for p, s in pairs]

    def after_step(self, step: int) -> None:
        self.steps_done = step


class AdapterLearner(_DiffusionLearner):
    """Train one new adapter on the frozen base (``training.Trainable``)."""

    STALL_STEPS = 3

    def __init__(self, pipe, data: DreamBoothData, spec: AdapterSpec, name: str = "default",
                 text_encoder_lr: float | None = None, seed: int = 0, info: dict | None = None,
                 tokens: dict[str, torch.Tensor] | None = None, **sample):
        if (spec.text_encoder or tokens) and data.cache_text:
            raise HyperrealError("training the text encoder or a trigger token needs uncached text: build the data "
                                 "with cache_text=False")
        super().__init__(pipe, data, **sample)
        self.spec, self.name, self.text_encoder_lr = spec, name, text_encoder_lr
        self.info = dict(info or {})
        self.unet = pipe.unet
        self.sample_pipe = pipe
        self.params = attach(pipe, spec, name, seed)
        # trigger tokens (pivotal tuning): float32 vectors that train with the text-encoder group
        self.tokens = {w: torch.nn.Parameter(v.detach().float().clone().to(pipe.text_encoder.device))
                       for w, v in (tokens or {}).items()}
        if self.tokens:
            _registry(pipe)[name]["tokens"] = self.tokens
            self.params += list(self.tokens.values())
        activate(pipe, {name: 1.0})
        for p in self.params:
            p.requires_grad_(True)
        self._named = {**adapter_parameters(pipe, name), **{f"token.{w}": p for w, p in self.tokens.items()}}
        self._start: dict[str, torch.Tensor] | None = None
        self._checked = 0

    def trainable_parameters(self) -> list:
        te = {id(p) for p in list(self.pipe.text_encoder.parameters()) + list(self.tokens.values())}
        unet_params = [p for p in self.params if id(p) not in te]
        te_params = [p for p in self.params if id(p) in te]
        groups = [{"params": unet_params}]
        if te_params:
            groups.append({"params": te_params, **({"lr": self.text_encoder_lr} if self.text_encoder_lr else {})})
        return groups

    def loss(self, batch) -> torch.Tensor:
        if self._start is None:  # the reference for the "did anything move" check
            self._start = {k: p.detach().clone() for k, p in self._named.items()}
        loss = super().loss(batch)
        if not loss.requires_grad:  # otherwise autograd's own message ("element 0 of tensors...") is all one sees
            raise HyperrealError("no adapter weight receives a gradient (the adapter is frozen or switched off), "
                                 "so training cannot change anything")
        return loss

    def after_step(self, step: int) -> None:
        super().after_step(step)
        self._checked += 1
        if self._checked == self.STALL_STEPS and self._start is not None:
            moved = [k for k, p in self._named.items() if not torch.equal(p.detach(), self._start[k])]
            if not moved:
                raise HyperrealError(
                    f"the adapter's weights did not change in {self.STALL_STEPS} steps: the optimizer is not updating "
                    "them (learning rate 0, frozen adapter weights, or an optimizer built before the adapter existed)")
            self._start = None  # checked once; free the copy

    def state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self._named.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in self._named.items():
                p.copy_(state[k])

    def save(self, out: Path) -> list[Path]:
        info = {**self.info, "steps_done": self.steps_done}
        return save_adapter(self.pipe, self.name, self.spec, out, info, file_name=self.info.get("file_name", "adapter"))

    @contextlib.contextmanager
    def base_only(self):
        with adapters_disabled(self.pipe) as pipe:
            yield pipe

    def trained_parameter_count(self) -> int:
        return sum(p.numel() for p in self.params)


class FullFineTune(_DiffusionLearner):
    """The comparison: fine-tune every UNet weight on the same data (a copy, so the shared base stays frozen)."""

    def __init__(self, pipe, data: DreamBoothData, info: dict | None = None, **sample):
        from diffusers import StableDiffusionPipeline

        super().__init__(pipe, data, **sample)
        self.info = dict(info or {})
        self.unet = copy.deepcopy(plain(pipe.unet)).float().requires_grad_(True)
        self.sample_pipe = StableDiffusionPipeline(**{**pipe.components, "unet": self.unet})
        self.sample_pipe.set_progress_bar_config(disable=True)

    def trainable_parameters(self) -> list:
        return list(self.unet.parameters())

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.unet.state_dict().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.unet.load_state_dict(state)

    def save(self, out: Path) -> list[Path]:
        self.unet.save_pretrained(Path(out) / "unet", safe_serialization=True)
        return [Path(out) / "unet" / "diffusion_pytorch_model.safetensors"]

    @contextlib.contextmanager
    def base_only(self):
        yield self.pipe

    def trained_parameter_count(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())


# --- measuring ---------------------------------------------------------------------------------------------

def images_array(images) -> np.ndarray:
    return np.stack([np.asarray(i.convert("RGB"), dtype=np.float32) for i in images])


def mean_abs_difference(a, b) -> float:
    """Mean absolute pixel difference on the 0-255 scale."""
    return float(np.abs(images_array(a) - images_array(b)).mean())


def drift(learner, pairs: list[tuple[str, int]], steps: int, guidance: float, base_images=None) -> dict:
    """How far the adapted model's images for prompts without the trigger moved from the base's (same seeds)."""
    from .shapes.benchmark import generate_batch

    if base_images is None:
        with learner.base_only() as base_pipe:
            base_images = generate_batch(base_pipe, pairs, steps, guidance)
    adapted = generate_batch(learner.sample_pipe, pairs, steps, guidance)
    return {"drift": mean_abs_difference(adapted, base_images), "n": len(pairs), "images": adapted,
            "base_images": base_images}


def default_drift_prompts(base_name: str, captions: list[str], trigger: str | None, n: int = 8) -> list[tuple[str, int]]:
    """Prompts without the trigger: the shapes world's held-out prompts on the tiny base, else the captions with
    the trigger removed (the class the subject belongs to: what DreamBooth's language drift is about)."""
    if base_name == "tiny":
        from .shapes.benchmark import held_out_prompts

        one, two = held_out_prompts(n - n // 2, n // 2)
        return one + two
    texts = captions_without_trigger(captions, trigger) or ["a photo"]
    return [(texts[i % len(texts)], 1000 + i) for i in range(n)]


def captions_without_trigger(captions: list[str], trigger: str | None) -> list[str]:
    """The captions with the trigger removed, each once: "a photo of sks dog" -> "a photo of dog", the class the
    subject belongs to (DreamBooth's class prompt, and the prompts whose drift matters)."""
    texts = []
    for c in captions:
        t = re.sub(re.escape(trigger), "", c, flags=re.I) if trigger else c
        t = re.sub(r"\s+", " ", t).strip(" ,")
        if t and t not in texts:
            texts.append(t)
    return texts


# --- the shapes-world benchmark: teach the reserved shape "star" ---------------------------------------------

STAR_TRIGGER = "sks"
STAR_SEED = 777


def star_dataset(folder: str | Path, n: int = 8, seed: int = STAR_SEED) -> Path:
    """``n`` rendered stars of cycling colours captioned "a <colour> sks star" (the base never saw a star)."""
    from .datasets import write_examples
    from .shapes.world import COLOURS, SceneObject, layout, render

    rng = random.Random(seed)
    items = []
    for i in range(n):
        colour = COLOURS[i % len(COLOURS)]
        items.append((render(layout([SceneObject(colour, "star", None)], rng)), f"a {colour} {STAR_TRIGGER} star"))
    return write_examples(folder, items, prefix="star")


def star_prompts(n: int = 32, seed: int = STAR_SEED) -> list[tuple[str, int]]:
    """Held-out (prompt, seed) pairs: every colour, with and without a position, on seeds never trained on."""
    from .shapes.world import COLOURS, POSITION_PHRASE

    rng = random.Random(seed + 1)
    texts = [f"a {c} {STAR_TRIGGER} star" + (f" {POSITION_PHRASE[p]}" if p else "")
             for c in COLOURS for p in (None,) + tuple(POSITION_PHRASE)]
    rng.shuffle(texts)
    # unpositioned prompts first so that every colour's training prompt is among them
    texts.sort(key=lambda t: " on " in t or " at " in t or " in " in t)
    return [(texts[i % len(texts)], 50_000 + i) for i in range(n)]


def star_scores(images, pairs) -> dict:
    from .shapes import evaluator
    from .shapes.world import parse_caption

    star, colour_star = 0, 0
    for img, (prompt, _) in zip(images, pairs):
        expected = parse_caption(prompt.replace(f" {STAR_TRIGGER} ", " "))
        s = evaluator.score(img, expected)
        # one star and nothing else: an adapter that breaks images into fragments makes "stars" by accident
        # (thin pieces have a star's low solidity), so a star among several objects does not count
        one_star = s.count and s.objects[0]["shape"] == "star"
        star += one_star
        colour_star += one_star and s.colour_shape
    n = max(len(pairs), 1)
    return {"star_rate": star / n, "star_colour_rate": colour_star / n}


# --- one place that turns options into a learner (the CLI's train and eval both use it) ----------------------

# defaults per kind, chosen on the shapes-world star task (see ``eval adapter``): the full fine-tune uses a
# typical full-model rate; adapters tolerate (and need) a higher one
KIND_DEFAULTS = {"lora": {"lr": 1e-3}, "dora": {"lr": 1e-3}, "loha": {"lr": 1e-3}, "lokr": {"lr": 1e-3},
                 "oft": {"lr": 1e-3}, "full": {"lr": 1e-4}}
DEFAULT_STEPS, DEFAULT_BATCH, DEFAULT_RANK = 2000, 8, 8
# chosen on the star task (README: Adapters): with a text-encoder LoRA, from 3 to 10 drift fell and stars rose and
# at 20 stars fell; with a trigger token instead, 15 kept the stars (93.8%) and brought accuracy within 5 points
DEFAULT_PRIOR_WEIGHT = 15.0
# the star benchmark's prior preservation: class images, and instance repeats that balance them per epoch
STAR_CLASS_IMAGES, STAR_REPEATS = 64, 8
PRIOR_TARGETS = ("base", "noise")


@dataclass
class TrainRequest:
    data: str
    kind: str = "lora"  # an adapter kind, or "full" for the whole-UNet comparison
    rank: int = DEFAULT_RANK
    alpha: float | None = None
    preset: str = "diffusers-like"
    placement: str = "attention+ff"
    rslora: bool = False
    # a LoRA on the text encoder. None: for adapter kinds only when no trigger token is trained (then it is what
    # lets the trigger separate from the words the base knows); a token does that without moving how prompts
    # without the trigger are encoded (star task: drift 2.90 without the LoRA, 4.21 with). Never for ``full``
    train_text_encoder: bool | None = None
    text_encoder_lr: float | None = None
    trigger: str | None = None
    # a trigger word that the tokenizer cuts into pieces gets a new token with a trained embedding (adapter kinds)
    trigger_token: bool = True
    class_prompts: list[str] = field(default_factory=list)
    class_images: int = 0
    prior_weight: float = DEFAULT_PRIOR_WEIGHT
    # None: balance the class images (class images / instance images per epoch, as the star recipe does), else 1
    repeats: int | None = None
    flip: bool = False
    caption_dropout: float = 0.0
    prior_uncond: float = 0.2  # share of class images trained with the empty prompt (anchors guidance)
    prior_target: str = "base"  # class images' target: the frozen base's own prediction, or "noise" (DreamBooth)
    sample_prompts: list[str] = field(default_factory=list)
    name: str = "adapter"
    seed: int = 0

    @property
    def adapts_text_encoder(self) -> bool:
        """Before :func:`make_learner` resolves None against the tokenizer: on for adapter kinds."""
        return self.kind != "full" if self.train_text_encoder is None else bool(self.train_text_encoder)

    def spec(self) -> AdapterSpec:
        return AdapterSpec(kind=self.kind, rank=self.rank, alpha=self.alpha, preset=self.preset,
                           placement=self.placement, rslora=self.rslora, text_encoder=self.adapts_text_encoder)


def make_learner(base, req: TrainRequest, out: str | Path, info: dict | None = None):
    """Data (cached latents/embeddings, class images) plus the learner for ``training.train``."""
    if req.kind != "full":
        req.spec().check()
    elif req.adapts_text_encoder:
        raise HyperrealError("--kind full fine-tunes the UNet only; drop --train-text-encoder")
    instances = instance_examples(req.data, req.trigger)
    steps, guidance = base.defaults["steps"], base.defaults["guidance"]
    name = _safe_name(req.name)
    words = []
    if req.kind != "full" and req.trigger_token:
        _sync_tokens(base.pipe, [])  # judged on the base's own tokenizer
        words = split_trigger_words(base.pipe.tokenizer, req.trigger)
        if words and req.train_text_encoder is None:  # the token teaches the text side (see TrainRequest)
            req = replace(req, train_text_encoder=False)
    classes = []
    if req.class_images:
        prompts = req.class_prompts or class_prompts_for(instances, req.trigger)
        classes = class_images(base.pipe, prompts, req.class_images, Path(out) / "class_images",
                               steps, guidance, seed=req.seed)
    repeats = req.repeats if req.repeats is not None else balanced_repeats(len(instances), len(classes))
    tokens = initial_token_vectors(base.pipe, words)
    if tokens:  # in the tokenizer before the captions are tokenized
        _trigger_tokens(base.pipe).set(base.pipe, {w: (name, v) for w, v in tokens.items()})
    sample = dict(sample_prompts=req.sample_prompts or None, sample_steps=steps, sample_guidance=guidance,
                  sample_seed=req.seed, prior_target=req.prior_target)
    info = {"base": base.name, "trigger": req.trigger, "images": len(instances), "class_images": len(classes),
            "repeats": repeats, "prior_weight": req.prior_weight if classes else 0.0,
            "resolution": f"{base.defaults['width']}x{base.defaults['height']}", "file_name": name,
            "trigger_tokens": words, **(info or {})}
    try:
        data = DreamBoothData(base.pipe, instances, classes, req.prior_weight, repeats, req.flip,
                              req.caption_dropout, cache_text=not (req.adapts_text_encoder or tokens),
                              prior_uncond=req.prior_uncond, size=(base.defaults["width"], base.defaults["height"]))
        if req.kind == "full":
            return FullFineTune(base.pipe, data, info=info, **sample)
        return AdapterLearner(base.pipe, data, req.spec(), name=name, text_encoder_lr=req.text_encoder_lr,
                              seed=req.seed, info=info, tokens=tokens, **sample)
    except BaseException:
        if tokens:  # no learner owns them: the base's tokenizer again
            _sync_tokens(base.pipe, [])
        raise


def class_prompts_for(instances: list, trigger: str | None) -> list[str]:
    """Default class prompts: the instance captions without the trigger."""
    if not trigger:
        raise HyperrealError("class images need a class prompt: pass --class-prompt 'a photo of a dog' (in the app: "
                             "Class prompt), or a trigger, whose captions without it become the class prompts")
    prompts = captions_without_trigger([t for _, t in instances], trigger)
    if not prompts:
        raise HyperrealError(f"the captions are only the trigger '{trigger}', so there is no class to preserve: "
                             "pass --class-prompt 'a photo of a dog' (in the app: Class prompt)")
    return prompts


def balanced_repeats(n_instances: int, n_classes: int) -> int:
    """Instance repeats that show about as many instance as class images per epoch (kohya counts an epoch so)."""
    return max(1, round(n_classes / max(n_instances, 1)))


def shapes_class_prompts(n: int = 64, seed: int = STAR_SEED) -> list[str]:
    """Prior-preservation prompts for the shapes world: captions the base was trained on (never held-out ones),
    half with one object like the instance captions, half with two.

    Drawn from all captions, nearly all would have two objects (there are far more pairs than singles), and the
    one-object prompts nearest the trigger's would be the ones left unguarded.
    """
    from .shapes.world import all_captions, is_held_out

    rng = random.Random(seed)
    out = []
    for count, share in ((1, n - n // 2), (2, n // 2)):
        texts = [c for c in all_captions(n_objects=count) if not is_held_out(c)]
        rng.shuffle(texts)
        out += texts[:share]
    rng.shuffle(out)
    return out


def star_trial(base, req: TrainRequest, cfg, out: str | Path, star_pairs, plain_pairs, base_plain,
               on_event=None) -> dict:
    """One training run on the star task, measured: star rate on ``star_pairs``; drift from ``base_plain`` and
    colour+shape accuracy on ``plain_pairs`` (prompts without the trigger); times; the file written. Used by
    ``star_benchmark`` and ``bench/adapter_recipe.py``."""
    from . import training
    from .shapes import evaluator
    from .shapes.benchmark import generate_batch

    out = Path(out)
    gen_steps, guidance = base.defaults["steps"], base.defaults["guidance"]
    t0 = time.time()
    learner = make_learner(base, req, out, info={"steps": cfg.steps, "lr": cfg.lr, "batch_size": cfg.batch_size})
    t_data = time.time() - t0
    t0 = time.time()
    paths = training.train(learner, cfg, out, on_event=on_event)
    t_train = time.time() - t0
    star = star_scores(generate_batch(learner.sample_pipe, star_pairs, gen_steps, guidance), star_pairs)
    d = drift(learner, plain_pairs, gen_steps, guidance, base_images=base_plain)
    acc = evaluator.accuracy(d["images"], [p for p, _ in plain_pairs])["colour_shape"]
    return {"lr": cfg.lr, "trained_parameters": learner.trained_parameter_count(),
            "scale": learner.spec.scale if req.kind != "full" else None,
            "star_rate": star["star_rate"], "star_colour_rate": star["star_colour_rate"],
            "drift": round(d["drift"], 3), "colour_shape_accuracy": acc,
            "train_seconds": round(t_train, 1), "data_seconds": round(t_data, 1),
            "file": str(paths[0]), "file_mb": round(paths[0].stat().st_size / 1e6, 3)}


def star_benchmark(kinds: list[str], work: str | Path, steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH,
                   class_images: int = STAR_CLASS_IMAGES, repeats: int = STAR_REPEATS, n_prompts: int = 32,
                   base_name: str = "tiny",
                   log=print) -> dict:
    """Teach the reserved shape: each kind (and ``full``) trains on the same 8 star images, class images and
    step budget, then is measured on held-out star prompts and on prompts without the trigger (drift, accuracy).
    """
    from . import training
    from .loading import load_base
    from .shapes import evaluator
    from .shapes.benchmark import generate_batch, held_out_prompts

    work = Path(work)
    data = star_dataset(work / "stars")
    star_pairs = star_prompts(n_prompts)
    one, two = held_out_prompts(n_prompts - n_prompts // 2, n_prompts // 2)
    plain_pairs = one + two
    base = load_base(base_name)
    gen_steps, guidance = base.defaults["steps"], base.defaults["guidance"]
    base_plain = generate_batch(base.pipe, plain_pairs, gen_steps, guidance)
    base_star = star_scores(generate_batch(base.pipe, star_pairs, gen_steps, guidance), star_pairs)
    base_acc = evaluator.accuracy(base_plain, [p for p, _ in plain_pairs])["colour_shape"]
    figures = {"base": base_name, "steps": steps, "batch_size": batch_size, "images": 8, "class_images": class_images,
               "repeats": repeats, "star_prompts": n_prompts, "plain_prompts": len(plain_pairs),
               "torch_threads": torch.get_num_threads(),
               "base_figures": {"star_rate": base_star["star_rate"], "colour_shape_accuracy": base_acc},
               "kinds": {}}
    log(f"base '{base_name}': star rate {100 * base_star['star_rate']:.1f}%, colour+shape accuracy on "
        f"{len(plain_pairs)} prompts without the trigger {100 * base_acc:.1f}%")
    for kind in kinds:
        req = TrainRequest(data=str(data), kind=kind, trigger=STAR_TRIGGER,
                           class_prompts=shapes_class_prompts(class_images), class_images=class_images,
                           repeats=repeats, name=f"star_{kind}")
        cfg = training.TrainConfig(steps=steps, batch_size=batch_size, lr=KIND_DEFAULTS[kind]["lr"],
                                   log_every=max(steps // 4, 1))
        # a fresh base per kind: nothing carries over between runs
        row = star_trial(load_base(base_name), req, cfg, work / kind, star_pairs, plain_pairs, base_plain,
                         on_event=lambda e, kind=kind: e.kind == "step" and log(
                             f"  {kind} step {e.step}/{e.total} loss {e.loss:.4f}"))
        row["accuracy_change_points"] = round(100 * (row["colour_shape_accuracy"] - base_acc), 1)
        figures["kinds"][kind] = row
        log(f"{kind}: star rate {100 * row['star_rate']:.1f}% (colour too {100 * row['star_colour_rate']:.1f}%), "
            f"drift {row['drift']:.2f}, accuracy {100 * row['colour_shape_accuracy']:.1f}% "
            f"({row['accuracy_change_points']:+.1f} points), trained in {row['train_seconds']:.0f}s")
    full = figures["kinds"].get("full")
    for kind, row in figures["kinds"].items():
        if kind == "full":
            continue
        row["targets_met"] = {
            "star_rate>=0.8": row["star_rate"] >= 0.8,
            "drift<=full/3": None if full is None else row["drift"] <= full["drift"] / 3,
            "accuracy_within_5_points": row["accuracy_change_points"] >= -5.0,
            "train_seconds<=600": row["train_seconds"] <= 600,
        }
    return figures


def apply_job_adapters(base, items: list[dict] | None, call):
    """The ``adapters`` job key (generation.METHOD_KEYS): the job's adapters on the call's pipeline."""
    return job_adapters(call.pipe, items)
