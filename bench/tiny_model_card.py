"""Model card for the embedded tiny base, written from the training record (numbers are never typed by hand)."""
from __future__ import annotations

from pathlib import Path


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def write_model_card(folder: Path, record: dict) -> None:
    m = record["metrics"]
    one, two = m["one_object"], m["two_objects"]
    vae = record["vae"]["reconstruction"]
    reuse = ""
    if record["vae"].get("from"):
        reuse = (f" Its VAE is stage 1 of `{record['vae']['from']}`, reused by `--vae-from`; a run without "
                 "`--vae-from` trains it again the same way.")
    text = f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [hyperreal, shapes-world, tiny]
---
# hyperreal `tiny` — the shapes-world base

A small Stable-Diffusion-family model (CLIP text encoder + BPE tokenizer, `AutoencoderKL` with factor 4,
`UNet2DConditionModel`, DPM-Solver++ scheduler) trained from scratch by `bench/train_tiny.py` on
procedural 64x64 scenes of flat-coloured circles, squares and triangles. Load it with any diffusers tool:
`StableDiffusionPipeline.from_pretrained(PATH)`. The shape `star` is reserved: the UNet never saw one.

Recommended: {record['defaults']['steps']} steps, guidance {record['defaults']['guidance']}, 64x64.

## Measured (held-out captions never seen in training, fixed seeds)
| set | prompts | colour+shape | position | exact count |
|---|---|---|---|---|
| one object | {one['n']} | {_pct(one['colour_shape'])} | {_pct(one['position'])} | {_pct(one['count'])} |
| two objects | {two['n']} | {_pct(two['colour_shape'])} | {_pct(two['position'])} | {_pct(two['count'])} |

- One 20-step 64x64 image: {m['seconds_per_image']} s on {record['threads']} CPU threads (torch {record['torch']}).
- VAE reconstructions read back by the evaluator: colour+shape {_pct(vae['colour_shape'])} of {vae['n']} scenes
  (stars included).
- Weights: {record['weights_mb']} MB of safetensors in all.
- Training: {record['train_seconds'] / 60:.1f} min on {record['threads']} CPU threads
  (VAE {record['vae']['steps']} steps, UNet {record['unet']['steps']} steps at batch {record['unet']['batch']},
  final loss {record['unet']['final_loss']:.4f}).

Made by: `{record['command']}` (full record in `training_record.json`).{reuse}
Re-measure: `python -m hyperreal eval base --json`.

Schedule: SD1.5's betas rescaled to zero terminal SNR, v-prediction, trailing timesteps (Lin et al. 2023).
With SD's own schedule the first tiny model read its layout off the starting noise and ignored position
words; see `hyperreal/shapes/tiny_model.py`.
"""
    (folder / "README.md").write_text(text)
