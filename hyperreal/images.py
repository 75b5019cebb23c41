"""The one way a file a person gives becomes an image: training images, condition maps, uploads, jobs' images.

Every image is decoded whole here (a truncated file fails now, not in the middle of training), turned upright by
its EXIF orientation (phone photos), brought to 8-bit RGB with 16-bit and float images scaled rather than
clipped, transparent parts put on white, and refused, with a message naming it, when it is empty, not an image,
truncated, or larger than ``MAX_PIXELS`` (a decompression bomb).
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import HyperrealError

# 64 megapixels (8192 x 8192): far above any training or condition image, far below what a bomb expands to
MAX_PIXELS = int(os.environ.get("HYPERREAL_MAX_IMAGE_PIXELS", str(64 * 1024 * 1024)))
# Pillow's own guard (an error at twice its limit) must not be lower than ours, or raising ours does nothing
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def _eight_bit(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float images scaled to 0-255 (``convert`` would clip them to near white)."""
    if im.mode in SIXTEEN_BIT:
        return Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8), "L")
    if im.mode == "I":  # what Pillow makes of most 16-bit grayscale PNGs
        arr = np.asarray(im, dtype=np.int64)
        top = 255 if arr.max(initial=0) <= 255 else 65535 if arr.max() <= 65535 else int(arr.max())
        return Image.fromarray(np.clip(arr * 255 // max(top, 1), 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        with np.errstate(invalid="ignore", over="ignore"):
            arr = np.nan_to_num(np.asarray(im, dtype=np.float64))
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(arr * scale, 0, 255).round().astype(np.uint8), "L")
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB, transparency over white."""
    im = _eight_bit(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def open_image(source, what: str | None = None) -> Image.Image:
    """An upright 8-bit RGB image from a path, a file object, bytes or a PIL image (see the module's docstring)."""
    name = what or (Path(source).name if isinstance(source, (str, os.PathLike)) else "the image")
    if isinstance(source, Image.Image):
        im = source
    else:
        if isinstance(source, (bytes, bytearray)):
            source = io.BytesIO(source)
        try:
            with warnings.catch_warnings():  # the size is checked below, against MAX_PIXELS
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(source)
        except FileNotFoundError:
            raise HyperrealError(f"'{name}' does not exist") from None
        except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning, OSError,
                ValueError, SyntaxError) as e:
            why = ("it is larger than this app decodes (a decompression bomb?)" if "ecompression" in type(e).__name__
                   else "it is empty or not an image file (png, jpg, webp, bmp)")
            raise HyperrealError(f"'{name}' cannot be read: {why}") from None
    if im.width * im.height > MAX_PIXELS:
        raise HyperrealError(f"'{name}' is {im.width}x{im.height} pixels, more than the {MAX_PIXELS:,} this app "
                             "decodes; make it smaller (HYPERREAL_MAX_IMAGE_PIXELS raises the limit)")
    try:
        im.load()  # the whole file now: a truncated one fails here, with its name
        im = ImageOps.exif_transpose(im)
        return to_rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise HyperrealError(f"'{name}' cannot be read: it is truncated or damaged ({str(e)[:80]})") from None
