"""The Adapters tab: pick adapters and their weights for Generate; train a new one (LoRA, DoRA, LoHa, LoKr, OFT)."""
from __future__ import annotations

from typing import Callable

import gradio as gr

from ..methods.adapters import DEFAULT_RANK
from .train_panel import build_train_panel

SLOTS = 3
WHAT = """**Frozen:** the whole base model (UNet, VAE, text encoder). **Learns:** small modules added beside its
layers — LoRA, DoRA, LoHa, LoKr or OFT through PEFT — a few hundred thousand numbers instead of millions, plus one
token for a trigger word the tokenizer does not know as a word. For prompts without the trigger an adapter starts
as an exact no-op, so training begins from the base's behaviour. After training, *drift* measures how far images
for prompts **without** your trigger moved from the base: the knowledge you wanted to keep."""
KINDS = [("LoRA", "lora"), ("DoRA", "dora"), ("LoHa", "loha"), ("LoKr", "lokr"), ("OFT", "oft"),
         ("Full UNet fine-tune (comparison; not an adapter)", "full")]
PLACEMENTS = [("cross-attention keys/values only (Custom Diffusion)", "cross-attention"),
              ("attention (to_q, to_k, to_v, to_out.0)", "attention"),
              ("attention + projections + feed-forward (kohya's default)", "attention+ff"),
              ("all of the above + ResNet convolutions", "all")]


def effective_scale(kind: str, rank: float, alpha: float | None, preset: str, rslora: bool, lr: float | None,
                    default_lr: float) -> str:
    """The factor the update is multiplied by, shown next to the learning rate (tools differ here)."""
    if kind == "oft":
        return "OFT is a rotation: no alpha/rank scale."
    if kind == "full":
        return f"Full fine-tune: every UNet weight learns (lr default {default_lr:g})."
    rank = max(int(rank or 1), 1)
    a = float(alpha) if alpha else (1.0 if preset == "kohya-like" else float(rank))
    scale = a / (rank ** 0.5 if rslora else rank)
    how = "alpha/√rank (rsLoRA)" if rslora else "alpha/rank"
    return (f"Effective scale **{scale:.4g}** = {how} with alpha {a:g}, rank {rank}; learning rate "
            f"{lr or default_lr:g}. kohya-like (alpha 1) needs a higher lr than diffusers-like (alpha = rank).")


def lr_note(recipe: dict) -> str | None:
    """The learning rate's note: with a decaying schedule the number is its peak."""
    if recipe["lr_schedule"] == "constant":
        return None
    return f"the peak: it decays ({recipe['lr_schedule']}) to 0 by the last step"


def build_adapters_tab(choices: Callable[[], list], start_training: Callable, default_caption: str,
                       settings: Callable[[str], dict], memory: Callable[[str], dict] | None = None) -> dict:
    """``choices() -> [(label, value)]`` lists adapters; ``start_training`` is the Train panel's start;
    ``settings(kind)`` is the base's recipe for a kind (steps, batch_size, lr, prior_weight, class_images,
    sample_every); ``memory(vram)`` the VRAM preset's settings."""
    start = settings("lora")
    slots = []
    with gr.Tab("Adapters", id="adapters"):
        gr.Markdown(WHAT)
        with gr.Group():
            gr.Markdown("### Use\nThe adapters switched on here apply to every image made in **Generate**, each "
                        "at its weight (0 = off, negative = the opposite). Pick a trained or embedded adapter, or "
                        "type a hub id or a file under the models folder (kohya or diffusers LoRA keys).")
            for i in range(SLOTS):
                with gr.Row():
                    on = gr.Checkbox(label="on", value=False, scale=0, min_width=60, elem_id=f"adapter-on-{i}")
                    path = gr.Dropdown(choices=choices(), label=f"Adapter {i + 1}", allow_custom_value=True,
                                       value="", scale=3, elem_id=f"adapter-path-{i}")
                    weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="weight", scale=2)
                slots.append((on, path, weight))
            refresh = gr.Button("↻ Refresh the list", size="sm")
        refresh.click(lambda: [gr.Dropdown(choices=choices()) for _ in range(SLOTS)], None,
                      [p for _, p, _ in slots], api_name="adapters_refresh", queue=False)

        def knobs() -> dict:
            with gr.Row():
                kind = gr.Dropdown(KINDS, value="lora", label="Kind")
                placement = gr.Dropdown(PLACEMENTS, value="attention+ff", label="Placement (UNet)")
                name = gr.Textbox(label="Name", value="my_adapter")
            with gr.Row():
                rank = gr.Slider(1, 64, value=DEFAULT_RANK, step=1, label="Rank (OFT: block size)")
                preset = gr.Radio(["diffusers-like", "kohya-like"], value="diffusers-like", label="Alpha preset")
                alpha = gr.Number(label="Alpha (empty: from preset)", value=None)
                rslora = gr.Checkbox(label="rsLoRA (alpha/√rank)")
            with gr.Row():
                steps = gr.Slider(10, 5000, value=start["steps"], step=10, label="Steps", elem_id="adapter-steps")
                batch = gr.Slider(1, 32, value=start["batch_size"], step=1, label="Batch size")
                lr = gr.Number(label="Learning rate", value=start["lr"], info=lr_note(start), elem_id="adapter-lr")
                sample_every = gr.Slider(0, 500, value=start["sample_every"], step=10,
                                         label="Samples every N steps (0: end only)")
            scale = gr.Markdown(effective_scale("lora", DEFAULT_RANK, None, "diffusers-like", False, start["lr"],
                                                start["lr"]))
            with gr.Row():
                trigger = gr.Textbox(label="Trigger phrase (added to captions lacking it)", value="",
                                     placeholder="empty: the word all your captions share that the base does not "
                                                 "know (e.g. sks)")
                repeats = gr.Slider(0, 20, value=0, step=1, label="Repeats (0: as many instance as class images)")
                flip = gr.Checkbox(label="Horizontal flips")
                dropout = gr.Slider(0, 0.5, value=0.0, step=0.05, label="Caption dropout")
            with gr.Accordion("Prior preservation and text encoder", open=False):
                gr.Markdown("The frozen base draws class images; training holds the adapted model to the base's "
                            "own predictions on them, so what the base knew stays (lower drift).")
                with gr.Row():
                    class_prompt = gr.Textbox(label="Class prompt(s), separated by |",
                                              placeholder="empty: prompts the base draws well (else your "
                                                          "captions without the trigger)", value="")
                    # prior preservation is on by default here: keeping the base's knowledge is the point
                    class_images = gr.Slider(0, 200, value=start["class_images"], step=1,
                                             label="Class images from the base (0: off)")
                    prior_weight = gr.Number(label="Prior-loss weight", value=start["prior_weight"], minimum=0,
                                             elem_id="adapter-prior-weight")
                with gr.Row():
                    train_te = gr.Dropdown(
                        ["auto", "on", "off"], value="auto", label="LoRA on the text encoder (not with full)",
                        info="auto: only when no trigger token is trained (the token teaches the text side and "
                             "keeps other prompts exactly as the base encodes them)")
                    te_lr = gr.Number(label="Text-side learning rate: its LoRA and the token (empty: same)", value=None)
                    trigger_token = gr.Checkbox(
                        value=True, label="New token for a trigger word the tokenizer splits (pivotal tuning)",
                        info="Its embedding trains with the adapter and is saved in the file; prompts without the "
                             "trigger are encoded exactly as by the base")
            gr.on([c.change for c in (kind, rank, alpha, preset, rslora, lr)],
                  lambda k, r, a, p, rs, lr_: effective_scale(k, r, a, p, rs, lr_, settings(k)["lr"]),
                  [kind, rank, alpha, preset, rslora, lr], scale, queue=False, api_name="adapter_effective_scale")
            kind.change(lambda k: (settings(k)["lr"], "auto" if k != "full" else "off"), kind, [lr, train_te],
                        queue=False, api_name="adapter_kind_defaults")
            return {"kind": kind, "placement": placement, "name": name, "rank": rank, "preset": preset,
                    "alpha": alpha, "rslora": rslora, "steps": steps, "batch_size": batch, "lr": lr,
                    "sample_every": sample_every, "trigger": trigger, "repeats": repeats, "flip": flip,
                    "caption_dropout": dropout, "class_prompt": class_prompt, "class_images": class_images,
                    "train_text_encoder": train_te, "text_encoder_lr": te_lr, "prior_weight": prior_weight,
                    "trigger_token": trigger_token}

        panel = build_train_panel("adapter", knobs, start_training, default_caption, memory=memory)
        # a finished run appears in the slots' lists at once
        panel["done"].then(lambda: [gr.Dropdown(choices=choices()) for _ in range(SLOTS)], None,
                           [p for _, p, _ in slots], api_name="adapters_refresh_after_training", queue=False)
    return {"slots": slots, "inputs": [c for slot in slots for c in slot], "panel": panel}


def adapters_from_inputs(values: list) -> list[dict]:
    """The slots' (on, path, weight) values -> a job's ``adapters`` list."""
    out = []
    for i in range(0, len(values), 3):
        on, path, weight = values[i:i + 3]
        if on and path:
            out.append({"path": str(path), "weight": float(weight)})
    return out
