"""Small generic fixtures shared by the test suite."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def make_images(tmp_path: Path):
    """make_images(n, subdir="images", size=(48, 40), prefix="img") -> list of n random-JPEG paths under tmp_path."""

    def make(n: int, subdir: str = "images", size: tuple[int, int] = (48, 40), prefix: str = "img") -> list[Path]:
        folder = tmp_path / subdir
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        paths = []
        for i in range(n):
            p = folder / f"{prefix}{i}.jpg"
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p, quality=90)
            paths.append(p)
        return paths

    return make


TINY_WORDS = ["a", "dog", "cat", "runs", "on", "the", "grass", "man", "red", "ball", "in", "water", "two", "people"]


def tiny_model_config(cell: str = "lstm", **decoder):
    """A small compact-encoder config (32 px input) that builds and runs in milliseconds."""
    from captioner.config import preset

    cfg = preset("compact", cell=cell, embed_dim=16, hidden_dim=24, **decoder)
    cfg.encoder.layers = [8, "M", 16, "M", 16, "M"]
    cfg.encoder.fc_dims = [32]
    cfg.preprocess.image_size, cfg.preprocess.resize = 32, 36
    cfg.vocab_size = 4 + len(TINY_WORDS)
    cfg.max_length = 8
    return cfg


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Directory of a random tiny caption model (config.json, vocab.json, model.safetensors)."""
    import torch

    from captioner.checkpoint import save_pretrained
    from captioner.model import CaptionModel
    from captioner.tokenizer import Vocabulary

    torch.manual_seed(0)
    model = CaptionModel(tiny_model_config())
    # larger image weights make v matter more (random weights still give near-identical captions)
    with torch.no_grad():
        model.decoder.layers[0].W_ih.weight.mul_(30)
    return save_pretrained(model, Vocabulary(TINY_WORDS), tmp_path / "tiny-ckpt")


@pytest.fixture
def one_thread():
    """One torch thread for the test: on tiny tensors thread hand-offs cost more than they save on a shared CPU."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
