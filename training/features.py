"""Feature cache: with a frozen encoder, v is computed once per image and reused every epoch.

The cache key covers the encoder weights, the preprocessing and the image list, so a different
encoder or crop never reads stale features. Besides the evaluation view (view 0: the centre crop),
training can cache augmented views (random crop + flip, as the unfrozen encoder would see): each
view is one file, drawn with its own seed, so caching more views later reuses the ones already there.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from captioner.fileio import atomic_write
from captioner.model import CaptionModel
from captioner.preprocess import train_transform

from .datasets import CaptionDataset, ImageRecord, collate
from .distributed import barrier, is_main

log = logging.getLogger(__name__)


def cache_key(model: CaptionModel, records: list[ImageRecord], view: int = 0) -> str:
    h = hashlib.sha256()
    if view:
        h.update(f"augmented view {view}".encode())
    for k, t in sorted(model.encoder.state_dict().items()):
        h.update(k.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    # how images are decoded (captioner.pixels.decode_rgb: JPEG draft, EXIF upright, 16-bit scaled): a change must
    # miss the cache
    h.update(b"jpeg-draft exif-upright deep-pixels-scaled")
    h.update(json.dumps(model.cfg.to_dict()["preprocess"], sort_keys=True).encode())
    h.update(json.dumps(model.cfg.to_dict()["encoder"], sort_keys=True).encode())
    if model.cfg.attention:  # the grid, not v
        h.update(b"grid")
    for r in records:
        h.update(r.path.encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def compute_features(model: CaptionModel, records, device, amp_dtype, batch_size: int, workers: int, view: int = 0):
    """v for every record and which images could be read: view 0 is the evaluation crop, view k > 0 a random
    training crop + flip drawn from seed k (in the workers through the loader's generator, else the global RNG)."""
    ds = CaptionDataset(records, model.cfg.preprocess, train=False,
                        transform=train_transform(model.cfg.preprocess) if view else None)
    dl = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                    generator=torch.Generator().manual_seed(view))
    # an attention model's grid (C, S, S) is 49x the size of v: kept in fp16 (its values are ReLU outputs of a
    # bf16/fp16-autocast encoder anyway), v in float32 as before
    dtype = torch.float16 if model.cfg.attention else torch.float32
    feats = torch.zeros(len(records), *model.cfg.feature_shape, dtype=dtype)
    ok = torch.zeros(len(records), dtype=torch.bool)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(enabled=view > 0):
        if view:
            torch.manual_seed(view)
        for b in tqdm(dl, desc="features", disable=not is_main(), dynamic_ncols=True, leave=False):
            if b["images"].size(0):
                ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
                with ctx:
                    feats[b["indices"]] = model.encode(b["images"].to(device)).float().cpu().to(dtype)
                ok[b["indices"]] = True
    model.train(was_training)
    return feats, ok


def cached_features(model, records, cache_dir, device, amp_dtype, batch_size=64, workers=2, views: int = 1) -> dict:
    """{"features": (N, *feature_shape), "ok": (N,)} for the evaluation view; with views > 1, "features" is
    (views, N, ...)."""
    caches = [_cached_view(model, records, cache_dir, device, amp_dtype, batch_size, workers, k) for k in range(views)]
    if views == 1:
        return caches[0]
    return {"features": torch.stack([c["features"] for c in caches]), "ok": caches[0]["ok"], "views": True}


def _cached_view(model, records, cache_dir, device, amp_dtype, batch_size, workers, view: int) -> dict:
    path = Path(cache_dir) / f"{cache_key(model, records, view)}.safetensors"
    if not path.is_file():
        if is_main():
            log.info("computing features for %d images%s -> %s", len(records),
                     f" (augmented view {view})" if view else "", path)
            feats, ok = compute_features(model, records, device, amp_dtype, batch_size, workers, view)
            atomic_write(path, lambda tmp: save_file({"features": feats, "ok": ok}, tmp))
        barrier()
    else:
        log.info("using cached features %s", path)
    return load_file(str(path))


class FeatureDataset(Dataset):
    """Items look like CaptionDataset's, with the features (v, or an attention model's fp16 grid, as float32) in
    place of the image; with several cached views (V, N, ...), each item is one view drawn at random, as an
    augmenting image dataset would give."""

    def __init__(self, cache: dict) -> None:
        self.feats, self.ok = cache["features"], cache["ok"]
        self.views = self.feats.size(0) if cache.get("views") else 0

    @classmethod
    def placeholder(cls, n: int) -> "FeatureDataset":
        """n readable items with a dummy feature, for runs that never look at the image."""
        return cls({"features": torch.zeros(n, 1), "ok": torch.ones(n, dtype=torch.bool)})

    def __len__(self) -> int:
        return len(self.ok)

    def __getitem__(self, i: int) -> dict:
        v = self.feats[int(torch.randint(self.views, ()))][i] if self.views else self.feats[i]
        return {"index": i, "image": v.float(), "ok": bool(self.ok[i]), "error": "unreadable image"}

    @staticmethod
    def collate(items):
        out = collate(items)
        out["is_features"] = True
        return out
