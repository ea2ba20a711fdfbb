"""Feature cache: with a frozen encoder, each image's ImageFeatures are computed once and reused every epoch.

A cache file holds the features' fields by name (fc, and att for attention models) and which images were readable
("ok"). The cache key covers the encoder weights, the preprocessing, the fields with their shapes and the image list,
so a different encoder, crop or kind of decoder never reads stale features (files from before the fields had names
have other keys: they are recomputed, never misread). Besides the evaluation view (view 0: the centre crop),
training can cache augmented views (random crop + flip, as the unfrozen encoder would see): each view is one file,
drawn with its own seed, so caching more views later reuses the ones already there.
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

from captioner.features import ImageFeatures
from captioner.fileio import atomic_write
from captioner.model import CaptionModel
from captioner.preprocess import train_transform

from .datasets import CaptionDataset, ImageRecord, collate
from .distributed import barrier, is_main

log = logging.getLogger(__name__)

# att (P, C) is P = 49..196 times the size of fc: kept in fp16 (its values are ReLU outputs of a bf16/fp16-autocast
# encoder anyway), fc in float32
CACHE_DTYPES = {"fc": torch.float32, "att": torch.float16}


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
    # what a file holds: these fields, shapes and dtypes
    h.update(repr([(k, s, str(CACHE_DTYPES[k])) for k, s in model.cfg.feature_shapes.items()]).encode())
    for r in records:
        h.update(r.path.encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def compute_features(model: CaptionModel, records, device, amp_dtype, batch_size: int, workers: int, view: int = 0
                     ) -> tuple[ImageFeatures, torch.Tensor]:
    """The features of every record (zeros for unreadable images) and which images could be read (N,): view 0 is
    the evaluation crop, view k > 0 a random training crop + flip drawn from seed k (in the workers through the
    loader's generator, else the global RNG)."""
    ds = CaptionDataset(records, model.cfg.preprocess, train=False,
                        transform=train_transform(model.cfg.preprocess) if view else None)
    dl = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                    generator=torch.Generator().manual_seed(view))
    feats = {k: torch.zeros(len(records), *s, dtype=CACHE_DTYPES[k]) for k, s in model.cfg.feature_shapes.items()}
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
                    for k, t in model.encode(b["images"].to(device)).named().items():
                        feats[k][b["indices"]] = t.float().cpu().to(feats[k].dtype)
                ok[b["indices"]] = True
    model.train(was_training)
    return ImageFeatures(**feats), ok


def cached_features(model, records, cache_dir, device, amp_dtype, batch_size=64, workers=2, views: int = 1) -> dict:
    """{"views": [the ImageFeatures of all N records, per view, the evaluation view first], "ok": (N,)}."""
    caches = [_cached_view(model, records, cache_dir, device, amp_dtype, batch_size, workers, k) for k in range(views)]
    return {"views": [ImageFeatures(**{k: t for k, t in c.items() if k != "ok"}) for c in caches],
            "ok": caches[0]["ok"]}


def _cached_view(model, records, cache_dir, device, amp_dtype, batch_size, workers, view: int) -> dict:
    path = Path(cache_dir) / f"{cache_key(model, records, view)}.safetensors"
    if not path.is_file():
        if is_main():
            log.info("computing features for %d images%s -> %s", len(records),
                     f" (augmented view {view})" if view else "", path)
            feats, ok = compute_features(model, records, device, amp_dtype, batch_size, workers, view)
            atomic_write(path, lambda tmp: save_file({**feats.named(), "ok": ok}, tmp))
        barrier()
    else:
        log.info("using cached features %s", path)
    return load_file(str(path))


class FeatureDataset(Dataset):
    """Items look like CaptionDataset's, with the image's features (as float32) in place of its pixels; with several
    cached views, each item is one view drawn at random, as an augmenting image dataset would give."""

    def __init__(self, cache: dict) -> None:
        self.views, self.ok = cache["views"], cache["ok"]

    @classmethod
    def placeholder(cls, n: int) -> "FeatureDataset":
        """n readable items with a dummy feature, for runs that never look at the image."""
        return cls({"views": [ImageFeatures(torch.zeros(n, 1))], "ok": torch.ones(n, dtype=torch.bool)})

    def __len__(self) -> int:
        return len(self.ok)

    def __getitem__(self, i: int) -> dict:
        f = self.views[int(torch.randint(len(self.views), ()))] if len(self.views) > 1 else self.views[0]
        # features keep their image axis (1, ...): a batch is the items' ImageFeatures.cat
        return {"index": i, "features": f[i:i + 1].float(), "ok": bool(self.ok[i]), "error": "unreadable image"}

    @staticmethod
    def collate(items) -> dict:
        """The readable items as collate() gives images: {"indices", "features" (B, ...), "errors"}."""
        ok = torch.tensor([it["ok"] for it in items])
        return {"indices": torch.tensor([it["index"] for it in items], dtype=torch.long)[ok],
                "features": ImageFeatures.cat([it["features"] for it in items])[ok],
                "errors": [(it["index"], it["error"]) for it in items if not it["ok"]]}


def batch_inputs(batch: dict, device: torch.device, channels_last: bool = False) -> torch.Tensor | ImageFeatures:
    """What a training or evaluation step feeds the model, on ``device``: a feature cache's ImageFeatures, or the
    images (B, 3, S, S) (NHWC with ``channels_last``) for the encoder."""
    if "features" in batch:
        return batch["features"].to(device, non_blocking=True)
    x = batch["images"].to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def features_of(model: CaptionModel, x: torch.Tensor | ImageFeatures) -> ImageFeatures:
    """batch_inputs()'s images through the encoder; cached features as they are."""
    return x if isinstance(x, ImageFeatures) else model.encode(x)


def join_inputs(xs: list[torch.Tensor | ImageFeatures]) -> torch.Tensor | ImageFeatures:
    """Several batch_inputs() (all images, or all cached features) as one batch, in order."""
    return ImageFeatures.cat(xs) if isinstance(xs[0], ImageFeatures) else torch.cat(xs)
