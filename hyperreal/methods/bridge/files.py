"""Bridge files: one ``.safetensors`` holding the bridge, any fuse projections and encoder LoRA, with the bridge's
description (mode, encoder id, widths, training info) as JSON in its header.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from ... import sources
from ...errors import HyperrealError
from ...registry import find_embedded
from .encoders import TextEncoder, add_encoder_lora, encoder_lora_state, load_encoder, resolve_encoder
from .spec import FORMAT, Bridge, BridgeSpec, LoadedBridge


def save_bridge(lb: LoadedBridge, path: str | Path, info: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"bridge.{k}": v.detach().float().contiguous().cpu() for k, v in lb.bridge.state_dict().items()}
    tensors.update({f"encoder_lora.{k}": v.float().contiguous().cpu() for k, v in encoder_lora_state(lb.encoder).items()})
    meta = {"format": FORMAT, "spec": asdict(lb.spec), "info": {**lb.info, **(info or {})}}
    header = {"hyperreal_kind": "bridge", "hyperreal_bridge": json.dumps(meta)}
    sources.save_safetensors(tensors, path, header)
    path.chmod(0o644)
    return path


def resolve_bridge_path(source: str) -> Path:
    """FILE | folder | embedded NAME (``NAME:VARIANT`` for a named file of an embedded bridge) -> a file."""
    name, _, which = source.partition(":")
    art = find_embedded(name, "bridge")
    if art is not None:
        files = art.info.get("files", {})
        file = files.get(which or art.info.get("default", ""), None)
        if file is None:
            raise HyperrealError(f"bridge '{source}': the embedded bridge '{name}' has "
                                 f"{', '.join(f'{name}:{k}' for k in files)}")
        return art.path / file
    found = sources.resolve(source, "bridge", "bridge",
                            lambda folder, s: sources.single_safetensors(folder, s, "bridge"), hub=False,
                            known="a file, a folder or an embedded bridge (python -m hyperreal models lists them)")
    return Path(found.where)


def read_header(path: str | Path) -> dict:
    """The bridge description in a file's header (an error if it is not a bridge file of a known format)."""
    meta, _ = sources.read_header(path)
    if meta.get("hyperreal_kind") != "bridge" or "hyperreal_bridge" not in meta:
        raise HyperrealError(f"'{path}' is not a hyperreal bridge file (no bridge description in its header)")
    d = json.loads(meta["hyperreal_bridge"])
    if d.get("format") != FORMAT:
        raise HyperrealError(f"'{path}' is a bridge file of an unknown format {d.get('format')!r}")
    return d


def load_bridge(source: str, encoder: TextEncoder | None = None, device="cpu") -> LoadedBridge:
    """A bridge file (or embedded name) with its encoder; pass ``encoder`` to reuse an already loaded one."""
    path = resolve_bridge_path(source)
    meta = read_header(path)
    spec = BridgeSpec(**meta["spec"])
    tensors = load_file(str(path))
    bridge = Bridge(spec)
    bridge.load_state_dict({k[len("bridge."):]: v for k, v in tensors.items() if k.startswith("bridge.")})
    bridge.to(device).requires_grad_(False).eval()
    lora = {k[len("encoder_lora."):]: v for k, v in tensors.items() if k.startswith("encoder_lora.")}
    if encoder is None or lora:
        encoder = load_encoder(spec.encoder, device)  # a private copy: LoRA changes the encoder
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
