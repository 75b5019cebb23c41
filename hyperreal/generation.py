"""Generation jobs: validation, running them on a loaded base, and PNGs that carry their parameters."""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import __version__
from .datasets import read_text
from .errors import HyperrealError
from .loading import BaseModel
from .methods import JOB_KEYS
from .pipelines import PipelineCall, seeded

MAX_SEED = 2**32 - 1
MAX_STEPS = 200
MAX_SIDE = 2048


@dataclass
class GenerationJob:
    prompt: str
    seed: int
    negative_prompt: str = ""
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    # method keys, each checked and applied by its method (methods.JOB_KEYS)
    adapters: list[dict] | None = None  # [{"path": FILE|DIR|NAME|ID, "weight": 1.0}]
    bridge: dict | None = None  # {"path": FILE|NAME, "scale": 1.0}
    controlnet: list[dict] | None = None  # [{"path": NAME|ID|DIR, "image": FILE, "scale": 1.0, "start": 0, "end": 1}]

    def resolved(self, defaults: dict) -> "GenerationJob":
        """The job with every unset knob taken from the base's defaults (the guidance from ``adapter_guidance``
        when an adapter is on)."""
        d = asdict(self)
        for k in ("steps", "guidance", "width", "height"):
            if d[k] is None:
                d[k] = default_guidance(defaults, adapters_on(self.adapters)) if k == "guidance" else defaults[k]
        return GenerationJob(**d)


def adapters_on(adapters: list[dict] | None) -> bool:
    """Whether a job's adapters change anything (at weight 0 an adapter is off: the image is the base's)."""
    return any(a.get("weight", 1.0) != 0 for a in adapters or [])


def default_guidance(defaults: dict, adapters_on: bool) -> float:
    """The guidance a job gets when it sets none: the base's ``adapter_guidance`` with an adapter on."""
    return defaults["adapter_guidance" if adapters_on else "guidance"]


def guidance_on_switch(defaults: dict, adapters_on: bool, current: float) -> float:
    """The Generate tab's guidance after adapters are switched on or off: the default for the new state while the
    person has left it at the old state's default, else what they chose."""
    return default_guidance(defaults, adapters_on) if current == default_guidance(defaults, not adapters_on) else current


_TYPES = {"prompt": str, "negative_prompt": str, "seed": int, "steps": int, "guidance": (int, float),
          "width": int, "height": int, "adapters": list, "bridge": dict, "controlnet": list}
_REQUIRED = ("prompt", "seed")


def _bad(where: str, msg: str) -> HyperrealError:
    return HyperrealError(f"{where}: {msg}")


def job_from_dict(d: dict, where: str = "job") -> GenerationJob:
    """Check one job (a JSON object) and say exactly what is wrong with it."""
    if not isinstance(d, dict):
        raise _bad(where, f"expected a JSON object like {{\"prompt\": \"a red circle\", \"seed\": 1}}, got {type(d).__name__}")
    unknown = sorted(set(d) - set(_TYPES))
    if unknown:
        raise _bad(where, f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(_TYPES)}")
    for k in _REQUIRED:
        if k not in d or d[k] is None:
            raise _bad(where, f"'{k}' is missing" + (" (an integer, e.g. \"seed\": 1)" if k == "seed" else ""))
    for k, v in d.items():
        if v is None and k not in _REQUIRED:
            continue
        if isinstance(v, bool) or not isinstance(v, _TYPES[k]):
            want = {str: "a string", int: "an integer", list: "a list", dict: "an object"}.get(_TYPES[k], "a number")
            raise _bad(where, f"'{k}' must be {want}, got {json.dumps(v)}")
    for key in JOB_KEYS:
        if d.get(key.name) is not None:
            d = {**d, key.name: key.check(d[key.name], where)}
    try:
        job = GenerationJob(**{k: (float(v) if k == "guidance" and v is not None else v) for k, v in d.items()})
    except OverflowError:
        raise _bad(where, "'guidance' must be between 0 and 30") from None
    validate(job, where)
    return job


def validate(job: GenerationJob, where: str = "job") -> None:
    if not job.prompt.strip():
        raise _bad(where, "'prompt' is empty")
    if not 0 <= job.seed <= MAX_SEED:
        raise _bad(where, f"'seed' must be between 0 and {MAX_SEED}, got {job.seed}")
    if job.steps is not None and not 1 <= job.steps <= MAX_STEPS:
        raise _bad(where, f"'steps' must be between 1 and {MAX_STEPS}, got {job.steps}")
    if job.guidance is not None and not 0.0 <= job.guidance <= 30.0:
        raise _bad(where, f"'guidance' must be between 0 and 30, got {job.guidance}")
    for k in ("width", "height"):
        v = getattr(job, k)
        if v is not None and (not 8 <= v <= MAX_SIDE or v % 8):
            raise _bad(where, f"'{k}' must be a multiple of 8 between 8 and {MAX_SIDE}, got {v}")


def read_jobs(path: str | Path) -> list[GenerationJob]:
    """All jobs of a JSONL file, checked before any image is made (blank lines and # comments are skipped)."""
    return [job for _, job in read_job_lines(path)]


def read_job_lines(path: str | Path) -> list[tuple[str, GenerationJob]]:
    """(where, job) for each job of a JSONL file, ``where`` naming its line for later messages."""
    p = Path(path)
    if not p.is_file():
        raise HyperrealError(f"jobs file '{p}' does not exist")
    jobs = []
    # lines end at "\n" only: str.splitlines() would also cut at U+2028 and U+0085, which JSON strings may hold
    for n, line in enumerate(read_text(p, p.name).split("\n"), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        where = f"{p.name} line {n}"
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise _bad(where, f"not valid JSON ({e.msg} at column {e.colno})") from None
        except (ValueError, RecursionError):  # a number of thousands of digits, brackets nested thousands deep
            raise _bad(where, "not a JSON line this app reads (a number too long or nesting too deep)") from None
        jobs.append((where, job_from_dict(d, where)))
    if not jobs:
        raise HyperrealError(f"jobs file '{p}' has no jobs (one JSON object per line)")
    return jobs


# --- the A1111 'parameters' text chunk -------------------------------------------------------------------

def parameters_text(job: GenerationJob, model: str, sampler: str) -> str:
    lines = [job.prompt]
    if job.negative_prompt:
        lines.append(f"Negative prompt: {job.negative_prompt}")
    methods = {k.name: getattr(job, k.name) for k in JOB_KEYS if getattr(job, k.name)}
    # A1111 quotes a value holding commas; the JSON lets "send to form" restore every method's settings
    extra = f", Hyperreal: {json.dumps(json.dumps(methods))}" if methods else ""
    lines.append(f"Steps: {job.steps}, Sampler: {sampler}, CFG scale: {job.guidance:g}, Seed: {job.seed}, "
                 f"Size: {job.width}x{job.height}, Model: {model}{extra}, Version: hyperreal {__version__}")
    return "\n".join(lines)


def parse_parameters(text: str) -> dict:
    """Read an A1111-style parameters text back into job fields (for 'send to form')."""
    # split on "\n" alone, as parameters_text joins: str.splitlines() would also split (and strip() eat) the
    # other line and space characters a prompt may hold (\x0b, \x1c, \u2028, ...)
    lines = text.rstrip("\n").split("\n") if text.strip() else []
    if not lines:
        return {}
    settings = lines[-1]
    head = lines[:-1]
    neg = [i for i, line in enumerate(head) if line.startswith("Negative prompt:")]
    prompt = "\n".join(head[:neg[0]] if neg else head)
    negative = "\n".join(head[neg[0]:])[len("Negative prompt:"):] if neg else ""
    out: dict = {"prompt": prompt, "negative_prompt": negative[1:] if negative.startswith(" ") else negative}
    kv = dict(m.groups() for m in re.finditer(r'\s*([\w ]+):\s*("(?:\\.|[^"\\])*"|[^,]+)', settings))
    conv = {"Steps": ("steps", int), "CFG scale": ("guidance", float), "Seed": ("seed", int)}
    for k, (name, f) in conv.items():
        if k in kv:
            out[name] = f(kv[k])
    if "Size" in kv:
        w, h = kv["Size"].split("x")
        out["width"], out["height"] = int(w), int(h)
    if "Model" in kv:
        out["model"] = kv["Model"].strip()
    if "Hyperreal" in kv:
        try:
            out.update(json.loads(json.loads(kv["Hyperreal"])))
        except (ValueError, TypeError):
            pass  # a hand-edited text: keep the plain fields
    return out


def save_png(image: Image.Image, path: str | Path, parameters: str) -> Path:
    """Write atomically (temp file + rename) so a failure never leaves a half-written image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("parameters", parameters)
    fd, tmp = tempfile.mkstemp(suffix=".png.part", dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --- running --------------------------------------------------------------------------------------------

def sampler_name(pipe) -> str:
    return type(pipe.scheduler).__name__.replace("Scheduler", "")


def run_job(base: BaseModel, job: GenerationJob) -> tuple[Image.Image, str]:
    """One image for one job on the base; returns the image and its parameters text."""
    job = job.resolved(base.defaults)
    pipe = base.pipe
    # the noise comes from a CPU generator so a seed gives the same image on any device
    call = PipelineCall(pipe, dict(prompt=job.prompt, negative_prompt=job.negative_prompt or None,
                                   num_inference_steps=job.steps, guidance_scale=job.guidance, width=job.width,
                                   height=job.height, generator=seeded([job.seed])[0], output_type="pil"))
    # models the job names are fetched and loaded first, outside the lock: a hub that does not answer costs this job
    # an error after its deadline, while other jobs go on
    values = {key.name: key.prepare(base, getattr(job, key.name)) for key in JOB_KEYS
              if getattr(job, key.name) is not None}
    with base.lock, contextlib.ExitStack() as stack:
        for key in JOB_KEYS:
            value = values.get(key.name)
            if value is not None or key.always:
                stack.enter_context(key.apply(base, value, call))
        check_prompt_length(call.pipe.tokenizer, job)  # with the job's trigger tokens in the tokenizer
        image = call.run()[0]
    return image, parameters_text(job, base.name, sampler_name(pipe))


def check_prompt_length(tokenizer, job: GenerationJob, where: str = "job") -> None:
    """A prompt longer than the text encoder reads would be cut without a word (and the PNG would still say the
    whole text): refused instead, with how long it is. Not with a bridge on: the extra encoder reads the prompt
    (a prompt in another script costs the base's tokenizer several tokens a letter, and is what a multilingual
    bridge is for), and the bridge corrects what the base's reading lacks."""
    if job.bridge:
        return
    limit = tokenizer.model_max_length - 2  # the start and end tokens take two places
    for field, text in (("prompt", job.prompt), ("negative prompt", job.negative_prompt)):
        n = len(tokenizer(text, add_special_tokens=False, truncation=False).input_ids) if text else 0
        if n > limit:
            raise _bad(where, f"the {field} is {n} tokens long; this model reads at most {limit} (the rest would be "
                              "cut off): shorten it")


def generate_to_folder(base: BaseModel, job: GenerationJob, count: int, folder: str | Path) -> list[tuple[Path, str]]:
    """``count`` images with seeds seed, seed+1, ... saved as PNGs (with parameters) under ``folder``."""
    folder = Path(folder)
    out = []
    for i in range(count):
        j = GenerationJob(**{**asdict(job), "seed": (job.seed + i) % (MAX_SEED + 1)})
        validate(j)
        image, params = run_job(base, j)
        path = save_png(image, folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{j.seed}-{uuid.uuid4().hex[:6]}.png", params)
        out.append((path, params))
    return out
