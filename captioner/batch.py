"""The one loop that captions many images: collated batches in (data.collate's {"indices", "images", "errors"}, or
a feature cache's "features"), each batch's captions out, keyed by dataset position. The batch CLI, `captioner
evaluate` and training's validation all caption through it, so they decode and count alike.

    for b in caption_batches(cap, DataLoader(ds, batch_size=32, collate_fn=collate), GenerationConfig()):
        for i, text in b.best():
            ...
"""
from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .runtime import set_thread_torch_threads

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
                    total: int | None = None, workers: int = 1, threads: int | None = None,
                    **bar) -> Iterator[Captioned]:
    """Caption each batch's readable images with ``cap.caption_batch``. ``encode`` turns a batch into the features
    to caption (default: ``cap`` encodes its "images"); a batch with no readable image is yielded without
    captioning. ``workers`` > 1 captions that many batches at once after the first, each in its own thread with
    ``threads`` torch threads (runtime.model_workers says why on CPU), still yielded in order. The bar counts
    images (``total`` defaults to the loader's dataset size); ``bar``: tqdm options. Callers choose grad mode (the
    workers take the caller's) and threads: the loop only iterates."""
    if total is None and hasattr(batches, "dataset"):
        total = len(batches.dataset)

    def run(b: dict) -> Captioned:
        idx, errors = b["indices"].tolist(), list(b.get("errors", ()))
        features = encode(b) if encode is not None and idx else None
        if not idx:
            captions = []
        elif features is None:
            captions = cap.caption_batch(b["images"], generation=generation)
        else:
            captions = cap.caption_batch(features=features, generation=generation)
        return Captioned(idx, captions, errors, features)

    def captioned(batches: Iterator[dict]) -> Iterator[Captioned]:
        # with workers, the first batch still runs here alone on all the caller's threads: the first result comes
        # as soon as with one worker (the CLI's time to its first written batch), the rest overlap
        for b in batches if workers == 1 else itertools.islice(batches, 1):
            yield run(b)
        if workers == 1:
            return
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def run_in_worker(b: dict) -> Captioned:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return run(b)

        with ThreadPoolExecutor(workers, thread_name_prefix="caption",
                                initializer=set_thread_torch_threads if threads else None,
                                initargs=(threads,) if threads else ()) as pool:
            running: deque = deque()
            try:
                for b in batches:
                    running.append(pool.submit(run_in_worker, b))
                    if len(running) == workers:
                        yield running.popleft().result()
                while running:
                    yield running.popleft().result()
            finally:
                for f in running:  # stopped early: batches not started are dropped, running ones finish
                    f.cancel()

    pbar = progress_bar(total, progress, **bar)
    results = captioned(iter(batches))
    try:
        for c in results:
            pbar.update(len(c.indices) + len(c.errors))
            yield c
    finally:
        results.close()
        pbar.close()
