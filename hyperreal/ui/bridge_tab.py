"""The Encoder bridge tab: an extra pretrained text encoder joined by cross-attention; use one, or train one."""
from __future__ import annotations

from typing import Callable

import gradio as gr

WHAT = """**Frozen:** the whole base model *and* the extra encoder (BART on SD1.5; MiniLM on the tiny base).
**Learns:** only the joint — in **fuse** mode new key/value projections in every cross-attention layer (copies
of the layer's own) behind gates that start at 0; in **swap** mode a small bridge that maps the extra encoder's
tokens into the base encoder's space, blended in by α. Gate 0 / α 0 is exactly the original model; the new
encoder brings the words and phrasings the base never learned."""


def build_bridge_tab(choices: Callable[[], list], start_training: Callable | None,
                     train_knobs: Callable[[], dict] | None, default_caption: str) -> dict:
    from .train_panel import build_train_panel

    with gr.Tab("Encoder bridge", id="bridge"):
        gr.Markdown(WHAT)
        with gr.Group():
            gr.Markdown("### Use\nWith a bridge on, every prompt in **Generate** is also read by the extra encoder.")
            with gr.Row():
                on = gr.Checkbox(label="on", value=False, scale=0, min_width=60)
                opts = choices()
                path = gr.Dropdown(choices=opts, value=opts[0][1] if opts else "", label="Bridge",
                                   allow_custom_value=True, scale=3)
                scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Scale (fuse: gates × scale; swap: α)", scale=2)
            refresh = gr.Button("↻ Refresh the list", size="sm")
        refresh.click(lambda: gr.Dropdown(choices=choices()), None, path, api_name="bridge_refresh", queue=False)
        panel = None
        if start_training is not None:
            panel = build_train_panel("bridge", train_knobs, start_training, default_caption)
            panel["done"].then(lambda: gr.Dropdown(choices=choices()), None, path,
                               api_name="bridge_refresh_after_training", queue=False)
    return {"inputs": [on, path, scale], "panel": panel}
