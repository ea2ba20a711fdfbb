"""The one image dataset: image files -> preprocessed tensors, for training, evaluation, distillation and the batch
CLI alike. It never raises: an unreadable file (missing, truncated, not an image, too elongated) becomes an item
that ``collate`` drops from the batch and lists in its "errors", so one bad file cannot stop a run of millions.

    ds = ImageDataset(paths, eval_transform(cfg.preprocess), min_side=cfg.preprocess.resize)
    DataLoader(ds, batch_size=32, collate_fn=collate)   # -> {"indices": (b,), "images": (b, 3, S, S), "errors": [(i, msg)]}
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from .preprocess import ImageError, load_image

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """Item i: {"index": i, "image": transform(PIL image), "ok": True}, or for an unreadable file
    {"index": i, "image": placeholder, "ok": False, "error": message}. ``min_side`` is the shorter side the
    transform resizes to (JPEGs then decode at reduced scale; see preprocess.draft). ``placeholder``: what an
    unreadable item carries (collate drops it). ``warn``: log each failure once per process."""

    def __init__(self, paths: Sequence[str], transform: Callable, min_side: int | None,
                 placeholder: torch.Tensor | None = None, warn: bool = True) -> None:
        self.paths = list(paths)
        self.transform, self.min_side = transform, min_side
        self.placeholder = placeholder if placeholder is not None else torch.zeros(0)
        self.warn = warn
        self._warned: set[int] = set()  # per process: each DataLoader worker warns on its own

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return {"index": i, "image": self.transform(load_image(self.paths[i], min_side=self.min_side)), "ok": True}
        except ImageError as e:
            msg = str(e)
        except Exception as e:  # noqa: BLE001 - anything else a strange file triggers in PIL or the transform
            msg = f"{self.paths[i]}: {type(e).__name__}: {e}"
        if self.warn and i not in self._warned:
            self._warned.add(i)
            log.warning("skipping image %d: %s", i, msg)
        return {"index": i, "image": self.placeholder, "ok": False, "error": msg}


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack the readable images of a batch; unreadable ones are dropped and listed in "errors"."""
    good = [it for it in items if it["ok"]]
    errors = [(it["index"], it["error"]) for it in items if not it["ok"]]
    if good:
        images = torch.stack([it["image"] for it in good])
    else:
        images = torch.empty((0, *items[0]["image"].shape) if items and items[0]["image"].dim() else (0, 3, 0, 0))
    return {"indices": torch.tensor([it["index"] for it in good], dtype=torch.long), "images": images,
            "errors": errors}
