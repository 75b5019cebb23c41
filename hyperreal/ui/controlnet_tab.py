"""The ControlNet tab: condition maps (edges, soft edges, pose, uploaded, drawn) with preview; train a ControlNet."""
from __future__ import annotations

from typing import Callable

import gradio as gr

from .components import CheckedImage, CheckedSketchpad
from .train_panel import build_train_panel

UNITS = 2
WHAT = """**Frozen:** the whole base model. **Learns:** a trainable copy of the UNet's encoder joined to the frozen
UNet by convolutions initialised to zero — so a new ControlNet adds exactly nothing and the output is the base's
until training teaches it to follow the map. The loss is measured through the frozen UNet."""
SOURCES = [("Canny edges of the picture", "canny"), ("Soft edges (HED/PiDiNet, or a labelled Sobel fallback)",
                                                     "softedge"),
           ("Body pose (OpenPose skeleton)", "pose"), ("The picture is already a map (as-is)", "uploaded"),
           ("Draw a scribble below", "scribble")]
RESIZE = ["just resize", "crop and resize", "resize and fill"]
HELP = """Each unit conditions Generate on one map: **weight** 0–2 is how strongly the map steers (0 = off),
**start/end** the fraction of the denoising steps it acts on (end early to let the prompt finish details),
**guess mode** lets the ControlNet work without the prompt's help. Black means "no condition here"."""


def build_controlnet_tab(choices: Callable[[], list], preview: Callable, start_training: Callable | None,
                         train_knobs: Callable[[], dict] | None, default_caption: str,
                         memory: Callable[[str], dict] | None = None) -> dict:
    """``preview(source, image, sketch, low, high, resize, width, height) -> (map, note, map file)``."""
    units = []
    with gr.Tab("ControlNet", id="controlnet"):
        gr.Markdown(WHAT)
        with gr.Group():
            gr.Markdown("### Use\n" + HELP)
            guess = gr.Checkbox(label="Guess mode (no prompt needed; weights taper from deep to shallow layers)",
                                value=False)
            for i in range(UNITS):
                with gr.Accordion(f"ControlNet unit {i + 1}", open=i == 0):
                    with gr.Row():
                        on = gr.Checkbox(label="on", value=False, scale=0, min_width=60)
                        model = gr.Dropdown(choices=choices(), value=(choices() or [("", "")])[0][1],
                                            label="ControlNet", allow_custom_value=True, scale=3)
                        source = gr.Dropdown(SOURCES, value="canny", label="Map from", scale=3)
                    with gr.Row():
                        # file paths, checked by our own loader first: it names a bad file (Gradio's would not)
                        image = CheckedImage(label="Picture or map", type="filepath", height=220,
                                         sources=["upload", "clipboard"])
                        sketch = CheckedSketchpad(label="Scribble (dark lines; flipped to white-on-black)", type="filepath",
                                              height=220, canvas_size=(256, 256),
                                              brush=gr.Brush(colors=["#000000"], default_size=3, color_mode="fixed"))
                        shown = gr.Image(label="Map preview (what the ControlNet sees)", type="pil", height=220,
                                         interactive=False)
                    note = gr.Markdown("")
                    with gr.Row():
                        low = gr.Slider(0, 255, value=100, step=1, label="Canny low")
                        high = gr.Slider(0, 255, value=200, step=1, label="Canny high")
                        resize = gr.Radio(RESIZE, value="just resize", label="Resize mode")
                    with gr.Row():
                        weight = gr.Slider(0, 2, value=1.0, step=0.05, label="Weight")
                        start = gr.Slider(0, 1, value=0.0, step=0.05, label="Start")
                        end = gr.Slider(0, 1, value=1.0, step=0.05, label="End")
                        show = gr.Button("Preview map", size="sm")
                made = gr.State(None)  # the previewed map's file: what Generate feeds this unit
                units.append({"components": [on, model, weight, start, end, made], "preview": show, "shown": shown,
                              "note": note, "sources": [source, image, sketch, low, high, resize], "made": made})
            refresh = gr.Button("↻ Refresh the list", size="sm")
        refresh.click(lambda: [gr.Dropdown(choices=choices()) for _ in range(UNITS)], None,
                      [u["components"][1] for u in units], api_name="controlnet_refresh", queue=False)
        size_inputs: list = []  # Generate's width/height, wired by the app (the preview is made at that size)
        panel = None
        if start_training is not None:
            panel = build_train_panel("controlnet", train_knobs, start_training, default_caption, memory=memory)
            panel["done"].then(lambda: [gr.Dropdown(choices=choices()) for _ in range(UNITS)], None,
                               [u["components"][1] for u in units], api_name="controlnet_refresh_after_training",
                               queue=False)

    def wire_preview(width, height) -> None:
        """The map is made (and shown) whenever its inputs change, at Generate's size."""
        for i, u in enumerate(units):
            source, image, sketch, low, high, resize = u["sources"]
            gr.on([u["preview"].click, image.change, sketch.change, source.change, low.release, high.release,
                   resize.change], preview, [source, image, sketch, low, high, resize, width, height],
                  [u["shown"], u["note"], u["made"]], api_name=f"controlnet_preview_{i + 1}")

    inputs = [guess] + [c for u in units for c in u["components"]]
    return {"units": units, "guess": guess, "inputs": inputs, "wire_preview": wire_preview, "panel": panel,
            "size_inputs": size_inputs}


def controlnet_train_knobs(defaults: dict) -> dict:
    """The ControlNet Train panel's knobs; ``defaults`` holds steps, batch_size and lr for this base."""
    with gr.Row():
        extractor = gr.Dropdown([("Canny edges", "canny"), ("Soft edges", "softedge"), ("Body pose", "pose")],
                                value="canny", label="Condition maps from the images")
        low = gr.Slider(0, 255, value=100, step=1, label="Canny low")
        high = gr.Slider(0, 255, value=200, step=1, label="Canny high")
        name = gr.Textbox(label="Name", value="my_controlnet")
    with gr.Row():
        steps = gr.Slider(10, 5000, value=defaults["steps"], step=10, label="Steps", elem_id="controlnet-steps")
        batch = gr.Slider(1, 64, value=defaults["batch_size"], step=1, label="Batch size")
        lr = gr.Number(label="Learning rate", value=defaults["lr"])
        dropout = gr.Slider(0, 0.9, value=0.5, step=0.05, label="Caption dropout (paper: 0.5)")
        sample_every = gr.Slider(0, 1000, value=defaults.get("sample_every", 50), step=10,
                                 label="Samples every N steps (0: end only)")
    return {"extractor": extractor, "canny_low": low, "canny_high": high, "name": name, "steps": steps,
            "batch_size": batch, "lr": lr, "caption_dropout": dropout, "sample_every": sample_every}


def units_from_inputs(values: list) -> tuple[bool, list[dict]]:
    """(guess mode, the switched-on units as dicts) from the tab's input values."""
    guess, rest = bool(values[0]), values[1:]
    n = len(rest) // UNITS
    names = ["on", "model", "weight", "start", "end", "map"]
    units = [dict(zip(names, rest[i * n:(i + 1) * n]), unit=i + 1) for i in range(UNITS)]
    return guess, [u for u in units if u["on"]]
