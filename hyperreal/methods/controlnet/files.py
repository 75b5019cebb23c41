"""ControlNet files: a diffusers folder (``ControlNetModel.from_pretrained`` loads it) and one ``.safetensors`` in
lllyasviel's original ControlNet layout (``control_model.input_hint_block.0.weight``, ``control_model.zero_convs.N.0``,
``control_model.middle_block_out.0``, CompVis UNet names: the keys of ``control_v11p_sd15_*.pth``), which
AUTOMATIC1111's sd-webui-controlnet, ComfyUI and diffusers' ``from_single_file`` all read; its diffusers config rides
in the header. Reading: those, our older diffusers-keyed single files, other people's lllyasviel-layout files (with
or without ``control_model.``), diffusers folders and hub ids; local files never touch the hub.

The key mapping is written once (:func:`original_name`, diffusers name -> lllyasviel name). Every file we write is
checked against diffusers' own forward conversion (``convert_controlnet_checkpoint``, what ``from_single_file`` runs):
it must give back exactly our state dict, else the file keeps diffusers keys. Reading inverts the same mapping.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from diffusers import ControlNetModel
from diffusers.utils import logging as diffusers_logging
from safetensors import safe_open
from safetensors.torch import load_file

from ... import sources
from ...errors import HyperrealError
from ...registry import embedded_artifacts
from .layout import (_SD_TOOL_WIDTHS, LayoutError, _cn_config, _layout, _not_a_controlnet, _same,
                     _sdxl_error, config_from_weights, from_original, original_name, to_original)

DIFFUSERS_SUBFOLDER = "controlnet"


# --- writing --------------------------------------------------------------------------------------------------

def fits_a1111_comfyui(config: dict) -> bool:
    """A1111's and ComfyUI's ControlNet classes are built with SD's widths; narrower test bases do not fit."""
    return all(_same(config.get(k), v) for k, v in _SD_TOOL_WIDTHS.items())


def diffusers_call(file: str = "NAME.safetensors", config_dir: str = DIFFUSERS_SUBFOLDER) -> str:
    return f'ControlNetModel.from_single_file("{file}", config="{config_dir}", local_files_only=True)'


def loads_in(config: dict, layout: str, file: str = "NAME.safetensors") -> dict[str, str]:
    """Where the single file loads, and how (the header's ``hyperreal_loads_in``)."""
    out = {"diffusers": (diffusers_call(file) + " with config= a folder holding config.json: the "
                         f"'{DIFFUSERS_SUBFOLDER}/' folder written beside this file, or this header's hyperreal_config "
                         "saved as config.json (no hub access; "
                         + ("diffusers >= 0.28" if layout == "lllyasviel" else "diffusers >= 0.32, diffusers keys")
                         + ")"),
           "hyperreal": "--controlnet FILE, or a job's controlnet unit {\"path\": FILE, ...}"}
    if layout == "lllyasviel" and fits_a1111_comfyui(config):
        out["automatic1111"] = ("sd-webui-controlnet: copy into extensions/sd-webui-controlnet/models "
                                "(or models/ControlNet)")
        out["comfyui"] = "copy into models/controlnet; the 'Load ControlNet Model' node"
    else:
        out["automatic1111"] = out["comfyui"] = (
            "not meant for them: only SD1.5-sized ControlNets (block_out_channels [320, 640, 1280, 1280]) are; "
            f"this one has {list(config.get('block_out_channels') or [])}")
    return out


def save_controlnet(controlnet, out: str | Path, info: dict | None = None, name: str = "controlnet",
                    dtype: torch.dtype | None = None) -> list[Path]:
    """``OUT/controlnet/`` (diffusers: ``ControlNetModel.from_pretrained`` loads it), ``OUT/NAME.safetensors``
    (lllyasviel layout, ``control_model.`` keys; the config, the training info and where it loads in its JSON
    header), ``OUT/controlnet.json`` and ``OUT/README.md`` (how to load it in diffusers, AUTOMATIC1111, ComfyUI).
    The folder comes first."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = controlnet if dtype is None else copy.deepcopy(controlnet).to(dtype)
    folder = out / DIFFUSERS_SUBFOLDER
    model.save_pretrained(folder, safe_serialization=True)
    info = {k: v for k, v in (info or {}).items() if _jsonable(v)}
    config = dict(model.config)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    try:
        single_sd, layout = to_original(sd, config), "lllyasviel"
    except LayoutError:
        single_sd, layout = sd, "diffusers"  # loads in diffusers >= 0.32 (config=) and hyperreal
    single = out / f"{name}.safetensors"
    where = loads_in(config, layout, single.name)
    sources.save_safetensors(single_sd, single, metadata={
        "format": "pt", "hyperreal_kind": "controlnet", "hyperreal_layout": layout,
        "hyperreal_config": json.dumps(config), "hyperreal_info": json.dumps(info),
        "hyperreal_loads_in": json.dumps(where)})
    (out / "controlnet.json").write_text(json.dumps({
        "kind": "controlnet", "layout": layout,
        "files": {"diffusers": DIFFUSERS_SUBFOLDER, "single_file": single.name},
        "loads_in": {DIFFUSERS_SUBFOLDER: "diffusers (ControlNetModel.from_pretrained), hyperreal",
                     single.name: where}, **info}, indent=2) + "\n")
    (out / "README.md").write_text(model_card(single.name, config, layout, info))
    return [folder, single]


def loads_in_line(path: str | Path) -> str:
    """One line for ``wrote PATH (loads in: ...)`` about a folder or single file save_controlnet wrote."""
    p = Path(path)
    if p.is_dir():
        return "diffusers (ControlNetModel.from_pretrained), hyperreal"
    where = json.loads(read_header(p).get("hyperreal_loads_in") or "{}")
    if not where:  # written before the lllyasviel layout
        return "hyperreal (diffusers keys; config in the header)"
    tools = [name for name, key in (("AUTOMATIC1111", "automatic1111"), ("ComfyUI", "comfyui"))
             if key in where and not where[key].startswith("not ")]
    return ", ".join([f"diffusers (from_single_file with config='{DIFFUSERS_SUBFOLDER}/' beside it)", *tools,
                      "hyperreal"])


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


# which preprocessor to pick elsewhere for maps like the ones this ControlNet was trained on
_A1111_PRE = {"canny": "canny", "softedge": {"hed": "softedge_hed", "pidinet": "softedge_pidinet"},
              "pose": "openpose (body only)", "given": "none (upload a map made like the training maps)"}
_COMFY_PRE = {"canny": "the core 'Canny' node", "softedge": {"hed": "'HED Soft-Edge Lines' (comfyui_controlnet_aux)",
                                                              "pidinet": "'PiDiNet Soft-Edge Lines' "
                                                                         "(comfyui_controlnet_aux)"},
              "pose": "'OpenPose Pose' (comfyui_controlnet_aux), body only",
              "given": "'Load Image' with a ready map"}


def _pre(table: dict, info: dict) -> str:
    v = table.get(info.get("extractor", ""), "the preprocessor matching its training maps")
    return v.get((info.get("extractor_params") or {}).get("model", "hed"), v["hed"]) if isinstance(v, dict) else v


def model_card(file: str, config: dict, layout: str, info: dict) -> str:
    """README.md for the output folder: what the files are and how to load them in diffusers, A1111 and ComfyUI."""
    tools = layout == "lllyasviel" and fits_a1111_comfyui(config)
    extractor = info.get("extractor", "?")
    lines = [
        f"# ControlNet ({extractor}) for {info.get('base', 'an SD1.5-family base')}", "",
        f"- `{DIFFUSERS_SUBFOLDER}/`: diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`).",
        f"- `{file}`: one file, " + ("lllyasviel's original ControlNet layout (`control_model.` keys, as "
                                    "`control_v11p_sd15_*.pth`)" if layout == "lllyasviel" else "diffusers keys")
        + "; its diffusers config is in the header (`hyperreal_config`).",
        f"- Condition maps: {extractor} " + json.dumps(info.get("extractor_params", {})) + ", white on black"
        + (f"; trained at {info['resolution']}" if info.get("resolution") else "") + ".", "",
        "## diffusers", "", "```python", "from diffusers import ControlNetModel, StableDiffusionControlNetPipeline",
        f'controlnet = ControlNetModel.from_pretrained("{DIFFUSERS_SUBFOLDER}")',
        "# or the single file, offline (the config comes from the folder beside it):",
        "controlnet = " + diffusers_call(file),
        "pipe = StableDiffusionControlNetPipeline.from_pretrained(BASE, controlnet=controlnet)", "```", "",
        "With the single file alone, save its header's config as `config.json` in a folder and pass that folder:", "",
        "```python", "import json, os", "from safetensors import safe_open",
        f'with safe_open("{file}", "pt") as f:', '    config = f.metadata()["hyperreal_config"]',
        'os.makedirs("cn_config", exist_ok=True)', 'open("cn_config/config.json", "w").write(config)',
        f'controlnet = ControlNetModel.from_single_file("{file}", config="cn_config", local_files_only=True)', "```",
        "", "Without `config=`, `from_single_file` looks up a config on the Hugging Face hub and fails offline.", ""]
    if tools:
        lines += [
            "## AUTOMATIC1111 (sd-webui-controlnet)", "",
            f"Copy `{file}` into `extensions/sd-webui-controlnet/models` (or `models/ControlNet`), press refresh "
            f"in the ControlNet panel, pick it as Model and the preprocessor `{_pre(_A1111_PRE, info)}`.", "",
            "## ComfyUI", "",
            f"Copy `{file}` into `models/controlnet`; load it with the **Load ControlNet Model** node and apply it "
            f"with **Apply ControlNet**; make the map with {_pre(_COMFY_PRE, info)}.", ""]
    else:
        lines += ["## AUTOMATIC1111, ComfyUI", "",
                  "Not meant for them: their ControlNet classes are built for SD1.5's sizes (block_out_channels "
                  f"[320, 640, 1280, 1280]); this one has {list(config.get('block_out_channels') or [])}"
                  + ("" if layout == "lllyasviel" else " and diffusers keys") + ". A ControlNet trained by hyperreal "
                  "on an SD1.5 base loads there from `models/ControlNet` (A1111) or `models/controlnet` (ComfyUI).",
                  ""]
    return "\n".join(lines)


# --- reading --------------------------------------------------------------------------------------------------

def read_header(path: str | Path) -> dict[str, str]:
    return sources.read_header(path)[0]


def _is_diffusers_folder(p: Path) -> bool:
    return (p / "config.json").is_file() and any(p.glob("diffusion_pytorch_model*.safetensors"))


def _pick(folder: Path, source: str) -> sources.Source:
    for cand in (folder, folder / DIFFUSERS_SUBFOLDER):
        if _is_diffusers_folder(cand):
            return sources.Source("folder", str(cand))
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return sources.Source("file", str(files[0]))
    raise HyperrealError(f"ControlNet folder '{source}' holds no diffusers ControlNet (config.json + "
                         "diffusion_pytorch_model.safetensors) and no single .safetensors file")


def resolve_source(source: str) -> sources.Source:
    """NAME | DIR | FILE | hub id -> a folder, a file or a hub id; never touches the network."""
    names = ", ".join(sources.embedded_names("controlnet")) or "none"
    return sources.resolve(source, "controlnet", "ControlNet", _pick,
                           known=f"an embedded name ({names}), an existing folder or .safetensors file, or a hub id "
                                 "like lllyasviel/control_v11p_sd15_canny")


def load_controlnet(source: str, device=None, dtype: torch.dtype | None = None, unet_config: dict | None = None):
    """A ControlNetModel from an embedded name, a diffusers folder, a single file (ours, old or new; another tool's
    lllyasviel-layout or diffusers-keyed file), or a hub id. A headerless single file gets the base's config
    (``unet_config``: the base UNet's config; SD1.5's when None), never the hub's."""
    src = resolve_source(source)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        if src.how == "file":
            model = _load_single_file(src.where, source, unet_config)
        else:
            model = ControlNetModel.from_pretrained(src.where, use_safetensors=True)
    except HyperrealError:
        raise
    except Exception as err:
        cause, fix = sources.load_error("ControlNet", source, err, hub=src.how == "hub")
        raise HyperrealError(f"could not load ControlNet '{source}': {cause}" + (f"; {fix}" if fix else "")) from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    model.requires_grad_(False).eval()
    return model.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else model


def _beside_config(path: str) -> dict | None:
    """config.json of a ControlNet beside the file (a diffusers folder's weights named directly)."""
    p = Path(path).parent / "config.json"
    try:
        cfg = json.loads(p.read_text()) if p.is_file() else None
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) and cfg.get("_class_name") == "ControlNetModel" else None


def _load_single_file(path: str, source: str, unet_config: dict | None = None):
    meta, keys = sources.read_header(path)
    layout, prefix = _layout(keys)
    if layout is None:
        raise _not_a_controlnet(source, keys, meta)
    keys = [k for k in keys if k.startswith(prefix)] if prefix else keys  # ControlNet 1.0 files also hold the UNet
    with safe_open(path, framework="pt") as f:
        raw = {k: list(f.get_slice(k).get_shape()) for k in keys}
    if layout == "diffusers":
        if "add_embedding.linear_1.weight" in raw:
            raise _sdxl_error(source)
        per = 1 + max((int(m.group(1)) for k in raw if (m := re.fullmatch(r"down_blocks\.0\.resnets\.(\d+)\..*", k))),
                      default=0)
        shapes = {name: s for k, s in raw.items() if (name := original_name(k, per)) is not None}
    else:
        shapes = {k[len(prefix):]: s for k, s in raw.items()}
    if "hyperreal_config" in meta:  # ours: the config it was trained with
        config = {k: v for k, v in json.loads(meta["hyperreal_config"]).items() if not k.startswith("_")}
    elif layout == "diffusers" and (beside := _beside_config(path)) is not None:
        config = _cn_config(beside)
    else:
        config = config_from_weights(shapes, unet_config, source)
    model = ControlNetModel.from_config(config)
    tensors = load_file(path)
    if layout == "diffusers":
        sd = {k: tensors[k] for k in keys}
    else:
        sd = from_original({k[len(prefix):]: tensors[k] for k in keys}, config, model.state_dict().keys())
    try:
        res = model.load_state_dict(sd, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise HyperrealError(f"ControlNet file '{source}' does not fit its config ("
                             f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err})"
                             ) from None
    missing, unexpected = list(res.missing_keys), len(keys) - len(sd) + len(res.unexpected_keys)
    if missing or unexpected:
        raise HyperrealError(f"ControlNet file '{source}' does not match its config ({len(missing)} missing, "
                             f"{unexpected} unexpected tensors{', e.g. ' + missing[0] if missing else ''})")
    return model.to(next(iter(sd.values())).dtype)


def list_controlnets() -> list:
    """Embedded ControlNets (``registry.Artifact``: name, kind, path, info)."""
    return [a for a in embedded_artifacts() if a.kind == "controlnet"]


def choices_for(base) -> list[str]:
    """What a ControlNet picker offers on this base: embedded ones made for it, else the base's own list
    (``controlnets`` in its defaults: hub ids)."""
    names = [a.name for a in list_controlnets() if a.info.get("base") == base.name]
    return names if names else list(base.defaults.get("controlnets", []))


def describe(source: str) -> dict:
    """What a saved ControlNet says about itself (for a UI: base, extractor, steps, measured figures)."""
    src = resolve_source(source)
    how, where = src.how, src.where
    info: dict = {"source": source, "how": how, "path": where}
    if how == "file":
        meta = read_header(where)
        info.update(json.loads(meta.get("hyperreal_info", "{}")))
        if "hyperreal_layout" in meta:
            info["layout"] = meta["hyperreal_layout"]
    elif how == "folder":
        for meta in (Path(where) / "hyperreal.json", Path(where).parent / "hyperreal.json",
                     Path(where).parent / "controlnet.json"):
            if meta.is_file():
                info.update(json.loads(meta.read_text()))
                break
    return info
