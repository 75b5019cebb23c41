"""ControlNets at generation time: loaded once per base, a ControlNet pipeline around the base's own (possibly
adapted) components, and the ``controlnet`` job key.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

from diffusers import MultiControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image

from ... import sources
from ...errors import HyperrealError
from ...images import open_image
from ...safety import as_path
from ...pipelines import JobKey, generate_images
from .conditions import condition_map, extractor_params, resize_mode_of
from .files import load_controlnet, resolve_source
from .spec import PREPROCESS_KINDS, check_fits

MAX_SCALE = 2.0
MAX_CACHED = 4  # ControlNets kept loaded per base between jobs
_CACHE = sources.PerBaseCache(MAX_CACHED)


def cached_controlnet(base, source: str):
    """Load once per base (keyed by the file's identity), on the base's device and dtype."""
    src = resolve_source(source)
    key = src.where if src.how == "hub" else sources.identity(src.where)
    unet = base.pipe.unet

    def load():
        # a file without our header is built with this base's UNet config (the heads and widths it was made for)
        model = load_controlnet(source, device=unet.device, dtype=unet.dtype, unet_config=unet.config)
        check_fits(model, unet, source)
        return model

    return _CACHE.get(unet, key, load)


def controlnet_pipeline(pipe, controlnets):
    """``StableDiffusionControlNetPipeline`` around the pipeline's own (possibly adapted) components."""
    cns = list(controlnets) if isinstance(controlnets, (list, tuple)) else [controlnets]
    cn = cns[0] if len(cns) == 1 else MultiControlNetModel(cns)
    comps = {k: v for k, v in pipe.components.items() if k != "controlnet"}
    out = StableDiffusionControlNetPipeline(**comps, controlnet=cn, requires_safety_checker=False)
    out.set_progress_bar_config(disable=True)
    return out


def generate(pipe, controlnets, prompts: list[str], maps: list, seeds: list[int], steps: int, guidance: float,
             scale: float | list[float] = 1.0, start: float | list[float] = 0.0, end: float | list[float] = 1.0,
             guess_mode: bool = False, batch: int = 16, negative_prompt: str | None = None) -> list[Image.Image]:
    """Images for (prompt, map(s), seed) triples; ``maps[i]`` is one map, or a list with one per ControlNet."""
    cpipe = controlnet_pipeline(pipe, controlnets)
    multi = isinstance(cpipe.controlnet, MultiControlNetModel)

    def edit(call, first: int, last: int):
        ms = maps[first:last]
        if multi:  # diffusers' nested form: per prompt, one map per ControlNet
            image = [list(m) for m in ms]
        else:
            image = [m[0] if isinstance(m, (list, tuple)) else m for m in ms]
        w, h = (image[0][0] if multi else image[0]).size
        return call.changed(cpipe, image=image, width=w, height=h, controlnet_conditioning_scale=scale,
                            control_guidance_start=start, control_guidance_end=end, guess_mode=guess_mode)

    return generate_images(pipe, list(zip(prompts, seeds)), steps, guidance, batch, negative_prompt, edit=edit)


# --- generation jobs -----------------------------------------------------------------------------------------

_UNIT_KEYS = {"path", "image", "scale", "start", "end", "preprocess", "resize_mode", "guess_mode", "canny_low",
              "canny_high"}
EXAMPLE_UNIT = '{"path": "my_controlnet", "image": "edges.png", "scale": 1.0, "start": 0.0, "end": 1.0}'


def _num(v) -> bool:
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        return False


def check_job_controlnet(items, where: str = "job") -> list[dict]:
    """Validate a job's ``"controlnet"`` list and fill in the defaults.

    Each unit: ``path`` (embedded name, folder, .safetensors file or hub id), ``image`` (a file; relative paths
    are relative to the current directory), ``scale`` 0-2 (1), ``start``/``end`` 0-1 (0/1, start < end), and
    optionally ``preprocess`` (none: the image is the map; canny | softedge | pose: computed from a photo),
    ``resize_mode`` (crop and resize | just resize | resize and fill), ``canny_low``/``canny_high``,
    ``guess_mode`` (true on any unit applies guess mode to the job).
    """
    def bad(i, msg):
        return HyperrealError(f"{where}: controlnet[{i}] {msg}")

    if not isinstance(items, list) or not items:
        raise HyperrealError(f"{where}: 'controlnet' must be a non-empty list like [{EXAMPLE_UNIT}]")
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            raise bad(i, f"must be an object like {EXAMPLE_UNIT}")
        unknown = sorted(set(it) - _UNIT_KEYS)
        if unknown:
            raise bad(i, f"has unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(_UNIT_KEYS))}")
        if not isinstance(it.get("path"), str) or not it["path"].strip():
            raise bad(i, "needs a \"path\": an embedded ControlNet (python -m hyperreal models), a folder, a "
                         ".safetensors file or a hub id")
        try:
            resolve_source(it["path"])
        except HyperrealError as e:
            raise bad(i, str(e)) from None
        img = it.get("image")
        if not isinstance(img, str) or not img.strip():
            raise bad(i, "needs an \"image\": the condition map (or a photo with \"preprocess\") as a file path")
        try:
            p = as_path(img, "image")
        except HyperrealError as e:
            raise bad(i, str(e)) from None
        if not p.is_file():
            raise bad(i, f"image '{img}' does not exist (relative paths are read from the current directory "
                         f"{Path.cwd()})")
        try:
            open_image(p, img)
        except HyperrealError as e:
            raise bad(i, str(e)) from None
        unit = {"path": it["path"].strip(), "image": img}
        for k, default, lo, hi in (("scale", 1.0, 0.0, MAX_SCALE), ("start", 0.0, 0.0, 1.0), ("end", 1.0, 0.0, 1.0)):
            v = it.get(k, default)
            if not _num(v) or not lo <= v <= hi:
                raise bad(i, f"'{k}' must be a number between {lo:g} and {hi:g}, got {json.dumps(v)}")
            unit[k] = float(v)
        if unit["start"] >= unit["end"]:
            raise bad(i, f"'start' ({unit['start']:g}) must be below 'end' ({unit['end']:g})")
        pre = it.get("preprocess", "none")
        if pre not in PREPROCESS_KINDS:
            raise bad(i, f"'preprocess' must be one of {', '.join(PREPROCESS_KINDS)}, got {json.dumps(pre)}")
        if pre != "none":
            unit["preprocess"] = pre
        if "resize_mode" in it:
            try:
                unit["resize_mode"] = resize_mode_of(it["resize_mode"])
            except HyperrealError as e:
                raise bad(i, str(e)) from None
        for k in ("canny_low", "canny_high"):
            if k in it:
                if isinstance(it[k], bool) or not isinstance(it[k], int) or not 0 <= it[k] <= 1000:
                    raise bad(i, f"'{k}' must be an integer between 0 and 1000, got {json.dumps(it[k])}")
                unit[k] = it[k]
        if unit.get("canny_low", 100) > unit.get("canny_high", 200):
            raise bad(i, "'canny_low' must not exceed 'canny_high'")
        if "guess_mode" in it:
            if not isinstance(it["guess_mode"], bool):
                raise bad(i, f"'guess_mode' must be true or false, got {json.dumps(it['guess_mode'])}")
            unit["guess_mode"] = it["guess_mode"]
        out.append(unit)
    return out


def unit_map(unit: dict, width: int, height: int) -> Image.Image:
    """The condition map a job unit asks for, at the generation size."""
    pre = unit.get("preprocess", "none")
    params = extractor_params(pre, unit.get("canny_low", 100), unit.get("canny_high", 200)) if pre != "none" else {}
    img = open_image(Path(unit["image"]).expanduser(), unit["image"])
    return condition_map(pre, img, width, height, unit.get("resize_mode", "crop and resize"), **params)


@contextlib.contextmanager
def job_controlnet(base, units: list[dict] | None, call):
    """Swap ``call.pipe`` for a ControlNet pipeline around the same components for one job; restore on exit.

    Adapters (applied before, in the UNet's weights) and the bridge (prompt embeddings in ``call.kwargs`` or the
    UNet's attention processors) are kept: the new pipeline shares the call's own components and keyword args.
    """
    if not units:
        yield call
        return
    width, height = call.kwargs.get("width"), call.kwargs.get("height")
    nets = [cached_controlnet(base, u["path"]) for u in units]
    maps = [unit_map(u, width, height) for u in units]
    single = len(units) == 1
    with call.changed(controlnet_pipeline(call.pipe, nets),
                      image=maps[0] if single else maps,
                      controlnet_conditioning_scale=units[0]["scale"] if single else [u["scale"] for u in units],
                      control_guidance_start=units[0]["start"] if single else [u["start"] for u in units],
                      control_guidance_end=units[0]["end"] if single else [u["end"] for u in units],
                      guess_mode=any(u.get("guess_mode", False) for u in units)):
        yield call


def prepare_job_controlnet(base, units: list[dict]) -> list[dict]:
    """Each unit's ControlNet loaded into the base's cache before the job takes the base's lock, with a deadline."""
    for u in units:
        sources.with_deadline(lambda u=u: cached_controlnet(base, u["path"]), f"ControlNet '{u['path']}'")
    return units


JOB = JobKey("controlnet", check_job_controlnet, job_controlnet, prepare=prepare_job_controlnet)
