"""Adapter files: what we write (a kohya/LyCORIS-keyed ``.safetensors`` that A1111 and ComfyUI read, the
diffusers/PEFT form ``load_lora_weights`` reads, and trigger tokens as bundled embeddings) and what we read (ours
in every kind, other tools' LoRA files in kohya or diffusers keys, hub ids).
"""
from __future__ import annotations

import contextlib
import json
import re
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from peft import (LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, get_peft_model_state_dict,
                  set_peft_model_state_dict)
from safetensors import safe_open
from safetensors.torch import load_file

from ... import sources
from ...errors import HyperrealError
from .spec import AdapterSpec, adapter_tokens, components, inject, loaded, remove_adapter, tuner_layers

# where each kind's kohya-keyed file is read; written into the file header and printed by the CLI
LOADS_IN = {
    "lora": "diffusers (load_lora_weights), AUTOMATIC1111, ComfyUI, kohya, hyperreal",
    # PEFT's DoRA normalises each output row (magnitude m: one value per output channel); dora_scale is written as
    # m shaped (out, 1[, 1, 1]), the convention of LyCORIS (wd_on_out, its default since 2025-04) and of ComfyUI's
    # output-axis branch, which picks the axis by that shape
    "dora": "hyperreal and LyCORIS exactly; diffusers exactly from diffusers/pytorch_lora_weights.safetensors (it "
            "drops dora_scale from this file and would load a plain LoRA); ComfyUI loads it but, until its PR #15458 "
            "lands, normalises by the base weight instead of the adapted one (an approximation); AUTOMATIC1111 "
            "applies DoRA along the input axis only and does not reproduce it: use the LoRA kind there",
    "loha": "AUTOMATIC1111, ComfyUI (LyCORIS hada_* keys), hyperreal; not diffusers",
    "lokr": "AUTOMATIC1111, ComfyUI (LyCORIS lokr_* keys), hyperreal; not diffusers' SD1.x loader",
    "oft": "hyperreal and PEFT only (PEFT keys; A1111/ComfyUI/diffusers do not read PEFT's OFT)",
}
# a bundled trigger token (A1111's bundle_emb keys) makes diffusers' load_lora_weights refuse the file
BUNDLED_NOTE = ("; this file bundles its trigger token (bundle_emb keys: AUTOMATIC1111 and hyperreal read them, "
                "ComfyUI loads the LoRA and skips them), which diffusers' load_lora_weights refuses: in diffusers "
                "load diffusers/pytorch_lora_weights.safetensors and the token file beside it")


def loads_in(kind: str, bundled: bool) -> str:
    """Where the shareable file of this kind loads (written into its header)."""
    return LOADS_IN[kind] + (BUNDLED_NOTE if bundled and kind in ("lora", "dora") else "")
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te"}


def _kohya_name(prefix: str, module: str) -> str:
    """kohya's name for a module: the UNet's diffusers module path, the text encoder's OpenAI-CLIP path
    (``text_model.encoder.layers.N...``), dots as underscores. transformers 5 dropped the ``text_model`` level from
    ``CLIPTextModel``; A1111, ComfyUI and diffusers before 0.42 read text-encoder keys only with it."""
    if prefix == KOHYA_PREFIX["text_encoder"] and not module.startswith("text_model."):
        module = "text_model." + module
    return f"{prefix}_{module.replace('.', '_')}"


def _diffusers_text_encoder_keys(layers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text-encoder LoRA keys as diffusers' loader has read them in every release: ``text_model.encoder...``
    (transformers 4's module path; diffusers 0.42 strips it again under transformers 5), and DoRA magnitudes with
    the ``.weight`` that transformers 5's adapter loading needs (without it they are silently left out)."""
    out = {}
    for k, v in layers.items():
        k = k if k.startswith("text_model.") else "text_model." + k
        out[k + ".weight" if k.endswith("lora_magnitude_vector") else k] = v
    return out


def _peft_config_dicts(pipe, name: str) -> dict[str, dict]:
    configs = loaded(pipe)[name]["configs"]
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
    if spec.kind == "oft":
        raise HyperrealError("OFT has no kohya/LyCORIS form that PEFT's OFT maps onto; it is saved with PEFT keys")
    alpha = spec.scale * spec.rank  # the alpha a reader needs so that alpha/rank is the trained scale
    out: dict[str, torch.Tensor] = {}
    for comp, model in components(pipe, spec.text_encoder):
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
        "ss_lr_scheduler": str(info.get("lr_schedule", "")),  # kohya's key: constant | cosine | linear
        "ss_lr_warmup_steps": str(info.get("warmup", "")),
        "ss_batch_size_per_device": str(info.get("batch_size", "")),
        "ss_resolution": str(info.get("resolution", "")),
        "ss_num_train_images": str(info.get("images", "")),
        "ss_num_reg_images": str(info.get("class_images", "")),
        "ss_prior_loss_weight": str(info.get("prior_weight", "")),
        "ss_num_repeats": str(info.get("repeats", "")),
        "ss_min_snr_gamma": str(info.get("snr_gamma") or ""),  # kohya's key; empty when it was off
        "ss_training_comment": f"hyperreal {spec.describe()}; trigger: {info.get('trigger') or '(none)'}",
        "hyperreal_kind": spec.kind,
        "hyperreal_spec": json.dumps(asdict(spec)),
        "hyperreal_scale": "" if spec.scale is None else f"{spec.scale:.8g}",
        "hyperreal_trained_alpha": f"{spec.resolved_alpha:g}",
        "hyperreal_trigger": str(info.get("trigger") or ""),
        "hyperreal_loads_in": loads_in(spec.kind, bool(info.get("trigger_tokens"))),
        "hyperreal_peft_config": json.dumps(configs),
        "hyperreal_trigger_tokens": json.dumps(list(info.get("trigger_tokens") or [])),
    }
    return meta


def save_adapter(pipe, name: str, spec: AdapterSpec, out: str | Path, info: dict | None = None,
                 file_name: str = "adapter") -> list[Path]:
    """Write the adapter's files; the first path is the one to share (kohya-keyed, or PEFT-keyed for OFT)."""
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
        sd = {f"{comp}.{k}": v.detach().float().contiguous().cpu() for comp, model in components(pipe, spec.text_encoder)
              for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
        sources.save_safetensors({**sd, **bundled}, main, metadata={**meta, "hyperreal_format": "peft"})
    else:
        sources.save_safetensors({**kohya_state_dict(pipe, name, spec), **bundled}, main,
                  metadata={**meta, "hyperreal_format": "kohya"})
    paths.append(main)
    if spec.kind in ("lora", "dora"):
        # PEFT keys as they are: diffusers' loader reads them natively. convert_state_dict_to_diffusers (what its
        # attention-only example scripts use) renames only attention keys, and the loader then silently drops
        # them when proj_in/ff keys in PEFT form sit beside them (seen with diffusers 0.42)
        layers = {comp: get_peft_model_state_dict(model, adapter_name=name)
                  for comp, model in components(pipe, spec.text_encoder)}
        if "text_encoder" in layers:
            layers["text_encoder"] = _diffusers_text_encoder_keys(layers["text_encoder"])
        folder = out / "diffusers"
        # the adapter metadata (PEFT's LoraConfig) keeps alpha, rsLoRA and DoRA: without it diffusers assumes
        # alpha = rank and the weights would load at the wrong strength
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers.get("text_encoder"),
            unet_lora_adapter_metadata=configs["unet"],
            text_encoder_lora_adapter_metadata=configs.get("text_encoder"), safe_serialization=True)
        paths.append(folder / "pytorch_lora_weights.safetensors")
    where = {paths[0]: meta["hyperreal_loads_in"], **({paths[1]: "diffusers (load_lora_weights), hyperreal"}
                                                      if len(paths) > 1 else {})}
    for word, v in tokens.items() if spec.kind in ("lora", "dora") else ():
        # beside the diffusers LoRA, the form diffusers' advanced DreamBooth script writes (key "clip_l")
        emb = out / "diffusers" / f"{safe_name(word)}_emb.safetensors"
        emb.parent.mkdir(parents=True, exist_ok=True)
        sources.save_safetensors({"clip_l": v}, emb, metadata={"hyperreal_token": word})
        paths.append(emb)
        where[emb] = (f"diffusers: pipe.load_textual_inversion(load_file(path)['clip_l'], token='{word}') "
                         "beside the LoRA")
    (out / "adapter.json").write_text(json.dumps({
        "kind": spec.kind, "spec": asdict(spec), "scale": spec.scale, "files": [str(p.relative_to(out)) for p in paths],
        "loads_in": {str(p.relative_to(out)): text for p, text in where.items()},
        "trigger_tokens": list(tokens),
        **{k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, type(None)))}}, indent=2) + "\n")
    return paths


def _pick(folder: Path, source: str) -> sources.Source:
    info = folder / "adapter.json"
    if info.is_file():  # one of our output folders: its shareable file
        return sources.Source("file", str(folder / json.loads(info.read_text())["files"][0]))
    if (folder / "pytorch_lora_weights.safetensors").is_file():
        return sources.Source("file", str(folder / "pytorch_lora_weights.safetensors"))
    return sources.single_safetensors(folder, source, "adapter")


def resolve_source(source: str) -> sources.Source:
    """FILE | DIR | embedded NAME -> a local .safetensors file; a hub id stays a hub id."""
    return sources.resolve(source, "adapter", "adapter", _pick,
                           known="a file, a folder, an embedded adapter or a hub id")


def load_adapter(pipe, source: str, name: str | None = None) -> str:
    """Load an adapter file (ours in any kind, or another tool's LoRA in kohya or diffusers keys) or hub id.

    Returns its adapter name on the pipeline. kohya/diffusers LoRA goes through diffusers' ``load_lora_weights``
    (which converts kohya keys); DoRA, LoHa, LoKr and OFT files we wrote carry their PEFT config in the header
    and are injected with PEFT directly, because diffusers' SD loader drops ``dora_scale`` and reads no LyCORIS keys.
    """
    path = resolve_source(source).path
    name = name or safe_name(Path(source).stem if path else source)
    if name in loaded(pipe):
        raise HyperrealError(f"an adapter named '{name}' is already loaded")
    if path is None:  # a hub id
        return _load_with_diffusers(pipe, source, name, source)
    meta, keys = sources.read_header(path)
    kind = meta.get("hyperreal_kind")
    tokens = _bundled_tokens(pipe, path, keys, source)
    if "hyperreal_peft_config" not in meta or meta.get("hyperreal_format") not in ("kohya", "peft"):
        if any(".hada_" in k or ".lokr_" in k or k.endswith(".dora_scale") for k in keys):
            raise HyperrealError(f"adapter '{source}': LoHa/LoKr/DoRA files are read only when hyperreal wrote them "
                                 "(their PEFT config is in the header); plain LoRA files from any tool load")
        where = str(path)
        if tokens:  # diffusers' LoRA loader does not know bundled embeddings: give it the LoRA tensors alone
            where = {k: v for k, v in load_file(str(path)).items() if not k.startswith("bundle_emb.")}
        name = _load_with_diffusers(pipe, where, name, source, kind or "lora")
        if tokens:
            loaded(pipe)[name]["tokens"] = tokens
        return name
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith("bundle_emb.")}
    spec = AdapterSpec(**json.loads(meta["hyperreal_spec"]))
    config_cls = {"lora": LoraConfig, "dora": LoraConfig, "loha": LoHaConfig, "lokr": LoKrConfig, "oft": OFTConfig}[kind]
    configs = {}
    for comp, config in json.loads(meta["hyperreal_peft_config"]).items():
        model = getattr(pipe, comp)
        known = set(getattr(config_cls, "__dataclass_fields__", {}))
        config = configs[comp] = inject(model, config_cls(**{k: v for k, v in config.items() if k in known}), name)
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
    loaded(pipe)[name] = {"kind": kind, "source": str(path), "scalable": kind != "oft", "configs": configs,
                          **({"tokens": tokens} if tokens else {})}
    return name


_BUNDLED = re.compile(r"bundle_emb\.(.+)\.(string_to_param\.\*|clip_l)")


def _bundled_tokens(pipe, path: Path, keys: list[str], source: str) -> dict[str, torch.Tensor]:
    """Trigger tokens bundled in a LoRA file (A1111's ``bundle_emb.WORD.string_to_param.*``, OneTrainer's
    ``bundle_emb.WORD.clip_l``), one vector each, checked against this base's text encoder."""
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
    # files from before transformers 5 (and ours from before this naming) may lack text_model_: both are read
    by_kohya = {**{f"{prefix}_{n.replace('.', '_')}": n for n, _ in model.named_modules()},
                **{_kohya_name(prefix, n): n for n, _ in model.named_modules()}}
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


# key fragments that give away the model family a LoRA was trained for (kohya's, diffusers' and BFL's names)
ARCHITECTURES = (
    ("FLUX", ("double_blocks", "single_blocks", "single_transformer_blocks", "img_attn", "txt_attn")),
    ("SD3", ("joint_blocks", "context_block", "add_q_proj")),
    ("SDXL", ("lora_te1_", "lora_te2_", "text_encoder_2.", "add_embedding", "input_blocks_4_1_transformer_blocks_1",
              "transformer_blocks_9")),
    ("SD2", ("encoder_layers_12_", "encoder.layers.12.", "encoder_layers_22_", "encoder.layers.22.")),
)


def looks_made_for(keys) -> str | None:
    """The model family a LoRA's keys name, when it is not SD1.x; None when they look like SD1.x."""
    keys = list(keys)
    for family, marks in ARCHITECTURES:
        if any(m in k for k in keys for m in marks):
            return family
    return None


def _not_for_this_base(source: str, keys, why: str = "") -> HyperrealError:
    family = looks_made_for(keys)
    made = (f"it looks made for {family}, and this base is an SD1.x model" if family
            else "its keys name no layer of this base")
    return HyperrealError(f"adapter '{source}' does not fit this base: {made}{why}. Use a LoRA trained for "
                          "SD1.5 (or the base it names)")


def _layers_holding(pipe, name: str) -> int:
    return sum(1 for layer in tuner_layers(pipe) if name in layer._all_available_adapter_names())


def _load_with_diffusers(pipe, where: str | dict, name: str, source: str, kind: str = "lora") -> str:
    keys = list(where) if isinstance(where, dict) else (
        sources.read_header(Path(where))[1] if Path(where).is_file() else [])
    if looks_made_for(keys):
        raise _not_for_this_base(source, keys)
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
        why = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        if "not found in the base model" in why:  # PEFT: the keys name modules this base does not have
            raise _not_for_this_base(source, keys) from None
        raise HyperrealError(f"could not load adapter '{source}': {why}. It must be a LoRA for this base (kohya or "
                             "diffusers keys, .safetensors)") from None
    if _layers_holding(pipe, name) == 0:  # diffusers accepts a file whose keys match nothing, and changes nothing
        with contextlib.suppress(Exception):
            remove_adapter(pipe, name)
        raise _not_for_this_base(source, keys)
    loaded(pipe)[name] = {"kind": kind, "source": source, "scalable": True}
    return name


def safe_name(text: str) -> str:
    """An adapter name from a file name or hub id (PEFT puts it into module paths)."""
    return re.sub(r"\W+", "_", text).strip("_")[:48] or "adapter"


def describe_file(path: str | Path) -> dict:
    """What a saved adapter file says about itself (kind, rank, alpha, scale, where it loads)."""
    meta, keys = sources.read_header(Path(path))
    return {"kind": meta.get("hyperreal_kind", "lora"), "rank": meta.get("ss_network_dim"),
            "alpha": meta.get("ss_network_alpha"), "scale": meta.get("hyperreal_scale"),
            "loads_in": meta.get("hyperreal_loads_in", "diffusers, AUTOMATIC1111, ComfyUI (LoRA keys)"),
            "trigger_tokens": [m.group(1) for k in keys if (m := _BUNDLED.fullmatch(k))],
            "tensors": len(keys)}


