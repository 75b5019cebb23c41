"""Train the embedded tiny base from scratch on the shapes world (CPU is enough).

    python -m bench.train_tiny --out hyperreal/embedded/tiny

Stages: (1) the VAE on scenes of every shape, stars included (a general autoencoder, like SD's);
(2) encode a fixed set of training scenes once (cached latents, no stars, no held-out captions);
(3) UNet + text encoder with min-SNR-weighted epsilon loss, 10% empty captions (for CFG) and an EMA copy;
(4) save in the diffusers layout, measure on held-out prompts, write the model card.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from diffusers.training_utils import EMAModel

from bench.star import shapes_class_prompts
from hyperreal.shapes import benchmark, evaluator
from hyperreal.shapes.tiny_model import (build_inference_scheduler, build_text_encoder, build_tokenizer,
                                         build_train_scheduler, build_unet, build_vae)
from hyperreal.shapes.world import ALL_SHAPES, BASE_SHAPES, sample_scene, to_array

from .tiny_model_card import write_model_card

DEFAULT_GUIDANCE = 5.0
DEFAULT_STEPS = 20


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def to_tensor(imgs) -> torch.Tensor:
    arr = np.stack([to_array(i) for i in imgs]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(total - warmup, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))


def train_vae(steps: int, batch: int, lr: float, rng: random.Random) -> tuple:
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, 50))
    t0 = time.time()
    for step in range(steps):
        x = to_tensor([sample_scene(rng, ALL_SHAPES, exclude_held_out=False)[0] for _ in range(batch)])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    # reconstructions must read back exactly, or the UNet can never score
    check = [sample_scene(rng, ALL_SHAPES, exclude_held_out=False) for _ in range(128)]
    with torch.no_grad():
        rec = vae.decode(vae.encode(to_tensor([c[0] for c in check])).latent_dist.mode()).sample
    rec_imgs = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    acc = evaluator.accuracy(list(rec_imgs), [c[1] for c in check])
    log(f"vae reconstruction accuracy {acc}")
    return vae, {"steps": steps, "batch": batch, "seconds": round(time.time() - t0, 1), "reconstruction": acc}


@torch.no_grad()
def cache_latents(vae, n: int, rng: random.Random) -> tuple[torch.Tensor, list[str]]:
    lat, caps = [], []
    for i in range(0, n, 256):
        scenes = [sample_scene(rng, BASE_SHAPES) for _ in range(min(256, n - i))]
        lat.append(vae.encode(to_tensor([s[0] for s in scenes])).latent_dist.mode())
        caps += [s[1] for s in scenes]
    return torch.cat(lat), caps


def base_json(defaults: dict) -> dict:
    """The tiny base's ``hyperreal.json``: its generation defaults and what the methods read per base
    (``hyperreal.loading.HUB_DEFAULTS`` lists the keys)."""
    one, two = benchmark.held_out_prompts(32, 32)
    return {"kind": "base", **defaults, "world": "shapes",
            "examples": ["a red circle", "a blue square on the left",
                         "a green triangle at the top and a yellow circle at the bottom",
                         "an orange square on the left and a purple circle on the right"],
            "example_caption": "a sks star", "bridge_encoder": "use-multilingual", "controlnets": [],
            # chosen on the star task (README: Adapters; bench/adapter_recipe.py)
            "adapter_train": {"steps": 2000, "batch_size": 8, "lr": 1e-3, "full_lr": 1e-4, "prior_weight": 15.0,
                              "class_images": 64, "sample_every": 50},
            # prior preservation's prompts: captions the base was trained on and draws well (never the held-out
            # ones the benchmarks measure), half one object, half two (bench/star.py shapes_class_prompts)
            "prior_prompts": shapes_class_prompts(64),
            # tiny-canny's learning rate with fewer steps
            "controlnet_train": {"steps": 500, "batch_size": 16, "lr": 3e-4, "sample_every": 100},
            # what trained tiny-bridge (bench/train_tiny_bridge.py)
            "bridge_train": {"swap": {"steps": 2000, "batch_size": 64, "lr": 1e-3},
                             "fuse": {"steps": 2000, "batch_size": 16, "lr": 1e-3}, "sample_every": 100},
            # 64 px images: nothing to slice or tile, and its figures were measured with whole-batch decoding
            "vae_slicing": False, "vae_tiling": False,
            # held-out prompts (never trained on), one-object and two-object, for adapters' drift
            "drift_prompts": [[list(p) for p in one], [list(p) for p in two]]}


def write_base_json(folder: Path, defaults: dict) -> None:
    """One key a line, one [prompt, seed] pair a line: a file a person can read."""
    d = base_json(defaults)
    lines = []
    for k, v in d.items():
        if k == "drift_prompts":
            groups = [",\n".join(f"      {json.dumps(p)}" for p in g) for g in v]
            lines.append(f'  "{k}": [\n' + ",\n".join(f"    [\n{g}\n    ]" for g in groups) + "\n  ]")
        else:
            lines.append(f"  {json.dumps(k)}: {json.dumps(v)}")
    (Path(folder) / "hyperreal.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "embedded" / "tiny"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=800)
    ap.add_argument("--vae-batch", type=int, default=24)
    ap.add_argument("--scenes", type=int, default=60000, help="cached training scenes for the UNet")
    ap.add_argument("--unet-steps", type=int, default=2600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--vae-from", help="reuse the VAE of an earlier run's output folder instead of stage 1")
    args = ap.parse_args(argv)

    t_start = time.time()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)

    if args.vae_from:
        from diffusers import AutoencoderKL

        log(f"stage 1: VAE from {args.vae_from} (made by stage 1 of an earlier run of this script)")
        vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae", use_safetensors=True)
        vae.eval().requires_grad_(False)
        prev = json.loads((Path(args.vae_from) / "training_record.json").read_text())
        vae_info = {**prev["vae"], "from": prev["command"]}
        for _ in range(args.vae_steps * args.vae_batch):  # keep the scene stream where a full run would be
            sample_scene(rng, ALL_SHAPES, exclude_held_out=False)
        [sample_scene(rng, ALL_SHAPES, exclude_held_out=False) for _ in range(128)]
    else:
        log("stage 1: VAE")
        vae, vae_info = train_vae(args.vae_steps, args.vae_batch, 1e-3, rng)

    log("stage 2: caching latents")
    latents, caps = cache_latents(vae, args.scenes, rng)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling
    log(f"cached {len(caps)} scenes, scaling_factor {scaling:.4f}")

    log("stage 3: UNet + text encoder")
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(tokenizer)
    unet = build_unet()
    ids_of = {}
    for c in set(caps) | {""}:
        ids_of[c] = tokenizer(c, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                              return_tensors="pt").input_ids[0]
    cap_ids = torch.stack([ids_of[c] for c in caps])
    empty_ids = ids_of[""]
    noise_sched = build_train_scheduler()
    alphas_cumprod = noise_sched.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.unet_steps, 100))
    ema_unet = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True, power=2 / 3)
    ema_te = EMAModel(text_encoder.parameters(), decay=0.999, use_ema_warmup=True, power=2 / 3)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    losses = []
    for step in range(args.unet_steps):
        idx = torch.randint(0, len(caps), (args.batch,), generator=gen)
        x0 = latents[idx]
        ids = cap_ids[idx].clone()
        drop = torch.rand(args.batch, generator=gen) < 0.1
        ids[drop] = empty_ids
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (args.batch,), generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        cond = text_encoder(ids)[0]
        pred = unet(xt, t, cond).sample
        target = noise_sched.get_velocity(x0, noise, t)
        # min-SNR-gamma weighting (Hang et al. 2023) for v-prediction, as in diffusers' training scripts
        w = torch.clamp(snr[t], max=5.0) / (snr[t] + 1)
        loss = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_unet.step(unet.parameters())
        ema_te.step(text_encoder.parameters())
        losses.append(loss.item())
        if step % 100 == 0 or step == args.unet_steps - 1:
            el = time.time() - t0
            log(f"unet step {step}/{args.unet_steps} loss {np.mean(losses[-100:]):.4f} "
                f"{el / (step + 1):.2f}s/step eta {el / (step + 1) * (args.unet_steps - step - 1) / 60:.1f} min")
    unet_seconds = time.time() - t0
    ema_unet.copy_to(unet.parameters())
    ema_te.copy_to(text_encoder.parameters())

    log("stage 4: save and evaluate")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_inference_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    train_seconds = time.time() - t_start
    metrics = benchmark.evaluate_base(pipe, DEFAULT_STEPS, DEFAULT_GUIDANCE, args.eval_prompts, args.eval_prompts)
    metrics["seconds_per_image"] = round(benchmark.time_one_image(pipe, DEFAULT_STEPS, DEFAULT_GUIDANCE), 3)
    size_mb = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 1e6
    record = {
        "command": "python -m bench.train_tiny " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "args": vars(args),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "train_seconds": round(train_seconds, 1),
        "vae": vae_info,
        "unet": {"steps": args.unet_steps, "batch": args.batch, "seconds": round(unet_seconds, 1),
                 "final_loss": float(np.mean(losses[-100:]))},
        "defaults": {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE, "width": 64, "height": 64},
        "metrics": metrics,
        "weights_mb": round(size_mb, 2),
    }
    write_base_json(out, record["defaults"])
    (out / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")
    write_model_card(out, record)
    log(f"done in {train_seconds / 60:.1f} min: {json.dumps(metrics)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
