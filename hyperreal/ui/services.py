"""What the tabs call: the glue between the page and the methods' public functions.

Tabs get these as plain callables; none of them touches a model. Trained artifacts land under
``OUTPUTS/trained/<method>/<run>/`` and are selectable in Generate as soon as a run ends.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HyperrealError
from ..loading import BaseModel
from ..registry import embedded_artifacts
from ..settings import Settings

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


@dataclass
class Library:
    """Artifacts a person can pick: embedded ones by name, and those trained into the outputs folder."""

    settings: Settings
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
            if a.kind != kind:
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
        p = Path(value).expanduser()
        if p.exists() or "/" not in value or value.startswith((".", "/", "~")):
            resolved = p.resolve()
            roots = [self.settings.models.resolve(), self.settings.outputs.resolve()]
            if not any(resolved == r or r in resolved.parents for r in roots):
                raise HyperrealError(f"'{value}' is not allowed: name a hub id (owner/name) or a file under "
                                     f"{self.settings.models} (the models folder, HYPERREAL_MODELS)")
            if not p.exists():
                raise HyperrealError(f"{what} '{value}' does not exist")
            return str(resolved)
        if not HUB_ID.match(value):
            raise HyperrealError(f"'{value}' is not a hub id (owner/name), an offered {what} or a models-folder path")
        return value


def session_folder(settings: Settings, request) -> Path:
    """Uploads and computed maps of one browser session, never shared between sessions."""
    sid = re.sub(r"\W+", "", getattr(request, "session_hash", None) or "anon")[:64] or "anon"
    return settings.outputs.parent / f".{settings.outputs.name}-sessions" / sid


def progress_info(on_event, step: int, total: int, message: str) -> None:
    """A line for the Train panel after the loop ends (e.g. drift measured on the result)."""
    from ..training import ProgressEvent

    on_event(ProgressEvent("info", step, total, message=message))


def loop_config(knobs: dict, lr: float):
    """The shared loop's settings from a Train panel's knobs (steps, batch size, samples every N steps)."""
    from ..training import TrainConfig

    steps = int(knobs["steps"])
    cfg = TrainConfig(steps=steps, batch_size=int(knobs["batch_size"]), lr=float(lr),
                      validate_every=int(knobs.get("sample_every") or 0), log_every=max(1, min(10, steps)))
    cfg.check()
    return cfg


def adapter_trainer(base: BaseModel, library: Library):
    """``start(data_dir, knobs, on_event, cancel) -> artifacts`` for the Adapters tab's Train panel."""
    from .. import adapters
    from ..zerogpu import train_in_chunks

    def start(data: Path, knobs: dict, on_event, cancel) -> list[Path]:
        kind = knobs["kind"]
        req = adapters.TrainRequest(
            data=str(data), kind=kind, rank=int(knobs["rank"]), alpha=knobs.get("alpha") or None,
            preset=knobs["preset"], placement=knobs["placement"], rslora=bool(knobs.get("rslora")),
            train_text_encoder={"on": True, "off": False}.get(knobs.get("train_text_encoder") or "auto"),
            text_encoder_lr=knobs.get("text_encoder_lr") or None, trigger=(knobs.get("trigger") or "").strip() or None,
            trigger_token=bool(knobs.get("trigger_token", True)),
            class_prompts=[p.strip() for p in (knobs.get("class_prompt") or "").split("|") if p.strip()],
            class_images=int(knobs.get("class_images") or 0), repeats=int(knobs.get("repeats") or 0) or None,
            prior_weight=adapters.DEFAULT_PRIOR_WEIGHT if knobs.get("prior_weight") is None
            else float(knobs["prior_weight"]),
            flip=bool(knobs.get("flip")), caption_dropout=float(knobs.get("caption_dropout") or 0.0),
            name=knobs.get("name") or f"{kind}_adapter")
        if kind != "full":
            req.spec().check()
        cfg = loop_config(knobs, knobs.get("lr") or adapters.KIND_DEFAULTS[kind]["lr"])
        out = library.folder("adapter", req.name)
        learner = adapters.make_learner(base, req, out, info={"steps": cfg.steps, "lr": cfg.lr})
        try:
            paths = train_in_chunks(learner, cfg, out, on_event=on_event, cancel=cancel)
            pairs = adapters.default_drift_prompts(base.name, learner.data.captions, req.trigger, 4)
            d = adapters.drift(learner, pairs, base.defaults["steps"], base.defaults["guidance"])
            progress_info(on_event, cfg.steps, cfg.steps,
                          f"Drift on {len(pairs)} prompts without the trigger: {d['drift']:.2f} mean abs pixel "
                          "difference (0-255) from the base, same seeds. Small is good: the base kept its knowledge.")
        finally:
            if kind != "full":  # the shared base is plain again; Generate loads the saved file when chosen
                adapters.remove_adapter(base.pipe, learner.name)
        if paths and kind != "full":
            library.add("adapter", f"{req.name} ({kind}, {time.strftime('%H:%M')})", paths[0])
        return paths

    return start


def sketch_image(sketch):
    """A Sketchpad value (Gradio's editor dict, or an image) as one RGB image; None when nothing was drawn."""
    if isinstance(sketch, dict):
        sketch = sketch.get("composite")
    if sketch is None:
        return None
    from PIL import Image

    img = sketch if isinstance(sketch, Image.Image) else Image.open(sketch)
    if img.mode == "RGBA":  # drawn strokes on a transparent canvas: put them on white
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def condition_map(source: str, image, sketch, low, high, resize: str, width: int, height: int):
    """The map a ControlNet unit feeds: extracted from a picture, the picture as-is, or a scribble."""
    from ..conditions import make_condition

    if source == "scribble":
        image = sketch_image(sketch)
        if image is None:
            raise HyperrealError("Draw a scribble first (or choose another 'Map from').")
        return make_condition("uploaded", image, width, height, resize)
    if image is None:
        raise HyperrealError("Upload a picture for the ControlNet unit first (or switch the unit off).")
    params = {"low": int(low), "high": int(high)} if source == "canny" else {}
    return make_condition(source, image, width, height, resize, **params)


def save_map(settings: Settings, image) -> str:
    """A previewed map as a PNG under OUTPUTS/maps (the only folder the app serves files from)."""
    import uuid

    path = settings.outputs / "maps" / f"{uuid.uuid4().hex[:12]}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return str(path)


def controlnet_job(library: Library, guess: bool, units: list[dict]) -> list[dict] | None:
    """Switched-on units (each with its previewed map file) -> the job's ``controlnet`` list."""
    out = []
    for u in units:
        if not u.get("map"):
            raise HyperrealError(f"ControlNet unit {u['unit']} is on but has no map: upload a picture or draw a "
                                 "scribble in its tab (the preview shows the map), or switch the unit off.")
        item = {"path": library.check_source(u["model"], "ControlNet"), "image": u["map"],
                "scale": float(u["weight"]), "start": float(u["start"]), "end": float(u["end"])}
        if guess:
            item["guess_mode"] = True
        out.append(item)
    return out or None


def controlnet_trainer(base: BaseModel, library: Library):
    """``start(data_dir, knobs, on_event, cancel)`` for the ControlNet tab's Train panel."""
    from .. import controlnet
    from ..zerogpu import train_in_chunks

    def start(data: Path, knobs: dict, on_event, cancel) -> list[Path]:
        name = re.sub(r"[^\w.-]+", "_", knobs.get("name") or "controlnet").strip("_") or "controlnet"
        req = controlnet.TrainRequest(data=str(data), extractor=knobs["extractor"],
                                      canny_low=int(knobs["canny_low"]), canny_high=int(knobs["canny_high"]),
                                      caption_dropout=float(knobs["caption_dropout"]),
                                      gradient_checkpointing=bool(knobs.get("gradient_checkpointing")), name=name)
        req.check()
        cfg = loop_config(knobs, knobs["lr"])
        out = library.folder("controlnet", name)
        learner = controlnet.make_learner(base, req, out, info={"steps": cfg.steps, "lr": cfg.lr})
        paths = train_in_chunks(learner, cfg, out, on_event=on_event, cancel=cancel)
        folder = next((p for p in paths if Path(p).is_dir()), None)
        if folder is not None:
            library.add("controlnet", f"{name} ({req.extractor}, {time.strftime('%H:%M')})", folder)
        # the panel offers files for download: the single file, and the diffusers folder's weights and config
        files = [p for p in paths if Path(p).is_file()]
        if folder is not None:
            files += sorted(p for p in Path(folder).iterdir() if p.is_file())
        return files

    return start


def bridge_trainer(base: BaseModel, library: Library):
    """``start(data_dir or None, knobs, on_event, cancel)`` for the Encoder bridge tab's Train panel."""
    from .. import bridge

    def start(data: Path | None, knobs: dict, on_event, cancel) -> list[Path]:
        name = re.sub(r"[^\w.-]+", "_", knobs.get("name") or "bridge").strip("_") or "bridge"
        source = knobs.get("data_source") or "uploaded"
        if source == "shapes":
            where = "shapes"
        elif source == "captions":
            lines = [line.strip() for line in (knobs.get("captions") or "").splitlines() if line.strip()]
            if not lines:
                raise HyperrealError("Type some captions (one per line), or choose another data source.")
            where = library.folder("bridge", name + "-captions").with_suffix(".txt")
            where.parent.mkdir(parents=True, exist_ok=True)
            where.write_text("\n".join(lines) + "\n", encoding="utf-8")
        else:
            if data is None:
                raise HyperrealError("Upload captioned images above, or choose typed captions / the shapes world.")
            where = data
        mode = knobs["mode"]
        req = bridge.TrainRequest(data=str(where), mode=mode, encoder=(knobs.get("encoder") or "").strip() or None,
                                  lora_rank=int(knobs.get("lora_rank") or 0),
                                  diffusion_steps=int(knobs.get("diffusion_steps") or 0) if mode == "swap" else 0,
                                  name=name)
        req.check()
        cfg = loop_config(knobs, knobs["lr"])
        out = library.folder("bridge", name)
        paths = bridge.run_training(base, req, cfg, out, on_event=on_event, cancel=cancel)
        if paths:
            library.add("bridge", f"{name} ({mode}, {time.strftime('%H:%M')})", paths[0])
        return paths

    return start
