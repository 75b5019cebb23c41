"""Assemble the Gradio app from the tabs and the services behind them."""
from __future__ import annotations

import functools

import gradio as gr

from ..errors import HyperrealError
from ..generation import GenerationJob, generate_to_folder, parse_parameters
from ..loading import BaseModel
from ..settings import Settings
from .generate_tab import build_generate_tab

INTRO = """# hyperreal
Adapt a **frozen** text-to-image model without touching it. Base model: `{name}` — its weights never change here.
"""
TINY_EXAMPLES = ["a red circle", "a blue square on the left",
                 "a green triangle at the top and a yellow circle at the bottom",
                 "an orange square on the left and a purple circle on the right"]


def user_errors(fn):
    """Problems a person can fix reach the page as a message, not a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HyperrealError as e:
            raise gr.Error(str(e)) from e
    return wrapper


def build_app(base: BaseModel, settings: Settings) -> gr.Blocks:
    @user_errors
    def generate(prompt, negative, seed, steps, guidance, width, height, count):
        job = GenerationJob(prompt=prompt, seed=seed, negative_prompt=negative or "", steps=steps,
                            guidance=guidance, width=width, height=height)
        return generate_to_folder(base, job, count, settings.outputs)

    examples = TINY_EXAMPLES if base.name == "tiny" else ["a photo of an astronaut riding a horse on mars"]
    with gr.Blocks(title="hyperreal") as demo:
        gr.Markdown(INTRO.format(name=base.name))
        with gr.Tabs():
            build_generate_tab(generate, parse_parameters, base.defaults, examples)
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(demo: gr.Blocks, settings: Settings, **kwargs):
    settings.outputs.mkdir(parents=True, exist_ok=True)
    return demo.launch(server_name=settings.host, server_port=settings.port, share=settings.share,
                       allowed_paths=[str(settings.outputs)], max_file_size=settings.max_file_size,
                       theme=gr.themes.Soft(), **kwargs)
