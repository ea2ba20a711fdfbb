"""The one loop that captions many images: collated batches in (data.collate's {"indices", "images", "errors"}, or
a feature cache's "features"), each batch's captions out, keyed by dataset position. The batch CLI, `captioner
evaluate` and training's validation all caption through it, so they decode and count alike.

    for b in caption_batches(cap, DataLoader(ds, batch_size=32, collate_fn=collate), GenerationConfig()):
        for i, text in b.best():
            ...
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .api import Caption, Captioner
    from .features import ImageFeatures
    from .generation import GenerationConfig


@dataclass
class Captioned:
    """One batch's results, in batch order."""
    indices: list[int]  # dataset positions of the captioned images
    captions: list[list[Caption]]  # n-best, best first, per captioned image
    errors: list[tuple[int, str]]  # (position, why) of the images that could not be read
    features: ImageFeatures | None = None  # what ``encode`` gave (training's validation loss reuses it)

    def best(self) -> Iterator[tuple[int, str]]:
        """(dataset position, best caption) per captioned image: what metrics score."""
        return ((i, c[0].text) for i, c in zip(self.indices, self.captions))


def progress_bar(total: int | None, progress: bool = True, **options):
    """The images-per-second bar every captioning loop shows (``options`` as tqdm takes them)."""
    from tqdm import tqdm

    return tqdm(total=total, disable=not progress, **{"desc": "captioning", "unit": "img", "dynamic_ncols": True,
                                                      **options})


def caption_batches(cap: Captioner, batches: Iterable[dict], generation: GenerationConfig, *,
                    encode: Callable[[dict], ImageFeatures] | None = None, progress: bool = True,
                    total: int | None = None, **bar) -> Iterator[Captioned]:
    """Caption each batch's readable images with ``cap.caption_batch``. ``encode`` turns a batch into the features
    to caption (default: ``cap`` encodes its "images"); a batch with no readable image is yielded without
    captioning. The bar counts images (``total`` defaults to the loader's dataset size); ``bar``: tqdm options.
    Callers choose grad mode and threads: the loop only iterates."""
    if total is None and hasattr(batches, "dataset"):
        total = len(batches.dataset)
    pbar = progress_bar(total, progress, **bar)
    try:
        for b in batches:
            idx, errors = b["indices"].tolist(), list(b.get("errors", ()))
            features = encode(b) if encode is not None and idx else None
            if not idx:
                captions = []
            elif features is None:
                captions = cap.caption_batch(b["images"], generation=generation)
            else:
                captions = cap.caption_batch(features=features, generation=generation)
            pbar.update(len(idx) + len(errors))
            yield Captioned(idx, captions, errors, features)
    finally:
        pbar.close()
