"""Feature cache: with a frozen encoder, v is computed once per image and reused every epoch.

The cache key covers the encoder weights, the preprocessing and the image list, so a different
encoder or crop never reads stale features.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from captioner.model import CaptionModel

from .datasets import CaptionDataset, ImageRecord, collate
from .distributed import barrier, is_main

log = logging.getLogger(__name__)


def cache_key(model: CaptionModel, records: list[ImageRecord]) -> str:
    h = hashlib.sha256()
    for k, t in sorted(model.encoder.state_dict().items()):
        h.update(k.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    h.update(b"jpeg-draft")  # how JPEGs are decoded (captioner.preprocess.draft): a change must miss the cache
    h.update(json.dumps(model.cfg.to_dict()["preprocess"], sort_keys=True).encode())
    h.update(json.dumps(model.cfg.to_dict()["encoder"], sort_keys=True).encode())
    for r in records:
        h.update(r.path.encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def compute_features(model: CaptionModel, records, device, amp_dtype, batch_size: int, workers: int):
    """v for every record (eval preprocessing) and which images could be read."""
    ds = CaptionDataset(records, model.cfg.preprocess, train=False)
    dl = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    feats = torch.zeros(len(records), model.cfg.encoder.feature_dim)
    ok = torch.zeros(len(records), dtype=torch.bool)
    was_training = model.training
    model.eval()
    for b in tqdm(dl, desc="features", disable=not is_main(), dynamic_ncols=True, leave=False):
        if b["images"].size(0):
            ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
            with ctx:
                feats[b["indices"]] = model.encode(b["images"].to(device)).float().cpu()
            ok[b["indices"]] = True
    model.train(was_training)
    return feats, ok


def cached_features(model, records, cache_dir, device, amp_dtype, batch_size=64, workers=2) -> dict:
    path = Path(cache_dir) / f"{cache_key(model, records)}.safetensors"
    if not path.is_file():
        if is_main():
            log.info("computing features for %d images -> %s", len(records), path)
            feats, ok = compute_features(model, records, device, amp_dtype, batch_size, workers)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file({"features": feats, "ok": ok}, str(tmp))
            os.replace(tmp, path)
        barrier()
    else:
        log.info("using cached features %s", path)
    return load_file(str(path))


class FeatureDataset(Dataset):
    """Items look like CaptionDataset's, with v in place of the image."""

    def __init__(self, cache: dict) -> None:
        self.feats, self.ok = cache["features"], cache["ok"]

    @classmethod
    def placeholder(cls, n: int) -> "FeatureDataset":
        """n readable items with a dummy feature, for runs that never look at the image."""
        return cls({"features": torch.zeros(n, 1), "ok": torch.ones(n, dtype=torch.bool)})

    def __len__(self) -> int:
        return len(self.feats)

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "image": self.feats[i], "ok": bool(self.ok[i]), "error": "unreadable image"}

    @staticmethod
    def collate(items):
        out = collate(items)
        out["is_features"] = True
        return out
