"""Uploaded bytes -> the model's input pixels, with the limits and messages the API promises.

Runs in a worker thread (decoding a large JPEG takes milliseconds to seconds). Never fetches URLs: the only
input is the bytes the client sent.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import ctypes
import io
import threading
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from captioner.config import PreprocessConfig
from captioner.pixels import check_has_data, crop, decode_rgb, decoded_bytes
from captioner.preprocess import MAX_ASPECT_RATIO, ImageError, check_shape, draft

# formats PIL decodes safely from memory; others (EPS needs Ghostscript, PDF, ...) are refused
ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"}


class ImageRejected(Exception):
    """An upload the service will not use. ``status``: 413 too large, 415 unsupported format, 422 corrupt."""

    def __init__(self, status: int, message: str, field: str = "image", kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.kind = kind or {413: "too_large", 415: "unsupported_format"}.get(status, "invalid_image")


def decode_base64(text: object, max_bytes: int) -> bytes:
    """A JSON ``image`` field (plain base64 or a data: URL) -> bytes; never a URL fetch."""
    if not isinstance(text, str) or not text:
        raise ImageRejected(422, "image must be a non-empty base64 string")
    if text.startswith(("http://", "https://", "ftp://", "file:")):
        raise ImageRejected(422, "image must be base64 data: the service does not fetch URLs")
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise ImageRejected(422, "data URL must be base64-encoded (data:image/...;base64,...)")
    if len(text) > (max_bytes + 2) // 3 * 4 + 4:
        raise ImageRejected(413, f"image is larger than the {max_bytes}-byte upload limit")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageRejected(422, f"image is not valid base64 ({e})") from None


def load_upload(data: bytes, cfg: PreprocessConfig, max_bytes: int, max_pixels: int,
                max_aspect: float = MAX_ASPECT_RATIO, budget: "ByteBudget | None" = None,
                timeout: float | None = None) -> np.ndarray:
    """Bytes -> the resized, center-cropped uint8 pixels (S, S, 3) (pixels.crop); the engine normalises a whole
    batch of them next to the model (preprocess.normalize_batch: the same bits as eval_transform). Torch stays
    out of these threads: a tensor op in a thread other than the model's starts its own OpenMP team, which
    costs ~6x the op on an idle machine and spins against the model's threads on a busy one.

    Raises ImageRejected with the status and reason. Every limit is checked from the header, before a pixel is
    decoded; the decode then waits (up to ``timeout`` s) for its decoded bytes to fit in ``budget``, which bounds
    the memory of many large images at once."""
    if not data:
        raise ImageRejected(422, "image is empty")
    if len(data) > max_bytes:
        raise ImageRejected(413, f"image is {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        raise ImageRejected(415, "not a recognised image format (send JPEG, PNG, WebP, GIF, BMP or TIFF)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected(413, f"image has too many pixels ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageRejected(422, f"corrupt image header ({e})") from None
    with im:
        if im.format not in ALLOWED_FORMATS:
            raise ImageRejected(415, f"image format {im.format} is not accepted (send JPEG, PNG, WebP, GIF, BMP or TIFF)")
        w, h = im.size
        if w * h > max_pixels:  # checked before decoding: a decompression bomb never gets expanded
            raise ImageRejected(413, f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
        try:  # and what the resize would make of it: a thin strip of a few bytes can resize to gigabytes
            check_shape(w, h, cfg.resize, max_aspect)
        except ImageError as e:
            raise ImageRejected(422, str(e), kind="aspect_ratio" if w and h else "invalid_image") from None
        try:
            check_has_data(im)
        except ImageError as e:
            raise ImageRejected(422, str(e)) from None
        draft(im, cfg.resize)  # JPEG: the scale it will decode at, so the estimate below is of that
        with budget.hold(decoded_bytes(im), timeout) if budget else contextlib.nullcontext():
            try:
                rgb = decode_rgb(im, cfg.resize)  # upright, 8-bit RGB; truncated or corrupt data fails here
            except ImageError as e:
                raise ImageRejected(422, str(e)) from None
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                raise ImageRejected(422, f"corrupt or truncated {im.format} image ({e})") from None
            finally:
                im.close()  # the full-size decoded pixels go while the budget is held: its release may trim memory
            return np.array(crop(rgb, cfg))  # a copy: torch wants a writable array


class ByteBudget:
    """At most ``limit`` bytes held at once across threads: decodes past it wait for earlier ones to finish; one
    needing more than the whole budget waits for it to be empty and runs alone. When the last holder leaves after
    a burst, freed memory is handed back to the system (glibc keeps it otherwise: 1.4 GB stayed resident 20 s
    after eight 40-Mpx PNGs)."""

    TRIM_AFTER = 64 << 20  # bytes decoded since the last trim that make returning memory worth a call

    def __init__(self, limit: int) -> None:
        self.limit, self.held, self._since_trim = limit, 0, 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int, timeout: float | None = None):
        n = min(nbytes, self.limit)
        with self._cond:
            if not self._cond.wait_for(lambda: self.held + n <= self.limit, timeout):
                raise TimeoutError("waited too long for memory to decode the image")
            self.held += n
            self._since_trim += nbytes
        try:
            yield
        finally:
            with self._cond:
                self.held -= n
                self._cond.notify_all()
                trim = self.held == 0 and self._since_trim >= self.TRIM_AFTER
                if trim:
                    self._since_trim = 0
            if trim:
                _malloc_trim()


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
