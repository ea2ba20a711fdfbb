"""What the two engines of ``captioner caption`` share: the interface the command drives them through (local_engine.py's
LocalEngine, ray_engine.py's RayEngine), the record each image becomes, the run's summary and the stop flag.

    engine.run(todo, records_file, generation, stop) -> Summary
"""
from __future__ import annotations

import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..generation import GenerationConfig
    from ..inputs import Item

SHOWN_ERRORS = 5  # unreadable images named on stderr per run; every one is an error record in the output


class UsageError(Exception):
    """What the user asked cannot run as given (bad option, nothing to caption, output not writable): one line on
    stderr, exit 2."""


def err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class StopFlag:
    """First SIGINT/SIGTERM: finish the current batch, then stop. A second SIGINT: stop now."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        err(f"\n{signal.Signals(signum).name}: stopping after the current batch (Ctrl-C again to stop at once)")

    def __enter__(self) -> "StopFlag":
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: no signal handling
            pass
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def record(pos: int, item: Item, captions: list[dict] | None = None, error: str | None = None,
           crop: float | None = None) -> dict[str, Any]:
    """One line of the record file; ``captions`` as Caption.to_dict(rounded=True) gives them, ``crop`` what
    attention_crop() says."""
    r: dict[str, Any] = {"path": item.name}
    if item.image_id is not None:
        r["image_id"] = item.image_id
    if error is None:
        r["captions"] = captions
    else:
        r["error"] = error
    r["index"] = pos
    if crop is not None and error is None:
        r["attention_crop"] = crop
    return r


def attention_crop(cfg: ModelConfig, generation: GenerationConfig) -> float | None:
    """With attention maps: the fraction of the shorter side that the maps cover (the centre crop), so a gallery
    can lay them over the photo."""
    return round(cfg.preprocess.image_size / cfg.preprocess.resize, 6) if generation.attention else None


@dataclass
class Summary:
    images: int = 0  # images of this process's share of the input
    captioned: int = 0  # captioned in this run
    failed: int = 0  # unreadable in this run
    skipped: int = 0  # already in the output from an earlier run
    failed_before: int = 0  # of the skipped, how many are error records
    seconds: float = 0.0  # captioning loop wall time (loader start to last write)
    interrupted: int | None = None  # the signal that stopped the run, if any
    first_s: float = 0.0  # from the start to the first written batch (start-up: workers, actors, the first batch)
    first_done: int = 0  # images in that batch

    @property
    def done(self) -> int:
        return self.captioned + self.failed

    def batch_written(self, captioned: int, errors: list[str], t0: float, stop: StopFlag | None) -> bool:
        """Count a batch that reached the record file (naming its first failures on stderr); True when a signal
        asks the run to stop after it."""
        from tqdm import tqdm

        for e in errors[:max(0, SHOWN_ERRORS - self.failed)]:
            tqdm.write(f"skipped {e}", file=sys.stderr)  # the message names the file; above the bar
        self.captioned += captioned
        self.failed += len(errors)
        if not self.first_done:
            self.first_s, self.first_done = time.perf_counter() - t0, self.done
        if stop is not None and stop.signum is not None:
            self.interrupted = stop.signum
        return self.interrupted is not None

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def line(self, prefix: str = "caption") -> str:
        s = (f"{prefix}: {self.images} images: {self.captioned} captioned, {self.failed} failed, "
             f"{self.skipped} skipped as already done")
        if self.failed_before:
            s += f" ({self.failed_before} of them failed before; --retry-errors redoes them)"
        if self.failed > SHOWN_ERRORS:
            s += f" (the first {SHOWN_ERRORS} failures are named above; every one is an error record in the output)"
        s += f"; {self.seconds:.1f} s, {self.images_per_s:.1f} images/s"
        if self.done > self.first_done > 0 and self.seconds > self.first_s:  # start-up apart (Ray's is seconds)
            steady = (self.done - self.first_done) / (self.seconds - self.first_s)
            s += f" (first batch after {self.first_s:.1f} s, then {steady:.1f} images/s)"
        if self.interrupted:
            s += f"; stopped by {signal.Signals(self.interrupted).name}, {self.images - self.skipped - self.done} left"
        return s


@runtime_checkable
class Engine(Protocol):
    """How ``captioner caption`` captions: the model it loaded (its config and resolved precision, which the
    options file records) and a run over the images still to do."""
    cfg: ModelConfig
    precision: str

    def run(self, todo: Sequence[tuple[int, Item]], output: str, generation: GenerationConfig,
            stop: StopFlag | None = None) -> Summary:
        """Caption ``todo`` ((input position, item) pairs; never empty), appending a record per image to the record
        file ``output`` a batch at a time; stop after the batch in flight once ``stop`` has a signal."""
        ...

    def close(self) -> None:
        """Release what the engine holds (a Ray cluster it started)."""
        ...
