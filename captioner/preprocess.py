"""Image loading and the one preprocessing definition, driven by the checkpoint's PreprocessConfig."""
from __future__ import annotations

import functools
from typing import Callable, Union

import numpy as np
import torch
from PIL import Image

from .config import PreprocessConfig
from .pixels import (MAX_ASPECT_RATIO, ImageError, PixelInput, check_shape, crop, draft,  # noqa: F401
                     load_image, resize_shorter)

ImageInput = Union[PixelInput, torch.Tensor]


def eval_transform(cfg: PreprocessConfig) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the shorter side, center-crop, normalise: PIL image -> float tensor (3, S, S). torchvision's Resize,
    CenterCrop, ToTensor and Normalize to the bit (tests/test_preprocess.py), without importing torchvision: that
    import costs a second at every start (the CLI, the service, each Ray actor)."""
    return functools.partial(_eval, cfg=cfg)


def _eval(im: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    return normalize_batch(np.array(crop(im, cfg))[None], cfg)[0]  # a copy: torch wants a writable array


def normalize_batch(pixels, cfg: PreprocessConfig,
                    memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """The tensor half of eval_transform for a batch of pixels.crop outputs, uint8 (B, S, S, 3) (a numpy array
    or tensor) -> float (B, 3, S, S) in ``memory_format``. The same float operations as ToTensor + Normalize, so
    the same bits: a pipeline may ship the 4x smaller uint8 crops between machines (or threads) and normalise
    next to the model, in one batched op."""
    x = torch.as_tensor(pixels).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
    x = x.to(torch.get_default_dtype()).div(255)
    mean = torch.as_tensor(cfg.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.as_tensor(cfg.std, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std)


def train_transform(cfg: PreprocessConfig):
    """Random crop and horizontal flip around the same resize and normalisation as evaluation."""
    from torchvision import transforms as T

    return T.Compose([
        functools.partial(resize_shorter, size=cfg.resize, interpolation=cfg.interpolation),
        T.RandomCrop(cfg.image_size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(cfg.mean, cfg.std),
    ])


def to_tensor(src: ImageInput, cfg: PreprocessConfig, transform=None) -> torch.Tensor:
    """Any supported input -> a normalised (3, S, S) tensor.

    Tensors are taken as already preprocessed when they have the model's shape (3, S, S);
    other tensors are treated as image data (uint8 0..255 or float 0..1, CHW) and preprocessed.
    """
    if isinstance(src, torch.Tensor):
        if src.dim() != 3 or src.shape[0] != 3:
            raise ImageError(f"image tensor must be (3, H, W), got {tuple(src.shape)}")
        if src.is_floating_point() and src.shape[1:] == (cfg.image_size, cfg.image_size):
            return src
        from torchvision.transforms.functional import to_pil_image

        src = to_pil_image(src if src.dtype == torch.uint8 else src.clamp(0, 1))
    return (transform or eval_transform(cfg))(load_image(src, min_side=cfg.resize))
