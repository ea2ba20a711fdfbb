"""Pixels without torch: open an image (path, bytes or PIL) with clear errors, and the resize + centre crop of the
one preprocessing definition (preprocess.py builds its tensor transforms on these). Ray's decode tasks use this
module alone, so they start without importing torch."""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
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
        return decode_rgb(src)
    if isinstance(src, (bytes, bytearray)):
        fp, name = io.BytesIO(src), "<bytes>"
        if not src:
            raise ImageError("empty image data")
    elif isinstance(src, (str, os.PathLike)):
        name = str(src)
        if not Path(src).is_file():  # only regular files are opened: a FIFO or a device would block or never end
            raise ImageError(f"{name}: not a regular file" if os.path.exists(src) else f"{name}: no such file")
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
            return decode_rgb(im, min_side, name)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: corrupt or truncated image ({e})") from None


ORIENTATION = 0x0112  # the EXIF tag

# A JPEG of a flat colour, progressive and optimised, holds ~250 pixels per byte; one claiming more than 8x that
# lacks its data: libjpeg would only warn ("premature end of data") and fill the rest with grey.
MAX_JPEG_PIXELS_PER_BYTE = 2048


def decode_rgb(im: Image.Image, min_side: int | None = None, name: str = "image") -> Image.Image:
    """An opened (header-only) image -> the RGB picture a person sees, for every path that feeds a model (API,
    CLI, Ray, service, training): decoded at reduced scale where possible (``draft``), turned upright by its EXIF
    orientation (phone photos are stored sideways with a tag saying so), 16-bit and float pixels scaled to 8 bits
    instead of saturated, and a JPEG that lacks most of its data refused instead of filled with grey."""
    check_has_data(im, name)
    draft(im, min_side)
    im.load()  # decodes: truncated or corrupt data fails here
    im = _reduce_huge(im, min_side)
    if im.getexif().get(ORIENTATION, 1) != 1:  # exif_transpose would copy even an upright image
        im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        im = Image.fromarray(_to_uint8(np.asarray(im), im.mode))
    return im.convert("RGB")


# Formats other than JPEG cannot decode at reduced scale: a 116 KB PNG may hold 40 Mpx. Past this many pixels the
# decoded image is box-reduced by an integer factor (keeping the shorter side >= min_side) before any conversion,
# so the RGB copy, the EXIF turn and the resize work on the small image; smaller images are untouched (same bits).
REDUCE_ABOVE_PIXELS = 16_000_000


def _reduce_huge(im: Image.Image, min_side: int | None) -> Image.Image:
    if not min_side or im.width * im.height <= REDUCE_ABOVE_PIXELS:
        return im
    factor = min(im.size) // min_side
    if factor < 2:
        return im
    if im.mode.startswith("I;16"):  # reduce() takes 32-bit ints, not 16-bit ones
        im = im.convert("I")
    elif im.mode not in ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "I", "F"):  # P, 1, ...: reduce() refuses them
        im = im.convert("RGBA" if "A" in im.getbands() or "transparency" in im.info else "RGB")
    return im.reduce(factor)


def decoded_bytes(im: Image.Image) -> int:
    """About the most memory decode_rgb needs for an opened (and drafted) image: its pixels as PIL stores them
    (1 byte for grey and palette images, 2 for 16-bit grey, 4 for everything else: PIL keeps RGB as RGBX) plus
    an RGB copy (small when _reduce_huge applies first, which this does not count on)."""
    if im.mode in ("1", "L", "P"):
        size = 1
    else:
        size = 2 if im.mode.startswith("I;16") else 4
    return im.width * im.height * (size + 4)


def check_has_data(im: Image.Image, name: str = "image") -> None:
    """Refuse an opened, not yet drafted JPEG whose header promises far more pixels than its file can hold."""
    if isinstance(im, JpegImageFile) and im.tile:
        size = getattr(im.fp, "seek", None) and _stream_size(im.fp)
        if size and im.width * im.height > MAX_JPEG_PIXELS_PER_BYTE * size:
            raise ImageError(f"{name}: truncated JPEG: its header says {im.width}x{im.height} but the file holds "
                             f"only {size} bytes")


def _stream_size(fp) -> int | None:
    try:
        pos = fp.tell()
        fp.seek(0, os.SEEK_END)
        size = fp.tell()
        fp.seek(pos)
        return size
    except (OSError, ValueError):
        return None


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Grey pixels of 16-bit, 32-bit int or float images -> 0..255: 16-bit by 257 (65535 -> 255); float images
    in 0..1 (the usual convention) by 255, others clipped; 32-bit ints as 16-bit (PNG/TIFF keep 16 bits there)."""
    a = a.astype(np.float32)
    if mode == "F":
        finite = a[np.isfinite(a)]
        a = np.nan_to_num(a, nan=0.0)
        if finite.size and finite.min() >= 0 and finite.max() <= 1:
            a = a * 255
    else:
        a = a / 257
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


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
