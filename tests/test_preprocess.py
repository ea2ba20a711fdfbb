"""Image decoding: reduced-scale JPEG decoding (draft) and the same pixels on every path into a model."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.data import ImageDataset
from captioner.config import PreprocessConfig
from captioner.preprocess import ImageError, eval_transform, load_image, normalize_batch, to_tensor
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
        # the service: uint8 crops from its decode threads, normalised as a batch next to the model
        "service": normalize_batch(np.stack([load_upload(data, CFG, max_bytes=10**7, max_pixels=10**7)] * 2),
                                   CFG, torch.channels_last)[1],
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


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest", "lanczos"])
@pytest.mark.parametrize("size", [(640, 480), (480, 640), (64, 64), (301, 97), (50, 40)])
def test_torch_free_crop_is_torchvisions_resize_and_center_crop(interpolation, size):
    """pixels.crop runs in decode workers without torch; it must give torchvision's pixels exactly."""
    from torchvision import transforms as T

    from captioner.pixels import crop

    im = _photo(*size, seed=size[0])
    cfg = PreprocessConfig(image_size=56, resize=64, interpolation=interpolation)
    mode = T.InterpolationMode(interpolation)
    ref = T.Compose([T.Resize(cfg.resize, interpolation=mode), T.CenterCrop(cfg.image_size)])(im)
    ours = crop(im, cfg)
    assert ours.size == (56, 56)
    assert np.array_equal(np.asarray(ours), np.asarray(ref))
    small = PreprocessConfig(image_size=72, resize=64, interpolation=interpolation)  # padded like CenterCrop
    assert np.array_equal(np.asarray(crop(im, small)),
                          np.asarray(T.Compose([T.Resize(64, interpolation=mode), T.CenterCrop(72)])(im)))


def test_eval_transform_and_normalize_batch_give_torchvisions_bits():
    """eval_transform (no torchvision import) and normalize_batch (the Ray engine ships uint8 crops and normalises
    next to the model) must both give exactly what torchvision's Resize/CenterCrop/ToTensor/Normalize give."""
    from torchvision import transforms as T

    from captioner.pixels import crop
    from captioner.preprocess import normalize_batch

    ims = [_photo(320, 240, seed=s) for s in range(3)] + [_photo(200, 333, seed=3)]
    tv = T.Compose([T.Resize(CFG.resize), T.CenterCrop(CFG.image_size), T.ToTensor(), T.Normalize(CFG.mean, CFG.std)])
    ref = torch.stack([tv(im) for im in ims])
    ours = torch.stack([eval_transform(CFG)(im) for im in ims])
    assert ours.dtype == ref.dtype and torch.equal(ours, ref)
    pixels = np.stack([np.asarray(crop(im, CFG)) for im in ims])
    got = normalize_batch(pixels, CFG)
    assert got.shape == ref.shape == (4, 3, 56, 56) and got.dtype == ref.dtype
    assert torch.equal(got, ref)
    assert torch.equal(normalize_batch(torch.from_numpy(pixels), CFG), ref)
