"""GPU speed of each method on SD1.5's architecture (random weights) at 512x512 in half precision: training steps per
second and peak VRAM at batch 1 and at the VRAM preset's batch for this card, and generation seconds per image.
Run by nobody in CI (it needs a CUDA GPU).

    python -m bench.gpu_speed [--steps 20] [--dtype fp16|bf16] [--diffusers-examples DIR] [--json]

With ``--diffusers-examples DIR`` (a checkout of diffusers' ``examples/``), diffusers' own
``dreambooth/train_dreambooth_lora.py`` runs with the same settings (model, resolution, batch 1, steps, precision,
gradient checkpointing) and its time per step is printed beside the adapter's. (Its ControlNet script wants a
dataset with a conditioning-image column, which this benchmark does not build.)
Prints a table, and with --json one JSON object as its last line.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import sd15
from bench.star import star_dataset
from hyperreal import services
from hyperreal.datasets import write_examples
from hyperreal.generation import GenerationJob, run_job
from hyperreal.loading import load_base
from hyperreal.methods import adapters, bridge, controlnet
from hyperreal.shapes.world import sample_scene
from hyperreal.training import TrainConfig, training_seconds

SIZE = 512


def measure(fn) -> tuple[float, float]:
    """(seconds, peak GB of GPU memory) of one call."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    fn()
    torch.cuda.synchronize()
    return time.time() - t0, torch.cuda.max_memory_allocated() / 1024 ** 3


def upscale(folder: Path) -> Path:
    """The 64 px shapes-world images at 512 px (the benchmark measures speed, not what is learnt)."""
    for f in folder.glob("*.png"):
        from PIL import Image

        with Image.open(f) as im:
            im.resize((SIZE, SIZE)).save(f)
    return folder


def diffusers_script(examples: Path, script: str, args: list[str], steps: int) -> float:
    """Seconds per step of one of diffusers' training scripts (its startup counted out by a 1-step run)."""
    def run(n):
        t0 = time.time()
        subprocess.run([sys.executable, str(examples / script), *args, f"--max_train_steps={n}"], check=True,
                       capture_output=True)
        return time.time() - t0
    return (run(steps + 1) - run(1)) / steps


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    ap.add_argument("--diffusers-examples", type=Path)
    ap.add_argument("--work")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu_speed needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    work = Path(args.work or tempfile.mkdtemp(prefix="hyperreal-gpu-speed-"))
    folder = sd15.save(work / "sd15", narrow=False, dtype=dtype)
    base = load_base(str(folder), device="cuda", dtype=dtype)
    rng = random.Random(0)
    stars = upscale(star_dataset(work / "stars", n=8))
    scenes = upscale(write_examples(work / "scenes", [sample_scene(rng) for _ in range(8)]))
    rows, figures = [], {"device": torch.cuda.get_device_name(), "dtype": args.dtype, "resolution": SIZE,
                         "steps": args.steps, "methods": {}}

    def generation() -> float:
        run_job(base, GenerationJob("a photo of sks dog", 0, steps=30, width=SIZE, height=SIZE))  # warm-up
        return measure(lambda: run_job(base, GenerationJob("a photo of sks dog", 1, steps=30, width=SIZE,
                                                           height=SIZE)))[0]

    figures["generation_seconds_per_image"] = round(generation(), 2)
    methods = {
        "adapter (LoRA)": ("adapter", "lora", lambda out, cfg: services.train_adapter(
            base, adapters.TrainRequest(data=str(stars), trigger="sks", name="lora"), cfg, out, drift_samples=1)),
        "controlnet": ("controlnet", None, lambda out, cfg: services.train_controlnet(
            base, controlnet.TrainRequest(data=str(scenes), name="cn"), cfg, out)),
        "bridge (fuse)": ("bridge", "fuse", lambda out, cfg: services.train_bridge(
            base, bridge.TrainRequest(data=str(scenes), mode="fuse", name="br"), cfg, out)),
    }
    for label, (method, variant, train) in methods.items():
        preset = services.train_settings(base, method, variant, "auto")
        for batch in sorted({1, preset["batch_size"]}):
            cfg = TrainConfig(steps=args.steps, batch_size=batch, lr=1e-5, log_every=args.steps,
                              gradient_checkpointing=preset["gradient_checkpointing"],
                              use_8bit_adam=preset["use_8bit_adam"])
            out = work / f"{method}-{batch}"
            _, peak = measure(lambda: train(out, cfg))
            seconds = training_seconds(out)
            row = {"batch": batch, "steps_per_second": round(args.steps / seconds, 3), "peak_vram_gb": round(peak, 1),
                   "gradient_checkpointing": cfg.gradient_checkpointing, "8bit_adam": cfg.use_8bit_adam}
            figures["methods"].setdefault(label, []).append(row)
            rows.append(f"| {label} | {batch} | {row['steps_per_second']} | {row['peak_vram_gb']} |")
    if args.diffusers_examples:
        common = [f"--pretrained_model_name_or_path={folder}", f"--resolution={SIZE}", "--train_batch_size=1",
                  f"--mixed_precision={args.dtype}", "--gradient_checkpointing", f"--output_dir={work / 'd'}"]
        seconds = diffusers_script(args.diffusers_examples, "dreambooth/train_dreambooth_lora.py",
                                   common + [f"--instance_data_dir={stars}", "--instance_prompt=a sks star"],
                                   args.steps)
        figures["diffusers_train_dreambooth_lora_steps_per_second"] = round(1 / seconds, 3)
        rows.append(f"| diffusers train_dreambooth_lora.py | 1 | {round(1 / seconds, 3)} | |")
    print(f"{figures['device']}, {args.dtype}, {SIZE}x{SIZE}, {args.steps} steps; generation "
          f"{figures['generation_seconds_per_image']} s/image (30 steps)")
    print("| method | batch | steps/s | peak VRAM (GB) |\n|---|---|---|---|\n" + "\n".join(rows))
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
