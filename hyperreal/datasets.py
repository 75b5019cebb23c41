"""Captioned image folders, in the formats other tools use, and the frozen-model caches built from them.

A dataset is a folder (or a .zip of one) of images with captions from either
- ``metadata.jsonl`` (the Hugging Face imagefolder convention: ``file_name``, ``text``; optional
  ``conditioning_image``), or
- ``NAME.txt`` beside ``NAME.png`` (kohya's convention).
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from .errors import HyperrealError
from .images import open_image
from .safety import unzip, within

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class Example:
    image: Path
    text: str
    conditioning_image: Path | None = None


def read_text(path: Path, what: str | None = None) -> str:
    """A caption or list file as text: UTF-8 (a BOM is fine), else a message naming the file."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise HyperrealError(f"'{what or path.name}' is not UTF-8 text: save it as UTF-8 (most editors offer it "
                             "under 'Save as')") from None


def unpack(data: str | Path, into: str | Path) -> Path:
    """A dataset as a folder: a .zip is unpacked (within limits, see safety.unzip) into ``into``; a folder stays."""
    p = Path(data)
    if p.is_file() and p.suffix.lower() == ".zip":
        return unzip(p, into)
    return p


def load_examples(path: str | Path) -> list[Example]:
    """All (image, caption) pairs of a dataset folder, with a clear error for each way it can be wrong (every image
    is decoded once here, so a damaged one is named before anything loads). Zips: :func:`unpack` first."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".zip":
        raise HyperrealError(f"dataset '{path}' is a .zip: unpack it first (the command line and the app do)")
    if not p.is_dir():
        raise HyperrealError(f"dataset '{path}' is not a folder or a .zip")
    meta = p / "metadata.jsonl"
    examples: list[Example] = []
    if meta.is_file():
        # lines end at "\n" only: a caption may hold U+2028 or U+0085, which str.splitlines() would also cut at
        for n, line in enumerate(read_text(meta).split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, text = row["file_name"], row.get("text", row.get("caption"))
            except (ValueError, KeyError, TypeError, RecursionError):  # JSONDecodeError is a ValueError
                raise HyperrealError(f"{meta} line {n}: expected {{\"file_name\": ..., \"text\": ...}}") from None
            if not isinstance(text, str) or not isinstance(name, str):
                raise HyperrealError(f"{meta} line {n}: '{name}' has no caption ('text')")
            img = within(p / name, p, what=f"{meta} line {n}: the image")
            if not img.is_file():
                raise HyperrealError(f"{meta} line {n}: image '{name}' is not in {p}")
            cond = row.get("conditioning_image")
            if cond is not None and not isinstance(cond, str):
                raise HyperrealError(f"{meta} line {n}: 'conditioning_image' must be a file name")
            cond_path = within(p / cond, p, what=f"{meta} line {n}: the conditioning image") if cond else None
            if cond_path is not None and not cond_path.is_file():
                raise HyperrealError(f"{meta} line {n}: conditioning image '{cond}' is not in {p}")
            examples.append(Example(img, text.strip(), cond_path))
    else:
        # links that lead out of the folder are refused, as in metadata.jsonl
        images = sorted(within(f, p, what="image") for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        missing = [f.name for f in images if not f.with_suffix(".txt").is_file()]
        if images and missing:
            raise HyperrealError(f"dataset '{p}': no caption for {', '.join(missing[:5])}"
                                 f"{' ...' if len(missing) > 5 else ''}. Put NAME.txt beside each image, or a "
                                 "metadata.jsonl with file_name and text.")
        examples = [Example(f, read_text(within(f.with_suffix(".txt"), p, what="caption")).strip()) for f in images]
    if not examples:
        raise HyperrealError(f"dataset '{p}' has no images (png, jpg, webp) with captions")
    for e in examples:
        open_image(e.image)
        if e.conditioning_image is not None:
            open_image(e.conditioning_image)
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
