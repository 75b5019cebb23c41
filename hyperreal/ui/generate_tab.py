"""The Generate tab: prompt, negative prompt, seed, steps, guidance, size, count; a gallery of PNGs."""
from __future__ import annotations

import random
from typing import Callable

import gradio as gr
from PIL import Image

MAX_SEED = 2**32 - 1


def png_parameters(path: str) -> str:
    """The A1111 ``parameters`` text chunk of a PNG ('' when it has none)."""
    with Image.open(path) as im:
        return im.info.get("parameters", "")


def guidance_note(defaults: dict) -> str | None:
    """The guidance slider's note: where it moves when an adapter is switched on, for bases that say so."""
    with_adapter = defaults["adapter_guidance"]
    return None if with_adapter == defaults["guidance"] else f"moves to {with_adapter:g} when you switch an adapter on"


def build_generate_tab(generate: Callable, parse_parameters: Callable, defaults: dict, examples: list[str]) -> dict:
    """``generate(prompt, negative, seed, steps, guidance, width, height, count, *method_knobs) ->
    [(png_path, parameters)]``; ``parse_parameters(text) -> dict`` reads a parameters text back into form fields.
    Returns ``connect(extra_inputs, restore_extra)`` (called once the method tabs exist), ``width``, ``height``,
    ``steps``, ``guidance``."""
    with gr.Tab("Generate", id="generate"):
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=2, value=examples[0] if examples else "",
                                    elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1)
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=MAX_SEED)
                    dice = gr.Button("🎲 Random seed", size="sm", scale=0)
                    count = gr.Slider(1, 8, value=1, step=1, label="Images")
                with gr.Row():
                    steps = gr.Slider(1, 100, value=defaults["steps"], step=1, label="Steps")
                    guidance = gr.Slider(0, 20, value=defaults["guidance"], step=0.5, label="Guidance (CFG)",
                                         info=guidance_note(defaults), elem_id="guidance")
                with gr.Row():
                    width = gr.Slider(64, 1024, value=defaults["width"], step=8, label="Width")
                    height = gr.Slider(64, 1024, value=defaults["height"], step=8, label="Height")
                run = gr.Button("Generate", variant="primary", elem_id="generate-button")
                gr.Markdown("Everything switched on in the **Adapters**, **ControlNet** and **Encoder bridge** tabs "
                            "applies here, together. Trained results appear in those tabs' lists at once.")
                if examples:
                    gr.Examples(examples=[[e] for e in examples], inputs=[prompt], label="Try")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Results", columns=4, height="auto", format="png", elem_id="gallery",
                                     buttons=["download", "fullscreen"])
                info = gr.Textbox(label="Parameters of the selected image", lines=3, interactive=False)
                reuse = gr.Button("Use these settings", size="sm")

        dice.click(lambda: random.randint(0, MAX_SEED), outputs=seed, api_name="random_seed", queue=False)

        def _generate(prompt, negative_prompt, seed, steps, guidance, width, height, count, *method_knobs):
            results = generate(prompt, negative_prompt, int(seed), int(steps), float(guidance), int(width),
                               int(height), int(count), *method_knobs)
            gallery_items = [(str(path), f"seed {parse_parameters(params).get('seed', '')}") for path, params in results]
            return gallery_items, results[-1][1] if results else ""

        inputs = [prompt, negative, seed, steps, guidance, width, height, count]

        def _selected(evt: gr.SelectData):
            value = evt.value or {}
            path = value.get("image", {}).get("path") if isinstance(value, dict) else None
            return png_parameters(path) if path else ""

        gallery.select(_selected, None, info, api_name="show_parameters", queue=False)

        def connect(extra_inputs: list, restore_extra: Callable[[dict], list] | None = None) -> None:
            """Wire Generate once every tab exists: ``extra_inputs`` are the method tabs' knobs (appended to
            generate's arguments); ``restore_extra(parameters) -> values`` puts an image's method settings back."""
            ins = inputs + list(extra_inputs)
            # its own queue, so generation goes on while a training run holds the training queue; two workers, so a
            # job fetching files from the hub (outside the base's lock, with a deadline) holds up no other job
            for event, api in ((run.click, "generate"), (prompt.submit, "generate_on_enter")):
                event(_generate, ins, [gallery, info], api_name=api, concurrency_id="generate", concurrency_limit=2)

            def _reuse(text):
                d = parse_parameters(text or "")
                if not d:
                    raise gr.Error("Select an image in the gallery first.")
                base = (d.get("prompt", ""), d.get("negative_prompt", ""), d.get("seed", 0),
                        d.get("steps", defaults["steps"]), d.get("guidance", defaults["guidance"]),
                        d.get("width", defaults["width"]), d.get("height", defaults["height"]))
                return (*base, *(restore_extra(d) if restore_extra else [gr.update() for _ in extra_inputs]))

            reuse.click(_reuse, info, [prompt, negative, seed, steps, guidance, width, height, *extra_inputs],
                        api_name="reuse_settings", queue=False)

    return {"connect": connect, "width": width, "height": height, "steps": steps, "guidance": guidance,
            "prompt": prompt}
