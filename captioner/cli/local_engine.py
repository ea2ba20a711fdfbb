"""``captioner caption``'s local engine: DataLoader workers read, decode and preprocess the next batches (pinned
memory on CUDA) while the model captions batch k in this process (captioner.batch.caption_batches; on CPU two
batches at once, each on half the cores: runtime.model_workers)."""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

from ..batch import caption_batches
from ..data import ImageDataset, collate
from ..preprocess import eval_transform
from ..runtime import model_workers
from .engine import StopFlag, Summary, attention_crop, record
from .writers import RecordWriter

if TYPE_CHECKING:
    from ..api import Captioner
    from ..generation import GenerationConfig
    from ..inputs import Item


def _worker_init(nice: int, _: int) -> None:
    # Ctrl-C in a terminal reaches the whole process group; only the main process decides when to stop,
    # after writing the current batch (a worker dying on SIGINT would make the loader raise instead).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice:
        os.nice(nice)


def loader_nice(device: torch.device) -> int:
    """How far loader workers lower their priority. On a CPU run the model's threads and the loader share the
    cores and the model is the bottleneck: at the lowest priority the loader decodes in the gaps the model leaves
    (the Python between its kernels) instead of preempting its OpenMP threads mid-region, which stalls both (2
    workers on 2 cores, 1,690 photos: 0.83 -> 0.90 of the raw model's rate, +11 % images/s; README). With an
    accelerator the loader is the bottleneck and keeps its priority. CAPTIONER_LOADER_NICE overrides this (0 on a
    busy shared machine, where other jobs would otherwise starve the loader)."""
    env = os.environ.get("CAPTIONER_LOADER_NICE")
    if env is not None:
        return int(env)
    return 19 if device.type == "cpu" else 0


@contextlib.contextmanager
def _one_torch_thread(enabled: bool):
    """Preprocess in the main process (--workers 0) on one thread, as the loader workers do: torch's intra-op
    threads on image-sized tensors cost several times the work itself (measured 25 vs 3 CPU ms per image)."""
    if not enabled:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _fetch(loader: DataLoader, in_process: bool) -> Iterator[dict]:
    """The loader's batches; with no workers, each one prepared on one thread (the model keeps the others)."""
    batches = iter(loader)
    while True:
        with _one_torch_thread(in_process):
            b = next(batches, None)
        if b is None:
            return
        yield b


FIRST_BATCH = 8  # images in the first batch (one encoder chunk on CPU): the first records come out sooner


class FirstSmallBatches:
    """A DataLoader's batch_sampler over n images: ``first`` of them, then ``batch_size`` at a time, each a range
    made when the loader asks for it (a run of millions holds no index lists). The time to the first written batch
    is then that of a few images, whatever the batch size."""

    def __init__(self, n: int, batch_size: int, first: int = FIRST_BATCH) -> None:
        self.n, self.batch_size = n, batch_size
        self.rest = range(min(max(1, first), batch_size, n), n, batch_size)  # where the later batches start

    def __iter__(self) -> Iterator[range]:
        if self.n:
            yield range(self.rest.start)
        for a in self.rest:
            yield range(a, min(a + self.batch_size, self.n))

    def __len__(self) -> int:
        return (self.n > 0) + len(self.rest)


@dataclass
class LocalEngine:
    cap: Captioner
    batch_size: int
    workers: int  # loader worker processes (0: decode in this process)
    model_workers: int | None = None  # batches captioned at once (None: runtime.model_workers for the device)
    progress: bool = True
    desc: str = "captioning"  # the bar's label (a shard names itself)
    position: int = 0  # the bar's line (torchrun ranks share a terminal)

    @property
    def cfg(self):
        return self.cap.cfg

    @property
    def precision(self) -> str:
        return self.cap.precision

    def run(self, todo: Sequence[tuple[int, Item]], output: str, generation: GenerationConfig,
            stop: StopFlag | None = None) -> Summary:
        s = Summary(images=len(todo))
        cap = self.cap
        ds = ImageDataset([it.path for _, it in todo], eval_transform(cap.cfg.preprocess), cap.cfg.preprocess.resize,
                          warn=False)  # failures become error records (and the first few lines on stderr)
        dl = DataLoader(ds, batch_sampler=FirstSmallBatches(len(ds), self.batch_size), num_workers=self.workers,
                        collate_fn=collate, pin_memory=cap.device.type == "cuda",
                        worker_init_fn=functools.partial(_worker_init, loader_nice(cap.device)) if self.workers
                        else None, prefetch_factor=4 if self.workers else None)
        crop = attention_crop(cap.cfg, generation)
        t0 = time.perf_counter()
        # sampling draws from torch's one generator: two workers would take turns in any order, and --seed would no
        # longer give the same captions
        workers, threads = model_workers(cap.device, torch.get_num_threads(),
                                         1 if generation.sample else self.model_workers)
        batches = caption_batches(cap, _fetch(dl, self.workers == 0), generation, progress=self.progress,
                                  total=len(todo), desc=self.desc, position=self.position, file=sys.stderr,
                                  smoothing=0.1, workers=workers, threads=threads)
        try:
            with RecordWriter(output) as writer, torch.inference_mode(), contextlib.closing(batches):
                for b in batches:
                    recs = {j: record(*todo[j], captions=[x.to_dict(rounded=True) for x in c], crop=crop)
                            for j, c in zip(b.indices, b.captions)}
                    recs.update({j: record(*todo[j], error=e) for j, e in b.errors})
                    writer.write([recs[j] for j in sorted(recs)])
                    if s.batch_written(len(b.captions), [e for _, e in b.errors], t0, stop):
                        break
        except KeyboardInterrupt:  # second Ctrl-C: the batch in flight is lost, the file holds whole batches (or a
            s.interrupted = signal.SIGINT  # torn line that the next run removes)
        except Exception:
            if stop is None or stop.signum is None:
                raise
            s.interrupted = stop.signum  # e.g. the loader complaining about workers killed by the same signal
        s.seconds = time.perf_counter() - t0
        return s

    def close(self) -> None:
        pass  # the model goes with the process
