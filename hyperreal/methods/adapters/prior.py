"""Prior preservation: the prompts that guard what the base knew, and the class images the frozen base draws for
them, generated once per base and cached."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from ... import sources
from ...datasets import write_examples
from ...errors import HyperrealError
from ...images import open_image
from ...pipelines import generate_images
from .files import safe_name
from .runtime import adapters_disabled


def class_prompts_for(instances: list, trigger: str | None) -> list[str]:
    """Default class prompts: the instance captions without the trigger."""
    if not trigger:
        raise HyperrealError("class images need a class prompt: pass --class-prompt 'a photo of a dog' (in the app: "
                             "Class prompt), or a trigger, whose captions without it become the class prompts")
    prompts = captions_without_trigger([t for _, t in instances], trigger)
    if not prompts:
        raise HyperrealError(f"the captions are only the trigger '{trigger}', so there is no class to preserve: "
                             "pass --class-prompt 'a photo of a dog' (in the app: Class prompt)")
    return prompts


def balanced_repeats(n_instances: int, n_classes: int) -> int:
    """Instance repeats that show about as many instance as class images per epoch (kohya counts an epoch so)."""
    return max(1, round(n_classes / max(n_instances, 1)))


def known_words(base) -> set[str]:
    """Words of the prompts the base is known to draw (its prior prompts and examples): never a trigger."""
    texts = list(base.defaults.get("prior_prompts") or []) + list(base.defaults.get("examples") or [])
    return {w for t in texts for w in re.findall(r"[a-z0-9]+", t.lower())}


def class_image_cache(base, prompts: list[str], count: int, seed: int, steps: int, guidance: float,
                      size: tuple[int, int]) -> Path:
    """Where the base's class images for these settings live: generated once per base, reused by every run
    (``HYPERREAL_CACHE``, default ~/.cache/hyperreal)."""
    source = str(base.source)
    who = sources.identity(source) if Path(source).exists() else source
    key = json.dumps([who, getattr(base, "vae", None), prompts, count, seed, steps, guidance, list(size)])
    root = Path(os.environ.get("HYPERREAL_CACHE") or Path.home() / ".cache" / "hyperreal")
    return root / "class_images" / f"{safe_name(base.name)}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def class_images(pipe, prompts: list[str], count: int, folder: Path, steps: int, guidance: float,
                 seed: int = 0, size: tuple[int, int] | None = None) -> list[tuple[object, str]]:
    """Prior-preservation images from the frozen base, cached in ``folder`` (reused when the prompts match)."""
    if count < 1 or not prompts:
        return []
    wanted = [prompts[i % len(prompts)] for i in range(count)]
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
        if [r["text"] for r in rows] == wanted:
            return [(open_image(folder / r["file_name"]), r["text"]) for r in rows]
    with adapters_disabled(pipe):
        images = generate_images(pipe, [(p, seed + i) for i, p in enumerate(wanted)], steps, guidance,
                                 **size_kwargs(size))
    # written beside under this process's own name, then renamed: a run killed while writing leaves no half cache
    # that a later run would trust, and two runs filling the same cache at once never write into one folder
    part = folder.with_name(f"{folder.name}.part-{os.getpid()}")
    shutil.rmtree(part, ignore_errors=True)
    write_examples(part, list(zip(images, wanted)), prefix="class")
    shutil.rmtree(folder, ignore_errors=True)
    try:
        part.rename(folder)
    except OSError:  # another run put the same images there first
        shutil.rmtree(part, ignore_errors=True)
    _remove_abandoned_parts(folder)
    return list(zip(images, wanted))


def _remove_abandoned_parts(folder: Path) -> None:
    """Half-written caches of runs that were killed (their process is gone)."""
    for part in folder.parent.glob("*.part-*"):
        try:
            os.kill(int(part.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(part, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def captions_without_trigger(captions: list[str], trigger: str | None) -> list[str]:
    """The captions with the trigger removed, each once: "a photo of sks dog" -> "a photo of dog", the class the
    subject belongs to (DreamBooth's class prompt, and the prompts whose drift matters)."""
    texts = []
    for c in captions:
        t = re.sub(re.escape(trigger), "", c, flags=re.I) if trigger else c
        t = re.sub(r"\s+", " ", t).strip(" ,")
        if t and t not in texts:
            texts.append(t)
    return texts


def size_kwargs(size: tuple[int, int] | None) -> dict:
    return {"width": size[0], "height": size[1]} if size else {}
