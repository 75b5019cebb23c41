"""Assemble the Gradio app from the tabs and the services behind them."""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Callable

import gradio as gr

from ..errors import HyperrealError
from .. import services
from ..generation import (GenerationJob, adapters_on, default_guidance, generate_to_folder, guidance_on_switch,
                          job_from_dict, parse_parameters)
from ..loading import BaseModel
from ..settings import Settings
from ..zerogpu import on_gpu
from .actions import (adapter_trainer, bridge_trainer, condition_map, controlnet_job, controlnet_trainer,
                      sketch_image)
from .adapters_tab import SLOTS as ADAPTER_SLOTS
from .adapters_tab import adapters_from_inputs, build_adapters_tab, lr_note
from .bases import CurrentBase, build_base_picker
from .bridge_tab import bridge_train_knobs, build_bridge_tab
from .controlnet_tab import build_controlnet_tab, controlnet_train_knobs, units_from_inputs
from .generate_tab import build_generate_tab, guidance_note
from .library import Library, save_map
from .train_panel import follow_base

INTRO = """# hyperreal
Adapt a **frozen** text-to-image model without touching it. Base model: `{name}` — its weights never change here.
"""


def user_errors(fn):
    """Problems a person can fix reach the page as a message, not a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HyperrealError as e:
            raise gr.Error(str(e)) from e
    return wrapper


@dataclass
class MethodInputs:
    """A method tab's knobs as Generate sees them: the components, how their values become the job's method
    key, and how an image's parameters put them back."""

    key: str
    components: list
    to_job: Callable[[list, int, int], object]  # (values, width, height) -> the job key's value (None: off)
    restore: Callable[[dict], list]  # parsed parameters -> values (gr.update() to leave one alone)


def build_app(base: BaseModel, settings: Settings) -> gr.Blocks:
    # the base can be switched from the page: everything below reads current.base when it runs
    current = CurrentBase(base, settings)
    library = Library(settings, base.name)
    current.listeners.append(lambda new: setattr(library, "base_name", new.name))
    methods: list[MethodInputs] = []

    @user_errors
    @on_gpu(duration=120)
    def generate(prompt, negative, seed, steps, guidance, width, height, count, *extra):
        job = GenerationJob(prompt=prompt, seed=seed, negative_prompt=negative or "", steps=steps,
                            guidance=guidance, width=width, height=height)
        i = 0
        for m in methods:
            value = m.to_job(list(extra[i:i + len(m.components)]), int(width), int(height))
            i += len(m.components)
            if value:
                setattr(job, m.key, value)
        # a method value goes through the same checks as a jobs file
        job = job_from_dict({k: v for k, v in asdict(job).items() if v is not None}, "Generate")
        # while a training run has the base's pipe, a second copy serves generation (BaseModel.for_generation)
        return generate_to_folder(current.base.for_generation(), job, count, settings.outputs)

    def adapters_job(values, width, height):
        items = adapters_from_inputs(values)
        return [{**it, "path": library.check_source(it["path"], "adapter")} for it in items] or None

    def adapters_restore(d):
        items = d.get("adapters") or []
        out = []
        for i in range(ADAPTER_SLOTS):
            it = items[i] if i < len(items) else None
            out += [bool(it), it["path"] if it else "", it["weight"] if it else 1.0]
        return out

    def controlnet_choices():  # the base's own hub ControlNets (its defaults) after the library's
        return library.choices("controlnet") + [(f"{h} (hub)", h) for h in current.base.defaults["controlnets"]]

    def controlnet_to_job(values, width, height):
        guess, units = units_from_inputs(values)
        return controlnet_job(library, guess, units)

    def bridge_to_job(values, width, height):
        on, path, scale = values
        return {"path": library.check_source(path, "bridge"), "scale": float(scale)} if on and path else None

    def bridge_restore(d):
        b = d.get("bridge")
        return [True, b["path"], b.get("scale", 1.0)] if b else [False, gr.update(), gr.update()]

    def keep(n):
        return lambda d: [gr.update() for _ in range(n)]

    @user_errors
    def preview(source, image, sketch, low, high, resize, width, height):
        if image is None and source != "scribble" or source == "scribble" and sketch_image(sketch) is None:
            return None, "", None  # nothing to map yet
        res = condition_map(source, image, sketch, low, high, resize, int(width), int(height))
        return res.image, f"*{res.note}* (`{res.extractor}`)", save_map(settings, res.image)

    examples, caption = base.defaults["examples"], base.defaults["example_caption"]

    def recipe(method):  # the base's recipe for a method variant, fitted to this machine's card (or a VRAM preset)
        return lambda variant, vram="auto": services.train_settings(current.base, method, variant, vram)

    def memory(method):  # what a VRAM preset sets in the Train panel
        return lambda vram: services.train_settings(current.base, method, None, vram)
    with gr.Blocks(title="hyperreal") as demo:
        intro = gr.Markdown(INTRO.format(name=base.name))
        picker = build_base_picker(current)
        with gr.Tabs():
            gen_tab = build_generate_tab(generate, parse_parameters, base.defaults, examples)
            ad = build_adapters_tab(lambda: library.choices("adapter"), adapter_trainer(current, library), caption,
                                    recipe("adapter"), memory("adapter"))
            methods.append(MethodInputs("adapters", ad["inputs"], adapters_job, adapters_restore))
            cn = build_controlnet_tab(controlnet_choices, preview, controlnet_trainer(current, library),
                                      lambda: controlnet_train_knobs(recipe("controlnet")(None)), caption,
                                      memory("controlnet"))
            methods.append(MethodInputs("controlnet", cn["inputs"], controlnet_to_job, keep(len(cn["inputs"]))))
            br = build_bridge_tab(lambda: library.choices("bridge"), bridge_trainer(current, library),
                                  lambda: bridge_train_knobs(recipe("bridge"), base.defaults["world"] == "shapes"),
                                  caption, memory("bridge"), services.bridge_examples(base.name), gen_tab["prompt"])
            methods.append(MethodInputs("bridge", br["inputs"], bridge_to_job, bridge_restore))
        # switching an adapter on moves Generate's guidance to the base's guidance for adapters, unless the person
        # changed it (a person's own clicks only: restoring an image's settings keeps its guidance)
        gr.on([c.input for slot in ad["slots"] for c in slot],
              lambda *v: guidance_on_switch(current.base.defaults, adapters_on(adapters_from_inputs(list(v[:-1]))),
                                            v[-1]),
              [*ad["inputs"], gen_tab["guidance"]], gen_tab["guidance"], api_name="guidance_for_adapters",
              queue=False)
        cn["wire_preview"](gen_tab["width"], gen_tab["height"])
        gen_tab["connect"]([c for m in methods for c in m.components],
                           lambda d: [v for m in methods for v in m.restore(d)])
        # after a switch: the page names the new base and Generate starts from its defaults
        switched = picker["connect"]([intro, *(gen_tab[k] for k in ("steps", "guidance", "width", "height"))],
                                     lambda new: [INTRO.format(name=new.name), *(new.defaults[k] for k in
                                                                                  ("steps", "guidance", "width",
                                                                                   "height"))])
        # then, with an adapter on, the new base's guidance for adapters, and the slider's note for the new base
        # (a private step: what /switch_base returns to an API client stays the base's own guidance)
        switched.success(lambda *v: gr.update(
            value=default_guidance(current.base.defaults, adapters_on(adapters_from_inputs(list(v)))),
            info=guidance_note(current.base.defaults)), ad["inputs"], gen_tab["guidance"], queue=False,
            api_visibility="private")
        # and each Train panel starts from the new base's recipe (steps, batch, learning rate, prior...)
        for method, panel, variant in (("adapter", ad["panel"], "kind"), ("controlnet", cn["panel"], None),
                                       ("bridge", br["panel"], "mode")):
            follow_base(switched, panel, recipe(method), variant, lr_note if method == "adapter" else None)
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(demo: gr.Blocks, settings: Settings, **kwargs):
    settings.outputs.mkdir(parents=True, exist_ok=True)
    return demo.launch(server_name=settings.host, server_port=settings.port, share=settings.share,
                       allowed_paths=[str(settings.outputs)], max_file_size=settings.max_file_size,
                       theme=gr.themes.Soft(), **kwargs)
