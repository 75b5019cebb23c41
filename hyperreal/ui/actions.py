"""What the tabs' buttons do: turn a panel's knobs into a method's request and hand it to :mod:`hyperreal.services`,
make a ControlNet unit's map, and turn switched-on units into a job's ``controlnet`` list.

Tabs get these as plain callables; nothing here touches a model or a learner. Trained artifacts land under
``OUTPUTS/trained/<method>/<run>/`` and are selectable in Generate as soon as a run ends.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

from .. import services
from ..errors import HyperrealError
from ..images import open_image
from ..loading import BaseModel
from ..methods import adapters, bridge, controlnet
from ..training import TrainConfig
from .. import zerogpu
from .bases import holding
from .library import Library


def loop_config(knobs: dict, lr: float, lr_schedule: str = "constant") -> TrainConfig:
    """The shared loop's settings from a Train panel's knobs (steps, batch size, samples every N steps, memory) and
    the recipe's learning-rate schedule."""
    steps = int(knobs["steps"])
    if lr is None:
        raise HyperrealError("Set a learning rate (the field is empty).")
    cfg = TrainConfig(steps=steps, batch_size=int(knobs["batch_size"]), lr=float(lr),
                      validate_every=int(knobs.get("sample_every") or 0), log_every=max(1, min(10, steps)),
                      gradient_checkpointing=bool(knobs.get("gradient_checkpointing")),
                      use_8bit_adam=bool(knobs.get("use_8bit_adam")), lr_schedule=lr_schedule)
    cfg.check()
    return cfg


def _number(value) -> float | None:
    """A Number field's value: None when empty (then the recipe's), else the number as typed, 0 included (the
    request's own check says what is wrong with it)."""
    return None if value is None or value == "" else float(value)


def _name(knobs: dict, default: str) -> str:
    return re.sub(r"[^\w.-]+", "_", knobs.get("name") or default).strip("_") or default


def adapter_trainer(current, library: Library):
    """``start(data_dir, knobs, on_event, cancel) -> artifacts`` for the Adapters tab's Train panel; ``current``: the
    app's :class:`~hyperreal.ui.bases.CurrentBase` (held for the run, no switching), or a BaseModel."""

    def start(data: Path, knobs: dict, on_event, cancel) -> list[Path]:
        with holding(current) as base:
            return _train_adapter(base, data, knobs, on_event, cancel)

    def _class_images(base: BaseModel, kind: str, value) -> int | None:
        # the slider untouched is the recipe's count, which stands down (with a note) when there is nothing to
        # prompt the base with; a count the person chose is theirs, and an error says what it lacks
        count = int(value or 0)
        return None if count == services.train_settings(base, "adapter", kind).get("class_images") else count

    def _train_adapter(base: BaseModel, data: Path, knobs: dict, on_event, cancel) -> list[Path]:
        kind = knobs["kind"]
        req = adapters.TrainRequest(
            data=str(data), kind=kind, rank=int(knobs["rank"]), alpha=knobs.get("alpha") or None,
            preset=knobs["preset"], placement=knobs["placement"], rslora=bool(knobs.get("rslora")),
            train_text_encoder={"on": True, "off": False}.get(knobs.get("train_text_encoder") or "auto"),
            text_encoder_lr=_number(knobs.get("text_encoder_lr")), trigger=(knobs.get("trigger") or "").strip() or None,
            trigger_token=bool(knobs.get("trigger_token", True)),
            class_prompts=[p.strip() for p in (knobs.get("class_prompt") or "").split("|") if p.strip()],
            class_images=_class_images(base, kind, knobs.get("class_images")), repeats=int(knobs.get("repeats") or 0) or None,
            prior_weight=_number(knobs.get("prior_weight")),
            flip=bool(knobs.get("flip")), caption_dropout=float(knobs.get("caption_dropout") or 0.0),
            name=knobs.get("name") or f"{kind}_adapter")
        out = library.folder("adapter", req.name)
        req = services.check_adapter_request(req, out)
        lr, recipe = _number(knobs.get("lr")), services.train_settings(base, "adapter", kind)
        cfg = loop_config(knobs, recipe["lr"] if lr is None else lr, recipe["lr_schedule"])
        report = services.train_adapter(base, req, cfg, out, on_event=on_event, cancel=cancel, drift_samples=4,
                                        runner=zerogpu.runner())
        if report.paths and kind != "full":
            library.add("adapter", f"{req.name} ({kind}, {time.strftime('%H:%M')})", report.paths[0])
        return report.paths

    return start


def controlnet_trainer(current, library: Library):
    """``start(data_dir, knobs, on_event, cancel)`` for the ControlNet tab's Train panel."""

    def start(data: Path, knobs: dict, on_event, cancel) -> list[Path]:
        with holding(current) as base:
            return _train_controlnet(base, data, knobs, on_event, cancel)

    def _train_controlnet(base: BaseModel, data: Path, knobs: dict, on_event, cancel) -> list[Path]:
        name = _name(knobs, "controlnet")
        req = controlnet.TrainRequest(data=str(data), extractor=knobs["extractor"],
                                      canny_low=int(knobs["canny_low"]), canny_high=int(knobs["canny_high"]),
                                      caption_dropout=float(knobs["caption_dropout"]), name=name)
        out = library.folder("controlnet", name)
        req = services.check_controlnet_request(req, out)
        cfg = loop_config(knobs, knobs["lr"], services.train_settings(base, "controlnet")["lr_schedule"])
        report = services.train_controlnet(base, req, cfg, out, on_event=on_event, cancel=cancel,
                                           runner=zerogpu.runner())
        folder = next((p for p in report.paths if p.is_dir()), None)
        if folder is not None:
            library.add("controlnet", f"{name} ({req.extractor}, {time.strftime('%H:%M')})", folder)
        # the panel offers files for download: the single file, and the diffusers folder's weights and config
        files = [p for p in report.paths if p.is_file()]
        if folder is not None:
            files += sorted(p for p in folder.iterdir() if p.is_file())
        return files

    return start


def bridge_trainer(current, library: Library):
    """``start(data_dir or None, knobs, on_event, cancel)`` for the Encoder bridge tab's Train panel."""

    def start(data: Path | None, knobs: dict, on_event, cancel) -> list[Path]:
        with holding(current) as base:
            return _train_bridge(base, data, knobs, on_event, cancel)

    def _train_bridge(base: BaseModel, data: Path | None, knobs: dict, on_event, cancel) -> list[Path]:
        name = _name(knobs, "bridge")
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
        encoder = (knobs.get("encoder") or "").strip() or None
        if encoder is not None and encoder not in bridge.encoder_aliases():  # a hub id or a models-folder path
            encoder = library.check_source(encoder, "extra encoder")
        req = bridge.TrainRequest(data=str(where), mode=mode, encoder=encoder,
                                  lora_rank=int(knobs.get("lora_rank") or 0),
                                  diffusion_steps=int(knobs.get("diffusion_steps") or 0) if mode == "swap" else 0,
                                  name=name)
        out = library.folder("bridge", name)
        req = services.check_bridge_request(req, out)
        cfg = loop_config(knobs, knobs["lr"], services.train_settings(base, "bridge", mode)["lr_schedule"])
        report = services.train_bridge(base, req, cfg, out, on_event=on_event, cancel=cancel,
                                       runner=zerogpu.runner())
        if report.paths:
            library.add("bridge", f"{name} ({mode}, {time.strftime('%H:%M')})", report.paths[0])
        return report.paths

    return start


# --- ControlNet units ---------------------------------------------------------------------------------------------

def sketch_image(sketch):
    """A Sketchpad value (Gradio's editor dict, or an image) as one RGB image; None when nothing was drawn."""
    if isinstance(sketch, dict):
        sketch = sketch.get("composite")
    if sketch is None:
        return None
    return open_image(sketch, "the scribble")  # drawn strokes on a transparent canvas come out on white


def condition_map(source: str, image, sketch, low, high, resize: str, width: int, height: int):
    """The map a ControlNet unit feeds: extracted from a picture, the picture as-is, or a scribble."""
    if source == "scribble":
        image = sketch_image(sketch)
        if image is None:
            raise HyperrealError("Draw a scribble first (or choose another 'Map from').")
        return services.condition_map("uploaded", image, width, height, resize)
    if image is None:
        raise HyperrealError("Upload a picture for the ControlNet unit first (or switch the unit off).")
    image = open_image(image, "the uploaded picture")
    params = {"low": int(low), "high": int(high)} if source == "canny" else {}
    return services.condition_map(source, image, width, height, resize, **params)


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
