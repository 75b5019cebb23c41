"""Captioned image folders, in the formats other tools use, and the frozen-model caches built from them.

A dataset is a folder (or a .zip of one) of images with captions from either
- ``metadata.jsonl`` (the Hugging Face imagefolder convention: ``file_name``, ``text``; optional
  ``conditioning_image``), or
- ``NAME.txt`` beside ``NAME.png`` (kohya's convention).
"""
from __future__ import annotations

import itertools
import json
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import HyperrealError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class Example:
    image: Path
    text: str
    conditioning_image: Path | None = None


def _extract_zip(path: Path, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path) as z:
        for m in z.infolist():
            target = (into / m.filename).resolve()
            if not str(target).startswith(str(into.resolve())):  # zip-slip: never write outside the folder
                raise HyperrealError(f"{path.name}: refusing the entry '{m.filename}' (it points outside the archive)")
        z.extractall(into)
    # a zip of one folder: use that folder
    entries = [p for p in into.iterdir() if not p.name.startswith(("__MACOSX", "."))]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else into


def load_examples(path: str | Path, workdir: str | Path | None = None) -> list[Example]:
    """All (image, caption) pairs of a dataset folder or zip, with a clear error for each way it can be wrong."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".zip":
        p = _extract_zip(p, Path(workdir or tempfile.mkdtemp(prefix="hyperreal-data-")))
    if not p.is_dir():
        raise HyperrealError(f"dataset '{path}' is not a folder or a .zip")
    meta = p / "metadata.jsonl"
    examples: list[Example] = []
    if meta.is_file():
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, text = row["file_name"], row.get("text", row.get("caption"))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise HyperrealError(f"{meta} line {n}: expected {{\"file_name\": ..., \"text\": ...}}") from None
            if not isinstance(text, str):
                raise HyperrealError(f"{meta} line {n}: '{name}' has no caption ('text')")
            img = p / name
            if not img.is_file():
                raise HyperrealError(f"{meta} line {n}: image '{name}' is not in {p}")
            cond = row.get("conditioning_image")
            if cond and not (p / cond).is_file():
                raise HyperrealError(f"{meta} line {n}: conditioning image '{cond}' is not in {p}")
            examples.append(Example(img, text.strip(), p / cond if cond else None))
    else:
        images = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        missing = [f.name for f in images if not f.with_suffix(".txt").is_file()]
        if images and missing:
            raise HyperrealError(f"dataset '{p}': no caption for {', '.join(missing[:5])}"
                                 f"{' ...' if len(missing) > 5 else ''}. Put NAME.txt beside each image, or a "
                                 "metadata.jsonl with file_name and text.")
        examples = [Example(f, f.with_suffix(".txt").read_text(encoding="utf-8").strip()) for f in images]
    if not examples:
        raise HyperrealError(f"dataset '{p}' has no images (png, jpg, webp) with captions")
    for e in examples:
        try:
            with Image.open(e.image) as im:
                im.verify()
        except (UnidentifiedImageError, OSError):
            raise HyperrealError(f"'{e.image.name}' is not a readable image") from None
    return examples


def write_examples(folder: str | Path, items: list[tuple[Image.Image, str]], prefix: str = "img") -> Path:
    """Save images + captions as an imagefolder (metadata.jsonl), e.g. after editing captions in the app."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, text) in enumerate(items):
        name = f"{prefix}{i:04d}.png"
        img.convert("RGB").save(folder / name)
        rows.append(json.dumps({"file_name": name, "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def fit_image(img: Image.Image, width: int, height: int) -> Image.Image:
    """RGB, centre-cropped to the aspect ratio and resized, as diffusers' scripts do (condition maps are computed
    on this too, so they line up with what the VAE sees)."""
    img = img.convert("RGB")
    w, h = img.size
    target = width / height
    if w / h > target:
        nw = round(h * target)
        img = img.crop(((w - nw) // 2, 0, (w - nw) // 2 + nw, h))
    elif w / h < target:
        nh = round(w / target)
        img = img.crop((0, (h - nh) // 2, w, (h - nh) // 2 + nh))
    return img.resize((width, height), Image.BICUBIC) if img.size != (width, height) else img


def image_tensor(img: Image.Image, width: int, height: int) -> torch.Tensor:
    """RGB in [-1, 1] of :func:`fit_image`."""
    arr = np.asarray(fit_image(img, width, height), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def chunks(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last may be shorter), read lazily."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


@torch.no_grad()
def encode_images(vae, images: Iterable[torch.Tensor], batch: int = 16) -> torch.Tensor:
    """Frozen-VAE latents (mean, scaled), computed once per dataset instead of every step; the images are read
    ``batch`` at a time, so only latents (64x smaller) are ever held for the whole dataset."""
    out = []
    for chunk in chunks(images, batch):
        x = torch.stack(chunk).to(vae.device, vae.dtype)
        out.append(vae.encode(x).latent_dist.mode() * vae.config.scaling_factor)
    return torch.cat(out).float().cpu()


@torch.no_grad()
def encode_prompts(pipe, texts: list[str], batch: int = 256) -> torch.Tensor:
    """Frozen text-encoder outputs for each caption, ``batch`` captions per forward pass."""
    tok = pipe.tokenizer
    out = []
    for chunk in chunks(texts, batch):
        ids = tok(chunk, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        out.append(pipe.text_encoder(ids.input_ids.to(pipe.text_encoder.device))[0].float().cpu())
    return torch.cat(out)
