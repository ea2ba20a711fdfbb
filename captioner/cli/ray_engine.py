"""``captioner caption --engine ray``: the same job on Ray Data (captioner.ray.caption_dataset). The driver (this
process) expands the inputs, skips what the record file already holds, and streams the results back into that
file, so outputs, resume, --retry-errors and exit codes are the local engine's.

Faults: Ray Data retries the tasks of a lost worker and restarts a lost model actor; the job goes on. A killed
driver takes its job with it (Ray stops the tasks and actors a driver owns, and a local cluster it started); the
record file keeps every batch that reached it (a torn last line is cut on resume) and rerunning the same command
captions only the rest. Batches in flight at the kill are captioned again.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..batch import progress_bar
from .engine import StopFlag, Summary, UsageError, attention_crop, err, record
from .writers import RecordWriter

if TYPE_CHECKING:
    from ..generation import GenerationConfig
    from ..inputs import Item


def parse_concurrency(text: str | None) -> int | tuple[int, int]:
    if text is None:
        return 1
    try:
        lo, _, hi = text.partition("-")
        n = (int(lo), int(hi)) if hi else int(lo)
    except ValueError:
        raise UsageError(f"--concurrency must be N or MIN-MAX (e.g. 4 or 1-8), got {text!r}") from None
    if (n if isinstance(n, int) else n[0]) < 1 or (isinstance(n, tuple) and n[0] > n[1]):
        raise UsageError(f"--concurrency {text}: need N >= 1, or 1 <= MIN <= MAX")
    return n


class RayEngine:
    """Connects to (or starts) the cluster and checks the model on the driver, so a bad checkpoint is exit 3 here
    rather than a failure in every actor. A bad option, no Ray or an unreachable cluster: UsageError."""

    def __init__(self, args, ckpt: Path) -> None:
        try:
            import ray

            import captioner.ray as cray
        except ImportError as e:
            raise UsageError(f"--engine ray needs Ray Data: pip install 'captioner[ray]' ({e})") from None
        if args.device not in (None, "cpu", "cuda"):
            raise UsageError(f"--engine ray: --device {args.device}: Ray gives each actor its GPUs; use --device "
                              "cpu or cuda, and --num-gpus")
        if args.num_gpus is not None and args.num_gpus < 0:
            raise UsageError("--num-gpus must be >= 0")
        if args.workers is not None and args.workers < 1:
            raise UsageError("--engine ray: --workers must be >= 1 (the decode tasks running at once)")
        self.concurrency = parse_concurrency(args.concurrency)
        from ..checkpoint import load_pretrained

        model, _ = load_pretrained(ckpt)  # CheckpointError: exit 3 before any cluster work
        self.cfg = model.cfg
        del model
        self.ray, self.cray, self.ckpt, self.args = ray, cray, ckpt, args
        self.owned = not ray.is_initialized()  # connected here: disconnect (and stop a local cluster) at the end
        try:
            cray.init(args.address)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = args.address or os.environ.get("RAY_ADDRESS") or "a local cluster"
            raise UsageError(f"cannot start or reach the Ray cluster ({where}): {e}") from None
        res = ray.cluster_resources()
        gpus = res.get("GPU", 0)
        if args.num_gpus is not None:
            self.num_gpus = args.num_gpus
        else:
            self.num_gpus = 1 if gpus and args.device != "cpu" else 0
        if args.device == "cuda" and not self.num_gpus:
            raise UsageError("--device cuda: the Ray cluster has no GPUs (or --num-gpus 0 was given)")
        self.precision = self._precision()
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # our bar says how far it is; Ray's INFO lines would say it again
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
        err(f"ray: cluster at {ray.get_runtime_context().gcs_address}: {res.get('CPU', 0):g} CPUs, "
             f"{gpus:g} GPUs; {self.concurrency} model actor(s) with {self.num_gpus:g} GPU(s) each")

    def _precision(self) -> str:
        """What the actors will run, as the options file records it: resolved here for CPU actors (the cluster's
        CPUs are taken to be this one's kind) and for GPUs when this machine has one; else as asked."""
        import torch

        from ..runtime import resolve_precision

        if not self.num_gpus:
            return resolve_precision(self.args.precision, "cpu")
        if torch.cuda.is_available():
            return resolve_precision(self.args.precision, "cuda")
        return self.args.precision

    def run(self, todo: Sequence[tuple[int, Item]], output: str, generation: GenerationConfig,
            stop: StopFlag | None = None) -> Summary:
        import pyarrow as pa

        s = Summary(images=len(todo))
        args, bs = self.args, self.args.batch_size
        # absolute paths: the decode tasks run in other processes, maybe on other machines (a shared filesystem);
        # "index" is the position in todo, which maps each result back to its item and input position
        table = pa.table({"path": [it.key for _, it in todo], "index": list(range(len(todo)))})
        # a block per batch: each decode task and each actor call is one batch, and its records reach the file as
        # soon as it is captioned (bigger blocks would hold them back until the whole block is done)
        ds = self.ray.data.from_arrow([table.slice(i, bs) for i in range(0, len(todo), bs)])
        out = self.cray.caption_dataset(ds, self.ckpt, batch_size=bs, concurrency=self.concurrency,
                                        num_gpus=self.num_gpus, workers=args.workers, precision=self.precision,
                                        seed=args.seed, generation=generation)
        crop = attention_crop(self.cfg, generation)
        t0 = time.perf_counter()
        bar = progress_bar(len(todo), not args.no_progress, file=sys.stderr, smoothing=0.1)
        batches = out.iter_batches(batch_size=None, batch_format="pyarrow")
        try:
            with RecordWriter(output) as writer:
                for tbl in batches:
                    recs, errors = [], []
                    for row in tbl.to_pylist():
                        pos, item = todo[row["index"]]
                        if row["error"] is not None:  # name the file as the user spelled it, as the local engine
                            errors.append(row["error"].replace(item.key, item.path))
                            recs.append(record(pos, item, error=errors[-1]))
                        else:
                            recs.append(record(pos, item, captions=row["captions"], crop=crop))
                    writer.write(recs)
                    bar.update(len(recs))
                    if s.batch_written(len(recs) - len(errors), errors, t0, stop):
                        break
        except KeyboardInterrupt:
            s.interrupted = signal.SIGINT
        finally:
            bar.close()
            close = getattr(batches, "close", None)
            if close:
                close()  # stops the streaming execution (a break leaves it running until collected)
        s.seconds = time.perf_counter() - t0
        return s

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()

