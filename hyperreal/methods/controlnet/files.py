"""ControlNet files: a diffusers folder (``ControlNetModel.from_pretrained`` loads it) and one ``.safetensors``
with its config in the header; reading those, embedded names, other tools' diffusers folders and hub ids.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from diffusers import ControlNetModel
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load_file

from ... import sources
from ...errors import HyperrealError
from ...registry import embedded_artifacts

DIFFUSERS_SUBFOLDER = "controlnet"


def save_controlnet(controlnet, out: str | Path, info: dict | None = None, name: str = "controlnet",
                    dtype: torch.dtype | None = None) -> list[Path]:
    """``OUT/controlnet/`` (diffusers: ``ControlNetModel.from_pretrained`` loads it) and ``OUT/NAME.safetensors``
    (diffusers keys; the config and the training info in its JSON header). The folder comes first."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = controlnet if dtype is None else copy.deepcopy(controlnet).to(dtype)
    folder = out / DIFFUSERS_SUBFOLDER
    model.save_pretrained(folder, safe_serialization=True)
    info = {k: v for k, v in (info or {}).items() if _jsonable(v)}
    single = out / f"{name}.safetensors"
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    sources.save_safetensors(sd, single, metadata={"format": "pt", "hyperreal_kind": "controlnet",
                                    "hyperreal_config": json.dumps(dict(model.config)),
                                    "hyperreal_info": json.dumps(info)})
    (out / "controlnet.json").write_text(json.dumps({
        "kind": "controlnet", "files": {"diffusers": DIFFUSERS_SUBFOLDER, "single_file": single.name},
        "loads_in": {DIFFUSERS_SUBFOLDER: "diffusers (ControlNetModel.from_pretrained), hyperreal",
                     single.name: "hyperreal (diffusers keys; config in the header)"}, **info}, indent=2) + "\n")
    return [folder, single]


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


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


def load_controlnet(source: str, device=None, dtype: torch.dtype | None = None):
    """A ControlNetModel from an embedded name, a diffusers folder, one of our single files, or a hub id."""
    src = resolve_source(source)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        if src.how == "file":
            model = _load_single_file(src.where, source)
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


def _load_single_file(path: str, source: str):
    meta = read_header(path)
    if "hyperreal_config" not in meta:
        raise HyperrealError(f"ControlNet file '{source}' has no hyperreal config in its header; single files are "
                             "read when hyperreal wrote them. Use the diffusers folder of another tool's ControlNet "
                             "(config.json + diffusion_pytorch_model.safetensors) or its hub id")
    config = {k: v for k, v in json.loads(meta["hyperreal_config"]).items() if not k.startswith("_")}
    model = ControlNetModel.from_config(config)
    sd = load_file(path)
    res = model.load_state_dict(sd, strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise HyperrealError(f"ControlNet file '{source}' does not match its own config "
                             f"({len(res.missing_keys)} missing, {len(res.unexpected_keys)} unexpected tensors)")
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
        info.update(json.loads(read_header(where).get("hyperreal_info", "{}")))
    elif how == "folder":
        for meta in (Path(where) / "hyperreal.json", Path(where).parent / "hyperreal.json",
                     Path(where).parent / "controlnet.json"):
            if meta.is_file():
                info.update(json.loads(meta.read_text()))
                break
    return info


