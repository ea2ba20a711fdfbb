"""Image decoding: reduced-scale JPEG decoding (draft) and the same pixels on every path into a model."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.data import ImageDataset
from captioner.config import PreprocessConfig
from captioner.preprocess import ImageError, eval_transform, load_image, to_tensor
from service.images import load_upload
from training.datasets import CaptionDataset, ImageRecord

CFG = PreprocessConfig(image_size=56, resize=64)


def _photo(w=640, h=480, seed=0) -> Image.Image:
    """Smooth gradients plus noise: JPEG-like content whose downscales are well defined."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1) + rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


@pytest.fixture
def jpeg(tmp_path):
    path = tmp_path / "photo.jpg"
    _photo().save(path, quality=90)
    return path


def test_big_jpeg_decodes_at_reduced_scale(jpeg):
    full = load_image(jpeg)
    small = load_image(jpeg, min_side=64)
    assert full.size == (640, 480)
    assert small.size == (160, 120)  # 1/4 scale: the smallest that keeps >= 64 px (1/8 would give 60)
    assert min(load_image(jpeg, min_side=200).size) >= 200


def test_no_reduced_decoding_when_it_would_go_below_the_resize(jpeg, tmp_path):
    assert load_image(jpeg, min_side=300).size == (640, 480)  # 1/2 would give 240 < 300
    png = tmp_path / "photo.png"
    _photo().save(png)
    assert load_image(png, min_side=64).size == (640, 480)  # only JPEG has DCT scaling


def test_reduced_decoding_changes_pixels_very_little(jpeg):
    tf = eval_transform(CFG)
    full = tf(load_image(jpeg))
    fast = tf(load_image(jpeg, min_side=CFG.resize))
    std = torch.tensor(CFG.std)[:, None, None]
    diff = ((full - fast).abs() * std).mean().item()  # in 0..1 pixel units
    assert diff < 2 / 255, diff


def test_every_path_into_the_model_sees_the_same_pixels(jpeg):
    data = jpeg.read_bytes()
    ref = to_tensor(str(jpeg), CFG)
    tf = eval_transform(CFG)
    others = {
        "api bytes": to_tensor(data, CFG),
        "service": load_upload(data, CFG, tf, max_bytes=10**7, max_pixels=10**7),
        "training": CaptionDataset([ImageRecord(image_id=1, path=str(jpeg), captions=[])], CFG)[0]["image"],
        "cli": ImageDataset([str(jpeg)], tf, CFG.resize, warn=False)[0]["image"],  # as captioner.cli.caption builds it
    }
    for name, x in others.items():
        assert torch.equal(ref, x), name
    assert not torch.equal(ref, tf(load_image(jpeg)))  # the reduced decoding did happen


def test_truncated_jpeg_is_still_an_error_with_reduced_decoding(jpeg, tmp_path):
    buf = io.BytesIO()
    _photo().save(buf, format="JPEG", quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(cut, min_side=64)
