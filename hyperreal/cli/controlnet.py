"""``train controlnet`` and ``eval controlnet``."""
from __future__ import annotations

import json
import time
from pathlib import Path

from PIL import Image

from .. import services
from ..errors import HyperrealError
from ..methods import controlnet
from . import common
from .common import bench

edges = bench("edges")


def add_train(tsub) -> None:
    tc = tsub.add_parser("controlnet", help="a ControlNet on a folder of captioned images (maps computed by an "
                         "extractor, or given as conditioning_image)")
    common.add_base_arg(tc)
    tc.add_argument("--data", required=True, help="folder or .zip: metadata.jsonl (file_name, text[, "
                    "conditioning_image]) or NAME.txt beside each image")
    tc.add_argument("--out", required=True, help="output folder (controlnet/, NAME.safetensors, checkpoints, samples)")
    common.add_loop_args(tc, lr_help="learning rate (default: the base's recipe; the paper's 1e-5 on SD1.5)")
    tc.add_argument("--extractor", default="canny", help="canny | softedge | pose | given (the dataset's maps)")
    tc.add_argument("--canny-low", type=int, default=100)
    tc.add_argument("--canny-high", type=int, default=200)
    tc.add_argument("--softedge-model", default="hed", help="hed | pidinet (a labelled Sobel fallback without weights)")
    tc.add_argument("--annotators", help="folder holding annotator weights (HED, PiDiNet, OpenPose)")
    tc.add_argument("--caption-dropout", type=float, default=0.5, help="share of empty captions (the paper: 0.5)")
    tc.add_argument("--sample-map", action="append", help="condition map image(s) for the validation samples")
    common.add_output_args(tc, "controlnet", "file name of the single-file .safetensors", train,
                           "prompt(s) for the validation samples")


def add_eval(esub) -> None:
    ec = common.add_eval_parser(esub, "controlnet", "edge F1 and colour+shape accuracy of a ControlNet on "
                                "held-out shapes-world scenes, beside the base alone", evaluate)
    ec.add_argument("--controlnet", default="tiny-canny", help="embedded name, folder, .safetensors file or hub id")
    ec.add_argument("--scenes", type=int, default=64, help="held-out scenes (at least 48 for the target)")
    ec.add_argument("--seed", type=int, default=None, help="layout and noise seed of the scenes (default: fixed)")
    ec.add_argument("--scale", type=float, default=1.0, help="conditioning scale")
    ec.add_argument("--steps", type=int)
    ec.add_argument("--guidance", type=float)
    ec.add_argument("--save-images", help="folder for map | ControlNet | base strips of every scene")


def train(args) -> int:
    req = controlnet.TrainRequest(
        data=args.data, extractor=args.extractor, canny_low=args.canny_low, canny_high=args.canny_high,
        softedge_model=args.softedge_model, annotators=args.annotators, caption_dropout=args.caption_dropout,
        sample_prompts=args.sample_prompt or [], sample_maps=args.sample_map or [], resolution=args.resolution,
        name=args.name, seed=args.seed)
    return common.run_training(args, req, services.check_controlnet_request, services.train_controlnet, "controlnet")


def evaluate(args) -> int:
    if args.scenes < 2:
        raise HyperrealError(f"--scenes must be at least 2 (48 or more for the target), got {args.scenes}")
    if not 0 <= args.scale <= controlnet.MAX_SCALE:
        raise HyperrealError(f"--scale must be between 0 and {controlnet.MAX_SCALE:g}, got {args.scale}")
    controlnet.resolve_source(args.controlnet)  # an unknown path fails before the base loads
    base = common.load(args)
    t0 = time.time()
    figures = edges.benchmark(base, args.controlnet, n=args.scenes,
                              seed=edges.EVAL_SEED if args.seed is None else args.seed, scale=args.scale,
                              steps=args.steps, guidance=args.guidance)
    images = figures.pop("images")
    figures["eval_seconds"] = round(time.time() - t0, 1)
    if args.save_images:
        folder = Path(args.save_images)
        folder.mkdir(parents=True, exist_ok=True)
        for i, trio in enumerate(zip(images["maps"], images["controlnet"], images["base"])):
            w, h = trio[1].size
            strip = Image.new("RGB", (3 * w, h))
            for k, im in enumerate(trio):
                strip.paste(im.convert("RGB").resize((w, h)), (k * w, 0))
            strip.save(folder / f"scene-{i:03d}.png")
        figures["images"] = str(folder)
    c, b = figures["controlnet_figures"], figures["base_figures"]
    print(f"{args.scenes} held-out scenes (seed {figures['seed']}, {figures['steps']} steps, guidance "
          f"{figures['guidance']}, scale {figures['scale']}):")
    for name, f in ((f"{base.name} + {args.controlnet}", c), (f"{base.name} alone", b)):
        print(f"  {name:<28} edge F1 {f['edge_f1']:.3f} (P {f['edge_precision']:.3f} R {f['edge_recall']:.3f})  "
              f"colour+shape {100 * f['colour_shape']:.1f}%")
    print(f"  targets: {json.dumps(figures['targets_met'])}")
    if args.json:
        print(json.dumps(figures))
    return 0
