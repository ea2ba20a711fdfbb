"""Pixels without torch: open an image (path, bytes or PIL) with clear errors, and the resize + centre crop of the
one preprocessing definition (preprocess.py builds its tensor transforms on these). Ray's decode tasks use this
module alone, so they start without importing torch."""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Union

from PIL import Image, UnidentifiedImageError
from PIL.JpegImagePlugin import JpegImageFile

from .config import PreprocessConfig

PixelInput = Union[str, os.PathLike, bytes, bytearray, Image.Image]


class ImageError(ValueError):
    """An input that is not a readable image; the message says why."""


def draft(im: Image.Image, min_side: int | None) -> None:
    """Let a not yet decoded JPEG decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) when that still leaves
    at least ``min_side`` pixels on its shorter side. The resize to ``min_side`` that follows then starts from
    fewer pixels: decoding gets 2-4x cheaper and the result differs by about one grey level on average.
    Every path that feeds a model (API, CLI, service, training) decodes this way, so they see the same pixels."""
    if min_side and isinstance(im, JpegImageFile):
        scale = min_side / min(im.size)
        if scale <= 0.5:
            im.draft("RGB", (math.ceil(im.width * scale), math.ceil(im.height * scale)))


# Resizing the shorter side to ``resize`` scales the longer one by the same factor: a 1x20000 PNG of 118 bytes would
# become a 128x2,560,000 strip (1 GB). At 100:1 the strip is at most 256x25,600 (20 MB); photos stay far below it
# (panoramas ~ 4:1-8:1), and only the centre square of a stranger shape is ever seen by the model.
MAX_ASPECT_RATIO = 100.0


def check_shape(w: int, h: int, min_side: int | None, max_aspect: float | None = MAX_ASPECT_RATIO) -> None:
    """Refuse, before any pixel is decoded, a w x h image the resize to ``min_side`` would blow up."""
    if w < 1 or h < 1:
        raise ImageError(f"image has no pixels ({w}x{h})")
    if min_side and max_aspect and max(w, h) > max_aspect * min(w, h):
        long = math.ceil(min_side * max(w, h) / min(w, h))
        size = f"{long}x{min_side}" if w > h else f"{min_side}x{long}"
        raise ImageError(f"image is {w}x{h}, an aspect ratio of {max(w, h) / min(w, h):,.1f}:1; the limit is "
                         f"{max_aspect:g}:1 (preprocessing would resize it to {size} pixels)")


def load_image(src: PixelInput, max_pixels: int | None = 178_956_970, min_side: int | None = None,
               max_aspect: float | None = MAX_ASPECT_RATIO) -> Image.Image:
    """Open a path, bytes or PIL image as an RGB PIL image, with a clear error for bad input. ``min_side``: the
    shorter side the caller resizes to next (PreprocessConfig.resize), which lets JPEGs decode at reduced scale;
    with it, images more elongated than ``max_aspect``:1 are refused before decoding (check_shape)."""
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    if isinstance(src, (bytes, bytearray)):
        fp, name = io.BytesIO(src), "<bytes>"
        if not src:
            raise ImageError("empty image data")
    elif isinstance(src, (str, os.PathLike)):
        name = str(src)
        if not Path(src).is_file():
            raise ImageError(f"{name}: no such file")
        fp = name
    else:
        raise ImageError(f"unsupported image input type {type(src).__name__}")
    try:
        with Image.open(fp) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise ImageError(f"{name}: {im.width}x{im.height} exceeds the {max_pixels}-pixel limit")
            try:
                check_shape(im.width, im.height, min_side, max_aspect)
            except ImageError as e:
                raise ImageError(f"{name}: {e}") from None
            draft(im, min_side)
            return im.convert("RGB")  # forces a full decode, so truncated files fail here
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: corrupt or truncated image ({e})") from None


# torchvision's InterpolationMode -> PIL's filter, as torchvision maps them for PIL images
_PIL_FILTERS = {"nearest": Image.NEAREST, "nearest-exact": Image.NEAREST, "bilinear": Image.BILINEAR,
                "bicubic": Image.BICUBIC, "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


def resize_shorter(im: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """The shorter side to ``size``, the longer one scaled and truncated: torchvision's Resize(size) on a PIL image,
    to the pixel (PIL always antialiases)."""
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new = (size, new_long) if w <= h else (new_long, size)
    if new == (w, h):
        return im
    if interpolation not in _PIL_FILTERS:
        raise ValueError(f"unknown interpolation {interpolation!r}; one of {', '.join(_PIL_FILTERS)}")
    return im.resize(new, _PIL_FILTERS[interpolation])


def center_crop(im: Image.Image, size: int) -> Image.Image:
    """The centre size x size square: torchvision's CenterCrop(size) (a smaller image is padded with black)."""
    w, h = im.size
    if size > w or size > h:  # only when resize < image_size: a config no shipped model has
        padded = Image.new(im.mode, (max(w, size), max(h, size)))
        padded.paste(im, ((size - w) // 2 if size > w else 0, (size - h) // 2 if size > h else 0))
        im, (w, h) = padded, padded.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def crop(im: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """The pixel half of evaluation preprocessing: resize the shorter side to cfg.resize, centre-crop cfg.image_size."""
    return center_crop(resize_shorter(im, cfg.resize, cfg.interpolation), cfg.image_size)
