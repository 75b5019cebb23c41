"""What a visitor can pick (embedded artifacts and those trained in this app) and the folders the app writes."""
from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HyperrealError
from ..registry import embedded_artifacts
from ..settings import Settings
from ..safety import as_path, within
from ..sources import is_hub_id


@dataclass
class Library:
    """Artifacts a person can pick: embedded ones made for this base, by name, and those trained into the outputs
    folder (on this base)."""

    settings: Settings
    base_name: str | None = None  # None: every embedded artifact
    trained: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # kind -> [(label, path)]

    def folder(self, method: str, name: str) -> Path:
        safe = re.sub(r"\W+", "_", name).strip("_")[:40] or method
        return self.settings.outputs / "trained" / method / f"{time.strftime('%Y%m%d-%H%M%S')}-{safe}"

    def add(self, kind: str, label: str, path: str | Path) -> None:
        items = self.trained.setdefault(kind, [])
        items[:] = [(lbl, p) for lbl, p in items if p != str(path)] + [(label, str(path))]

    def choices(self, kind: str) -> list[tuple[str, str]]:
        emb = []
        for a in embedded_artifacts():
            if a.kind != kind or (self.base_name is not None and a.info.get("base") != self.base_name):
                continue
            # an artifact holding several files (tiny-bridge: swap and fuse) offers each as NAME:VARIANT
            files, default = a.info.get("files") or {}, a.info.get("default")
            emb.append((f"{a.name}{f' ({default})' if default else ''} (embedded)", a.name))
            emb += [(f"{a.name}:{v} (embedded)", f"{a.name}:{v}") for v in files if v != default]
        return emb + [(f"{label} (trained)", p) for label, p in reversed(self.trained.get(kind, []))]

    def check_source(self, value: str, what: str) -> str:
        """A model a person names: an offered choice, a hub id, or a path under the models or outputs folder."""
        value = (value or "").strip()
        if not value:
            raise HyperrealError(f"choose a {what} first")
        for kind in ("adapter", "controlnet", "bridge"):
            if any(value == v for _, v in self.choices(kind)):
                return value
        p = as_path(value, what)
        if p.exists() or "/" not in value or value.startswith((".", "/", "~")):
            try:
                resolved = within(p, self.settings.models, self.settings.outputs, what=what)
            except HyperrealError:
                raise HyperrealError(f"'{value}' is not allowed: name a hub id (owner/name) or a file under "
                                     f"{self.settings.models} (the models folder, HYPERREAL_MODELS)") from None
            if not p.exists():
                raise HyperrealError(f"{what} '{value}' does not exist")
            return str(resolved)
        if not is_hub_id(value):
            raise HyperrealError(f"'{value}' is not a hub id (owner/name), an offered {what} or a models-folder path")
        return value


def save_map(settings: Settings, image) -> str:
    """A previewed map as a PNG under OUTPUTS/maps (the only folder the app serves files from)."""
    path = settings.outputs / "maps" / f"{uuid.uuid4().hex[:12]}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return str(path)
