"""The Encoder bridge tab: an extra pretrained text encoder joined by cross-attention; use one, or train one."""
from __future__ import annotations

from typing import Callable

import gradio as gr

from .train_panel import build_train_panel

WHAT = """**Frozen:** the whole base model *and* the extra encoder (BART on SD1.5; the multilingual Universal
Sentence Encoder on the tiny base). **Learns:** only the joint — in **fuse** mode new key/value projections in
every cross-attention layer (copies of the layer's own) behind gates that start at 0; in **swap** mode a small
bridge that corrects the base encoder's output from the extra encoder's reading, blended in by α. A fresh bridge
is exactly the original model; the new encoder brings the words and languages the base never learned (the tiny
bridge trained on English captions only, and reads Spanish, French, German, Russian and Chinese prompts)."""


def build_bridge_tab(choices: Callable[[], list], start_training: Callable | None,
                     train_knobs: Callable[[], dict] | None, default_caption: str,
                     memory: Callable[[str], dict] | None = None, examples: list[str] | None = None,
                     prompt=None) -> dict:
    """``examples``: prompts the default bridge reads and the base alone does not (other languages, other words);
    choosing one puts it in Generate's ``prompt`` and turns the bridge on."""
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
            if examples and prompt is not None and opts:
                gr.Examples(examples=[[e, True, opts[0][1]] for e in examples], inputs=[prompt, on, path],
                            label="Prompt in your language (or in words the base never learnt): pick one, then "
                                  "Generate", examples_per_page=12)
        refresh.click(lambda: gr.Dropdown(choices=choices()), None, path, api_name="bridge_refresh", queue=False)
        panel = None
        if start_training is not None:
            panel = build_train_panel("bridge", train_knobs, start_training, default_caption, data_optional=True,
                                      memory=memory)
            panel["done"].then(lambda: gr.Dropdown(choices=choices()), None, path,
                               api_name="bridge_refresh_after_training", queue=False)
    return {"inputs": [on, path, scale], "panel": panel}


def bridge_train_knobs(settings: Callable[[str], dict], shapes_world: bool) -> dict:
    """The bridge Train panel's knobs; ``settings(mode)`` is the base's recipe (steps, batch_size, lr,
    sample_every)."""
    swap = settings("swap")  # the default mode: it reads new words and keeps the base best (README: Encoder bridge)
    sources = [("The uploaded captioned images above", "uploaded"), ("Captions typed below (swap mode)", "captions")]
    if shapes_world:
        sources.insert(0, ("The shapes world's captions (tiny base)", "shapes"))
    with gr.Row():
        mode = gr.Radio([("fuse: gated cross-attention", "fuse"), ("swap: bridge into the base encoder's space",
                                                                       "swap")], value="swap", label="Mode")
        source = gr.Dropdown(sources, value=sources[0][1], label="Training data")
        encoder = gr.Textbox(label="Extra encoder (hub id or folder; empty: the base's default)", value="")
        name = gr.Textbox(label="Name", value="my_bridge")
    captions = gr.Textbox(label="Captions, one per line", lines=4, visible=False)
    with gr.Row():
        steps = gr.Slider(10, 5000, value=swap["steps"], step=10, label="Steps")
        batch = gr.Slider(1, 256, value=swap["batch_size"], step=1, label="Batch size")
        lr = gr.Number(label="Learning rate", value=swap["lr"])
        lora = gr.Slider(0, 64, value=0, step=1, label="LoRA rank on the extra encoder (0: off)")
        diffusion = gr.Slider(0, 2000, value=0, step=10, label="swap: diffusion-loss steps after distillation",
                              visible=True)
        sample_every = gr.Slider(0, 1000, value=swap["sample_every"], step=10,
                                 label="Samples every N steps (0: end only)")

    def mode_changed(m):
        d = settings(m)
        return d["steps"], d["batch_size"], d["lr"], gr.Slider(visible=m == "swap")

    mode.change(mode_changed, mode, [steps, batch, lr, diffusion], queue=False, api_name="bridge_mode_defaults")
    source.change(lambda s: gr.Textbox(visible=s == "captions"), source, captions, queue=False,
                  api_name="bridge_data_source")
    return {"mode": mode, "data_source": source, "encoder": encoder, "name": name, "captions": captions,
            "steps": steps, "batch_size": batch, "lr": lr, "lora_rank": lora, "diffusion_steps": diffusion,
            "sample_every": sample_every}
