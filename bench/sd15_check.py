"""The full-size SD1.5 check, outside the timed test suite: a random-weight SD1.5 (its real configs and CLIP
vocabulary, 859.5M-parameter UNet) in bf16, and each method trained one step through the same service functions the
CLI and the app call, saved, reloaded and used in one generation job each, then all three in one job.

    python -m bench.sd15_check [--dtype bf16|fp32] [--resolution 64] [--work DIR] [--methods adapter,controlnet,bridge]

On a CPU it trains at a small resolution (64 px) so that it ends in minutes; the shapes and file formats are SD1.5's
whatever the resolution. Prints one JSON object as its last line.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
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
from hyperreal.shapes.world import render_caption, sample_scene
from hyperreal.training import TrainConfig


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 2)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--work", default=None)
    ap.add_argument("--methods", default="adapter,controlnet,bridge")
    args = ap.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    work = Path(args.work or tempfile.mkdtemp(prefix="hyperreal-sd15-check-"))
    size, methods = args.resolution, args.methods.split(",")
    figures: dict = {"dtype": args.dtype, "resolution": size, "torch_threads": torch.get_num_threads()}

    t0 = time.time()
    folder = sd15.save(work / "sd15", narrow=False, dtype=dtype)
    (folder / "hyperreal.json").write_text(json.dumps({"kind": "base", "steps": 2, "width": size, "height": size}))
    base = load_base(str(folder), dtype=dtype)
    figures["parameters"] = sd15.parameter_counts(base.pipe)
    figures["build_and_load_seconds"] = round(time.time() - t0, 1)
    print(f"full-size SD1.5 (random weights, {args.dtype}) loaded: {figures['parameters']}", flush=True)

    rng = random.Random(0)
    stars = star_dataset(work / "stars", n=2)
    scenes = write_examples(work / "scenes", [sample_scene(rng) for _ in range(2)])
    render_caption("a red square on the left", seed=3).save(work / "scene.png")
    cfg = TrainConfig(steps=1, batch_size=1, lr=1e-4, log_every=1, gradient_checkpointing=True)

    def job(**keys) -> float:
        t = time.time()
        image, _ = run_job(base, GenerationJob("a photo of sks dog", 1, steps=2, width=size, height=size, **keys))
        assert image.size == (size, size)
        return round(time.time() - t, 1)

    keys = {}
    figures["base_job_seconds"] = job()
    if "adapter" in methods:
        t = time.time()
        r = services.train_adapter(base, adapters.TrainRequest(data=str(stars), trigger="sks", resolution=size,
                                                               name="lora"), cfg, work / "lora", drift_samples=1)
        keys["adapters"] = [{"path": str(r.paths[0]), "weight": 1.0}]
        figures["adapter"] = {"seconds": round(time.time() - t, 1), "trained_parameters": r.figures["trained_parameters"],
                              "file_mb": round(r.paths[0].stat().st_size / 1e6, 1), "job_seconds": job(adapters=keys["adapters"])}
        print("adapter", figures["adapter"], flush=True)
    if "controlnet" in methods:
        t = time.time()
        r = services.train_controlnet(base, controlnet.TrainRequest(data=str(scenes), resolution=size, name="cn"),
                                      cfg, work / "cn")
        unit = controlnet.check_job_controlnet([{"path": str(r.paths[1]), "image": str(work / "scene.png"),
                                                 "preprocess": "canny"}])
        keys["controlnet"] = unit
        figures["controlnet"] = {"seconds": round(time.time() - t, 1),
                                 "trained_parameters": r.figures["trained_parameters"],
                                 "file_mb": round(r.paths[1].stat().st_size / 1e6, 1), "job_seconds": job(controlnet=unit)}
        print("controlnet", figures["controlnet"], flush=True)
    if "bridge" in methods:
        t = time.time()
        r = services.train_bridge(base, bridge.TrainRequest(data=str(scenes), mode="fuse", encoder="minilm",
                                                            resolution=size, name="br"), cfg, work / "br")
        keys["bridge"] = {"path": str(r.paths[0]), "scale": 1.0}
        figures["bridge"] = {"seconds": round(time.time() - t, 1), "trained_parameters": r.figures["trained_parameters"],
                             "file_mb": round(r.paths[0].stat().st_size / 1e6, 1), "job_seconds": job(bridge=keys["bridge"])}
        print("bridge", figures["bridge"], flush=True)
    figures["combined_job_seconds"] = job(**keys)
    figures["peak_rss_gb"] = peak_rss_gb()
    figures["work"] = str(work)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
