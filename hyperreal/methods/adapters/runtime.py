"""Adapters at generation time: which are on and how strongly, the plain base on demand, and the ``adapters`` job
key, which loads (or reuses) a job's adapters and switches them all off when the job ends.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import json
from pathlib import Path

from huggingface_hub import snapshot_download

from ... import sources
from ...errors import HyperrealError
from ...pipelines import JobKey
from .files import describe_file, load_adapter, resolve_source, safe_name
from .spec import loaded, remove_adapter, sync_tokens, tuner_layers


def activate(pipe, weights: dict[str, float]) -> None:
    """Turn on exactly these adapters, each at its weight; every other loaded adapter is off.

    Written here rather than with diffusers' ``set_adapters`` because that calls ``set_scale`` on every layer,
    which OFT layers do not support (a rotation has no strength), and it covers only LoRA-family adapters.
    """
    known = loaded(pipe)
    for name, w in weights.items():
        if name not in known:
            raise HyperrealError(f"no adapter named '{name}' is loaded")
        if not known[name]["scalable"] and w != 1.0:
            raise HyperrealError(f"adapter '{name}' is {known[name]['kind']}, which has no strength: use weight 1.0")
    names = list(weights)
    sync_tokens(pipe, [n for n, w in weights.items() if w != 0])  # weight 0 is off, its token too
    for layer in tuner_layers(pipe):
        layer.set_adapter(names, inference_mode=True) if _accepts_inference_mode(layer) else layer.set_adapter(names)
        layer.enable_adapters(bool(names))
        own = layer._all_available_adapter_names()  # a layer may wrap another kind's layer: only its own
        for name, w in weights.items():
            if known[name]["scalable"] and hasattr(layer, "set_scale") and name in own:
                layer.set_scale(name, w)


def _accepts_inference_mode(layer) -> bool:
    return "inference_mode" in inspect.signature(layer.set_adapter).parameters


@contextlib.contextmanager
def adapters_disabled(pipe):
    """The plain base for the duration (the adapters stay loaded); restores what was active."""
    layers = list(tuner_layers(pipe))
    was = [(layer, layer.disable_adapters) for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield pipe
    finally:
        for layer, disabled in was:
            layer.enable_adapters(not disabled)


def fuse(pipe, names: list[str] | None = None) -> None:
    """Merge the active adapters into the base weights for speed (undo with :func:`unfuse`).

    Unmerging subtracts the update again, which is exact only up to float rounding, so generation jobs do not fuse
    (a later job without adapters must get the base bit for bit).
    """
    for layer in tuner_layers(pipe):
        layer.merge(safe_merge=True, adapter_names=names)


def unfuse(pipe) -> None:
    for layer in tuner_layers(pipe):
        layer.unmerge()


# --- generation jobs ---------------------------------------------------------------------------------------

MAX_LOADED = 8  # adapters kept loaded on a shared pipeline between jobs
# the order adapters of each kind are put on a module (see job_adapters)
STACK_ORDER = {"lora": 0, "dora": 0, "loha": 1, "lokr": 2, "oft": 3}
_JOB_NUMBERS = itertools.count()  # unique adapter names for job-loaded files


def check_job_adapters(items, where: str = "job") -> list[dict]:
    """Validate a job's ``"adapters": [{"path": ..., "weight": 1.0}]`` and fill in the weight."""
    if not isinstance(items, list):
        raise HyperrealError(f"{where}: 'adapters' must be a list like "
                             "[{\"path\": \"my_lora.safetensors\", \"weight\": 1.0}]")
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, dict) or not isinstance(it.get("path"), str) or not it["path"].strip():
            raise HyperrealError(f"{where}: adapters[{i}] needs a \"path\" (a file, folder, embedded name or hub id)")
        unknown = sorted(set(it) - {"path", "weight"})
        if unknown:
            raise HyperrealError(f"{where}: adapters[{i}] has unknown key(s) {', '.join(map(repr, unknown))}")
        w = it.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not -4.0 <= w <= 4.0:
            raise HyperrealError(f"{where}: adapters[{i}] 'weight' must be a number between -4 and 4, "
                                 f"got {json.dumps(w)}")
        out.append({"path": it["path"], "weight": float(w)})
    return out


@contextlib.contextmanager
def job_adapters(pipe, items: list[dict] | None):
    """Load (or reuse) a job's adapters, activate them at their weights, and switch them all off afterwards.

    A shared pipeline keeps loaded adapters for reuse, but every job sets the active set itself and the ``finally``
    disables everything, so a later job that asks for no adapters runs the plain base.
    """
    if not items:
        sync_tokens(pipe, [])
        with adapters_disabled(pipe):
            yield []
        return
    reg = loaded(pipe)
    wanted = []  # (item, path, cache key, kind) in the job's order
    for it in items:
        path = resolve_source(it["path"]).path
        wanted.append((it, path, sources.identity(path) if path else it["path"],
                       describe_file(path)["kind"] if path else "lora"))
    # the adapters' own list is the cache: whatever takes adapters out (remove_all) empties both at once
    by_source = {v["source"]: k for k, v in reg.items() if v.get("job")}
    new = [w for w in wanted if w[2] not in by_source]
    if new:
        # PEFT wraps a module once per adapter, and a LoRA cannot wrap a LoHa/LoKr/OFT layer (nor LoHa/LoKr an OFT
        # one): loaded adapters of a kind that must come after the new ones leave first, and are loaded again
        # after them when a job asks for them
        first = min(STACK_ORDER[w[3]] for w in new)
        for name, v in list(reg.items()):
            if v.get("job") and STACK_ORDER.get(v["kind"], 0) > first:
                remove_adapter(pipe, name)
        by_source = {v["source"]: k for k, v in reg.items() if v.get("job")}
    names: dict[str, str] = {}
    for it, path, key, kind in sorted(wanted, key=lambda w: STACK_ORDER[w[3]]):
        name = by_source.get(key)
        if name is None:
            job_loaded = [k for k, v in reg.items() if v.get("job") and v["source"] not in {w[2] for w in wanted}]
            if len(reg) >= MAX_LOADED and job_loaded:
                remove_adapter(pipe, job_loaded[0])
            stem = Path(it["path"]).stem if path else it["path"]
            name = load_adapter(pipe, it["path"], name=f"job{next(_JOB_NUMBERS)}_{safe_name(stem)}")
            reg[name].update(source=key, job=True)
            by_source[key] = name
        names[key] = name
    # one order whatever the job's: PEFT adds a layer's LoRA and DoRA updates in the active order, and a DoRA
    # update depends on what came before it
    weights: dict[str, float] = {}
    for it, _, key, kind in sorted(wanted, key=lambda w: (STACK_ORDER[w[3]], w[3] == "dora", w[2])):
        weights[names[key]] = weights.get(names[key], 0.0) + it["weight"]
    try:
        activate(pipe, weights)
        yield list(weights)
    finally:
        sync_tokens(pipe, [])  # the next job tokenizes as the base does
        for layer in tuner_layers(pipe):
            layer.enable_adapters(False)


def apply_job_adapters(base, items: list[dict] | None, call):
    """The job's adapters on the call's pipeline (an empty list switches off what an earlier job left on)."""
    return job_adapters(call.pipe, items)


def prepare_job_adapters(base, items: list[dict]) -> list[dict]:
    """Adapters named by hub id are downloaded before the job takes the base's lock, with a deadline; the job then
    loads the local file (loading into the shared pipeline itself needs the lock)."""
    out = []
    for it in items:
        if resolve_source(it["path"]).how == "hub":
            folder = sources.with_deadline(lambda it=it: _download(it["path"]), f"adapter '{it['path']}'")
            it = {**it, "path": folder}
        out.append(it)
    return out


def _download(repo: str) -> str:
    try:
        return snapshot_download(repo, allow_patterns=["*.safetensors", "*.json"])
    except Exception as e:  # every hub failure becomes one sentence
        cause, fix = sources.load_error("adapter", repo, e)
        raise HyperrealError(f"could not load adapter '{repo}': {cause}" + (f"; {fix}" if fix else "")) from None


JOB = JobKey("adapters", check_job_adapters, apply_job_adapters, always=True, prepare=prepare_job_adapters)
