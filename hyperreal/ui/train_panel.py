"""The Train panel every method tab shares: data in, captions table, knobs, Start/Stop, live progress.

A method gives it ``start(data_dir, knobs: {name: value}, on_event, cancel) -> [artifact paths]`` and a function
that builds its knobs (``{name: component}``); the panel streams step/ETA, a loss plot, fixed-seed validation
images and the files.
"""
from __future__ import annotations

import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

import gradio as gr
import pandas as pd

from ..datasets import IMAGE_SUFFIXES, load_examples, read_text, write_examples
from ..errors import HyperrealError
from ..images import open_image
from ..safety import component, sanitized, unzip, within
from ..jobs import TrainingJob


def _fmt_eta(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def status_line(ev) -> str:
    """One line for the panel's status from a training event."""
    where = f"Step {ev.step}/{ev.total}"
    if ev.kind == "step":
        return f"{where} · loss {ev.loss:.4f} · ETA {_fmt_eta(ev.eta_s)}"
    return {"start": f"Started: {ev.message}", "validation": f"{where} · new samples",
            "checkpoint": f"{where} · {ev.message}", "done": f"Done: {ev.message}",
            "cancelled": f"Stopped: {ev.message}"}.get(ev.kind, ev.message)


def collect_uploads(files: list[str] | None, default_caption: str, workdir: Path) -> list[list[str]]:
    """Uploaded images (with NAME.txt captions among them) or a zip of a captioned folder, copied into this
    session's folder -> [[file name, caption]]. The table only ever names files in that folder."""
    if not files:
        return []
    uploads = workdir / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    files = [Path(f) for f in files]
    texts = {f.stem: f for f in files if f.suffix.lower() == ".txt"}
    unpacked = workdir / f"zip-{uuid.uuid4().hex[:8]}"
    try:
        found: list[tuple[Path, str]] = []
        for f in files:
            if f.suffix.lower() == ".zip":
                found += [(Path(e.image), e.text) for e in load_examples(unzip(f, unpacked / f.stem))]
            elif f.suffix.lower() in IMAGE_SUFFIXES:
                caption = read_text(texts[f.stem], texts[f.stem].name).strip() if f.stem in texts else default_caption
                found.append((f, caption))
        if not found:
            raise HyperrealError("No images in the upload: add .png/.jpg/.webp files (with NAME.txt captions if "
                                 "you have them) or one .zip of a captioned folder.")
        rows = []
        for src, caption in found:
            image = open_image(src)  # a damaged or oversized file is named now, not when training starts
            name = f"{uuid.uuid4().hex[:6]}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', src.stem)[-56:]}.png"
            image.save(uploads / name)
            rows.append([name, caption])
        return rows
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)  # what was unpacked is copied; nothing else stays


def table_rows(table) -> pd.DataFrame:
    """The table's rows that name an image (a Dataframe, or the dict a client sends)."""
    if isinstance(table, dict):
        table = pd.DataFrame(table.get("data") or [], columns=table.get("headers") or ["image", "caption"])
    df = table if isinstance(table, pd.DataFrame) else pd.DataFrame(table or [], columns=["image", "caption"])
    df = df.dropna(how="all")
    return df[[bool(str(v if v is not None else "").strip()) for v in df.iloc[:, 0]]] if not df.empty else df


def dataset_from_table(table, workdir: Path) -> Path:
    """The captions as edited in the table, written as an imagefolder the trainers read."""
    df = table_rows(table)
    if df.empty:
        raise HyperrealError("Add training images first (upload them above).")
    blank = [str(p) for p, c in zip(df.iloc[:, 0], df.iloc[:, 1]) if not str(c or "").strip()]
    if blank:
        raise HyperrealError(f"Every image needs a caption; empty for: {', '.join(blank[:5])}")
    uploads = workdir / "uploads"
    items = []
    for name, c in zip(df.iloc[:, 0], df.iloc[:, 1]):
        name = str(name).strip()
        # only files this session uploaded: no folders, no paths elsewhere on the server
        try:
            path = within(uploads / component(name, "image"), uploads)
        except HyperrealError:
            path = None
        if path is None or not path.is_file():
            raise HyperrealError(f"'{name}' is not one of the uploaded images; upload it again.")
        items.append((open_image(path), str(c).strip()))
    folder = workdir / f"dataset-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    return write_examples(folder, items)


VRAM_CHOICES = [("auto (this machine's card)", "auto"), ("8 GB", "8"), ("12 GB", "12"), ("16 GB", "16"),
                ("24 GB or more", "24")]


def memory_knobs(knobs: dict, memory: Callable[[str], dict], api: str) -> dict:
    """The VRAM preset and what it sets: gradient checkpointing, 8-bit Adam and the batch size's cap."""
    start = memory("auto")
    with gr.Accordion("Memory (GPU)", open=False):
        with gr.Row():
            vram = gr.Dropdown(VRAM_CHOICES, value="auto", label="VRAM preset",
                               info="sets the two below and caps the batch size; an out-of-memory error names "
                                    "the preset to pick")
            checkpointing = gr.Checkbox(value=start["gradient_checkpointing"],
                                        label="Gradient checkpointing (less memory, slower)")
            adam8 = gr.Checkbox(value=start["use_8bit_adam"], label="8-bit Adam (bitsandbytes, CUDA)")
    outputs = [checkpointing, adam8] + ([knobs["batch_size"]] if "batch_size" in knobs else [])

    def chosen(v):
        m = memory(v)
        return [m["gradient_checkpointing"], m["use_8bit_adam"]] + ([m["batch_size"]] if len(outputs) > 2 else [])

    vram.change(chosen, vram, outputs, queue=False, api_name=f"{api}_vram_preset")
    return {"vram": vram, "gradient_checkpointing": checkpointing, "use_8bit_adam": adam8}


def build_train_panel(method: str, build_knobs: Callable[[], dict], start: Callable, default_caption: str,
                      api_prefix: str = "", data_optional: bool = False,
                      memory: Callable[[str], dict] | None = None) -> dict:
    """Builds the panel inside the current tab; returns its components (for tests and wiring). ``memory(vram)``
    gives the VRAM preset's settings (services.train_settings); with it the panel has a Memory row."""
    api = api_prefix or method.lower().replace(" ", "_")
    workroot = Path(tempfile.mkdtemp(prefix=f"hyperreal-{api}-"))

    def session_dir(request: gr.Request | None) -> Path:
        # uploads stay in a per-session folder
        return workroot / sanitized(request.session_hash if request else None)

    with gr.Group():
        gr.Markdown("### Train\nUpload images (with `NAME.txt` captions, or one `.zip` of a captioned folder), "
                    "check the captions, set the knobs and start. Progress, the loss and fixed-seed samples "
                    "stream below; **Stop** keeps what was learnt so far.")
        with gr.Row():
            files = gr.File(label="Training images / zip", file_count="multiple",
                            file_types=["image", ".txt", ".zip"], scale=2)
            default = gr.Textbox(label="Caption for images without one", value=default_caption, scale=1)
        table = gr.Dataframe(headers=["image", "caption"], datatype=["str", "str"], interactive=True,
                             label="Captions (editable)", column_count=2, wrap=True)
        knobs = build_knobs()
        if memory is not None:
            knobs.update(memory_knobs(knobs, memory, api))
        names = list(knobs)
        with gr.Row():
            go = gr.Button(f"Train {method}", variant="primary")
            stop = gr.Button("Stop", variant="stop")
        status = gr.Markdown("")
        with gr.Row():
            loss_plot = gr.LinePlot(x="step", y="loss", title="Training loss", height=250)
            samples = gr.Gallery(label="Validation samples (fixed seeds)", columns=4, height=250, format="png")
        out_files = gr.File(label="Trained files", file_count="multiple", interactive=False)
        job_state = gr.State(None)

    def load(fs, cap, request: gr.Request):
        try:
            rows = collect_uploads(fs, cap, session_dir(request))
        except HyperrealError as e:
            raise gr.Error(str(e)) from e
        return pd.DataFrame(rows, columns=["image", "caption"])

    files.upload(load, [files, default], table, api_name=f"{api}_load_data")

    def run(request: gr.Request, tab, *values):  # the request first: Gradio places it by position
        try:
            empty = table_rows(tab).empty
            data = None if data_optional and empty else dataset_from_table(tab, session_dir(request))
            kv = dict(zip(names, values))
            job = TrainingJob(lambda on_event, cancel: start(data, kv, on_event, cancel))
        except HyperrealError as e:
            raise gr.Error(str(e)) from e
        yield job, "Starting…", None, [], None
        points: list[dict] = []
        shots: list = []
        notes: list[str] = []  # what the method measured after the loop (e.g. drift)
        try:
            for ev in job.events():
                if ev.loss is not None and ev.kind == "step":
                    points.append({"step": ev.step, "loss": ev.loss})
                if ev.images:
                    shots = [(im, f"step {ev.step}: {c}") for im, c in zip(ev.images, ev.captions)]
                if ev.kind == "info":
                    notes.append(ev.message)
                line = status_line(ev)
                yield job, line, pd.DataFrame(points or [{"step": 0, "loss": None}]), shots, None
        except HyperrealError as e:
            raise gr.Error(str(e)) from e
        finally:
            if job.running:  # the watcher went away (client cancelled): stop the worker too
                job.cancel()
        paths = [str(p) for p in job.artifacts if Path(p).is_file()]
        final = "Stopped early; the files below hold what was learnt." if job.cancel_token.cancelled else "Finished."
        yield job, " ".join([final, *notes, "The result is now selectable in Generate."]), \
            pd.DataFrame(points or [{"step": 0, "loss": None}]), shots, paths

    def halt(job):
        if job is not None and job.running:
            job.cancel()
            return "Stopping at the next step (a checkpoint is kept)…"
        return "No training is running."

    done = go.click(run, [table, *knobs.values()], [job_state, status, loss_plot, samples, out_files],
                    api_name=f"train_{api}", concurrency_id="train")
    stop.click(halt, job_state, status, api_name=f"stop_{api}", queue=False)
    return {"files": files, "table": table, "knobs": knobs, "status": status, "loss": loss_plot, "done": done,
            "samples": samples, "out_files": out_files, "workroot": workroot}


# the knobs whose starting values are the base's recipe (services.train_settings)
RECIPE_KNOBS = ("steps", "batch_size", "lr", "sample_every", "class_images", "prior_weight")


def follow_base(switched, panel: dict | None, recipe: Callable[[str | None, str], dict], variant: str | None = None,
                lr_info: Callable[[dict], str | None] | None = None) -> None:
    """After a base switch (the ``switched`` event), the panel's recipe knobs start from the new base's recipe,
    for the variant its ``variant`` knob names (the adapter kind, the bridge mode) and its VRAM preset:
    ``recipe(variant, vram)``. A private step, like the one that follows the switch in Generate."""
    if panel is None:
        return
    knobs = panel["knobs"]
    names = [n for n in RECIPE_KNOBS if n in knobs]
    inputs = ([knobs[variant]] if variant else []) + ([knobs["vram"]] if "vram" in knobs else [])

    def values(*v):
        rec = recipe(v[0] if variant else None, v[-1] if "vram" in knobs else "auto")
        return [gr.update(value=rec[n], **({"info": lr_info(rec)} if n == "lr" and lr_info else {})) for n in names]

    switched.success(values, inputs, [knobs[n] for n in names], queue=False, api_visibility="private")


def cleanup(panel: dict) -> None:
    shutil.rmtree(panel["workroot"], ignore_errors=True)
