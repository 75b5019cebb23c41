"""``generate``, ``models`` and ``eval base``: what needs a base and no method."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import HyperrealError
from ..generation import check_prompt_length, job_from_dict, read_job_lines, run_job, save_png
from ..registry import embedded_artifacts
from ..shapes import benchmark
from . import common


# --- generate -------------------------------------------------------------------------------------------

def cmd_generate(args) -> int:
    if bool(args.prompt) == bool(args.jobs):
        raise HyperrealError("give either --prompt TEXT or --jobs FILE.jsonl")
    overrides = {k: v for k, v in (("steps", args.steps), ("guidance", args.guidance), ("width", args.width),
                                   ("height", args.height)) if v is not None}
    if args.jobs:
        if not args.out_dir:
            raise HyperrealError("--jobs needs --out-dir DIR (images are written as 0000.png, 0001.png, ...)")
        lines = read_job_lines(args.jobs)
        wheres = [where for where, _ in lines]
        jobs = [job_from_dict({**overrides, **{k: v for k, v in vars(j).items() if v is not None}}, where)
                for where, j in lines]
        targets = [Path(args.out_dir) / f"{i:04d}.png" for i in range(len(jobs))]
    else:
        wheres = ["--prompt"]
        d = {"prompt": args.prompt, "seed": args.seed, "negative_prompt": args.negative_prompt, **overrides}
        jobs = [job_from_dict(d, "--prompt")]
        targets = [Path(args.out or (Path(args.out_dir or ".") / "0000.png"))]
    base = common.load(args)  # once for the whole file
    for where, job in zip(wheres, jobs):  # every prompt fits before any image is made
        check_prompt_length(base.pipe.tokenizer, job, where)
    for job, target in zip(jobs, targets):
        t0 = time.perf_counter()
        image, params = run_job(base, job)
        save_png(image, target, params)
        print(f"wrote {target} ({time.perf_counter() - t0:.2f}s): {job.prompt}")
    return 0


# --- models ---------------------------------------------------------------------------------------------

def cmd_models(args) -> int:
    arts = embedded_artifacts()
    if not arts:
        raise HyperrealError("no embedded models found under hyperreal/embedded (is the package installed whole?)")
    w = max(len(a.name) for a in arts)
    for a in arts:
        print(f"{a.name:<{w}}  {a.kind:<10}  {a.path}")
    return 0


# --- eval -----------------------------------------------------------------------------------------------

TARGETS = {"one_object_colour_shape": 0.85, "two_objects_colour_shape": 0.65, "seconds_per_image": 1.0,
           "weights_mb": 25.0}


def cmd_eval_base(args) -> int:
    base = common.load(args)
    steps = args.steps or base.defaults["steps"]
    guidance = args.guidance if args.guidance is not None else base.defaults["guidance"]
    t0 = time.time()
    res = benchmark.evaluate_base(base.pipe, steps, guidance, args.prompts, args.prompts)
    sec = benchmark.time_one_image(base.pipe, steps, guidance)
    size_mb = sum(f.stat().st_size for f in Path(base.source).rglob("*.safetensors")) / 1e6 \
        if Path(base.source).is_dir() else None
    one, two = res["one_object"], res["two_objects"]
    figures = {
        "base": base.name, "steps": steps, "guidance": guidance, "prompts_per_set": args.prompts,
        "one_object_colour_shape": one["colour_shape"], "one_object_position": one["position"],
        "one_object_count": one["count"],
        "two_objects_colour_shape": two["colour_shape"], "two_objects_position": two["position"],
        "two_objects_count": two["count"],
        "seconds_per_image": round(sec, 3), "weights_mb": round(size_mb, 2) if size_mb else None,
        "eval_seconds": round(time.time() - t0, 1),
    }
    met = {k: (figures[k] is not None and (figures[k] >= v if "colour_shape" in k else figures[k] <= v))
           for k, v in TARGETS.items()}
    figures["targets"] = TARGETS
    figures["targets_met"] = met
    print(f"held-out prompts ({args.prompts} per set, {steps} steps, guidance {guidance}) on '{base.name}':")
    for k in ("one_object", "two_objects"):
        r = res[k]
        pos = "n/a" if r["position"] is None else f"{100 * r['position']:.1f}%"
        print(f"  {k:<12} colour+shape {100 * r['colour_shape']:5.1f}%  position {pos}  count {100 * r['count']:.1f}%")
    print(f"  one 20-step image: {sec:.3f}s   weights: {figures['weights_mb']} MB")
    if args.json:
        print(json.dumps(figures))
    return 0
