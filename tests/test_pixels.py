"""One photo is one picture everywhere (captioner.pixels.decode_rgb): EXIF orientation applied, 16-bit and float
pixels scaled, a JPEG without its data refused, FIFOs never opened; through the Python API, the dataset that the
batch CLI, training and evaluation share, the service's upload path and Ray's decode task."""
from __future__ import annotations

import io
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.config import PreprocessConfig
from captioner.data import ImageDataset
from captioner.pixels import ImageError, load_image
from captioner.preprocess import eval_transform, normalize_batch, to_tensor

PRE = PreprocessConfig(image_size=32, resize=36)


def upright() -> Image.Image:
    """An asymmetric picture: red top-left quarter, the rest green-ish noise, 60 wide and 40 high."""
    a = np.zeros((40, 60, 3), np.uint8)
    a[..., 1] = np.random.default_rng(0).integers(60, 200, (40, 60))
    a[:20, :30] = (255, 0, 0)
    return Image.fromarray(a)


def stored_sideways(path) -> None:
    """The picture as a phone stores it: pixels rotated, EXIF orientation 6 ("rotate 90 CW to view")."""
    exif = Image.Exif()
    exif[0x0112] = 6
    upright().transpose(Image.ROTATE_90).save(path, "JPEG", quality=95, exif=exif.tobytes())


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().mean()) < 0.05  # JPEG noise, not a rotation (which moves the red quarter)


def test_exif_orientation_is_applied_in_every_path(tmp_path):
    phone, ref = tmp_path / "phone.jpg", tmp_path / "upright.jpg"
    stored_sideways(phone)
    upright().save(ref, "JPEG", quality=95)
    assert load_image(phone).size == (60, 40)
    want = to_tensor(str(ref), PRE)
    assert not _close(eval_transform(PRE)(Image.open(phone).convert("RGB")), want)  # the stored pixels differ
    assert _close(to_tensor(str(phone), PRE), want)  # Python API (Captioner.caption goes through to_tensor)
    assert _close(to_tensor(Image.open(phone), PRE), want)  # a PIL image handed in
    ds = ImageDataset([str(phone)], eval_transform(PRE), PRE.resize)  # batch CLI, training, evaluation
    assert _close(ds[0]["image"], want)
    from service.images import load_upload  # the service
    assert _close(normalize_batch(load_upload(phone.read_bytes(), PRE, 1 << 24, 1 << 26)[None], PRE)[0], want)
    pytest.importorskip("ray")
    import pyarrow as pa

    from captioner.ray import _decode  # Ray's decode task
    out = _decode(pa.table({"path": [str(phone)]}), PRE, 0)
    pixels = np.frombuffer(out.column("image")[0].as_py(), np.uint8).copy().reshape(1, 32, 32, 3)
    assert _close(normalize_batch(pixels, PRE)[0], want)


def grey16_png(path, value: int) -> None:
    Image.fromarray(np.full((40, 40), value, np.uint16)).save(path)


def test_16_bit_and_float_images_are_scaled_not_saturated(tmp_path):
    grey16_png(tmp_path / "g16.png", 32768)  # mid grey in 16 bits
    im = Image.open(tmp_path / "g16.png")
    assert im.mode.startswith("I")
    assert np.asarray(load_image(tmp_path / "g16.png")).mean() == pytest.approx(127.5, abs=1)
    Image.fromarray(np.full((40, 40), 0.5, np.float32)).save(tmp_path / "f.tiff")  # float TIFF, 0..1
    assert np.asarray(load_image(tmp_path / "f.tiff")).mean() == pytest.approx(127.5, abs=1)
    Image.fromarray(np.full((40, 40), 200.0, np.float32)).save(tmp_path / "f255.tiff")  # float TIFF, 0..255
    assert np.asarray(load_image(tmp_path / "f255.tiff")).mean() == pytest.approx(200, abs=1)
    Image.fromarray(np.full((40, 40), 100, np.uint8)).save(tmp_path / "g8.png")  # 8-bit untouched
    assert np.asarray(load_image(tmp_path / "g8.png")).mean() == 100


def jpeg_claiming(w: int, h: int) -> bytes:
    """A real 64x48 JPEG whose frame header claims w x h: libjpeg decodes 64x48 of data and fills the rest."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def test_a_jpeg_without_its_data_is_refused_everywhere(tmp_path):
    bad = tmp_path / "claims-6300.jpg"
    bad.write_bytes(jpeg_claiming(6300, 6300))
    with pytest.raises(ImageError, match="truncated JPEG"):
        load_image(bad)
    item = ImageDataset([str(bad)], eval_transform(PRE), PRE.resize, warn=False)[0]
    assert not item["ok"] and "truncated JPEG" in item["error"]
    from service.images import ImageRejected, load_upload
    with pytest.raises(ImageRejected) as e:
        load_upload(bad.read_bytes(), PRE, 1 << 24, 1 << 26)
    assert e.value.status == 422 and "truncated JPEG" in e.value.message
    # a flat JPEG, as compressible as JPEG gets, is still a photo
    flat = io.BytesIO()
    Image.new("L", (2000, 2000), 0).save(flat, "JPEG", quality=1, progressive=True, optimize=True)
    assert load_image(flat.getvalue()).size == (2000, 2000)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_a_fifo_is_never_opened(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # opening it for reading would block forever: no writer
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(fifo)
    from captioner.cli.writers import attention_strip, thumbnail_jpeg
    assert thumbnail_jpeg(str(fifo)) is None and attention_strip(str(fifo), [[[1.0]]], 0.875) is None

