"""Artifacts shipped inside the package (the tiny base and what later methods train for it).

Each artifact is a folder under ``hyperreal/embedded/`` holding a ``hyperreal.json`` with at least ``kind``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"


@dataclass(frozen=True)
class Artifact:
    name: str
    kind: str  # base | controlnet | adapter | bridge
    path: Path
    info: dict


def embedded_artifacts() -> list[Artifact]:
    out = []
    if EMBEDDED_DIR.is_dir():
        for folder in sorted(EMBEDDED_DIR.iterdir()):
            meta = folder / "hyperreal.json"
            if meta.is_file():
                info = json.loads(meta.read_text())
                out.append(Artifact(folder.name, info.get("kind", "base"), folder, info))
    return out


def find_embedded(name: str, kind: str | None = None) -> Artifact | None:
    for a in embedded_artifacts():
        if a.name == name and (kind is None or a.kind == kind):
            return a
    return None
