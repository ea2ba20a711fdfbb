"""``captioner caption``: caption image files, folders, globs, @lists or a dataset split into JSONL, COCO results
or an HTML gallery; pipelined, resumable, shardable across processes and GPUs.

Exit status: 0 every image captioned; 1 some images could not be read (each has an error record); 2 usage error
(bad option, nothing to caption, output not writable); 3 no usable model; 4 the model failed while captioning
(e.g. out of memory; what was written is kept); 130 stopped by Ctrl-C (143 by SIGTERM) after writing the current
batch. After 4, 130 or 143, re-run the same command to finish: done images are skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..inputs import (InputError, Item, assign_image_ids, dedupe, expand_inputs, missing_folders, parse_shard,
                      shard)
from ..fileio import write_json_atomic
from ..data import ImageDataset, collate
from ..generation import GenerationConfig, GenerationConfigError
from ..preprocess import eval_transform
from ..runtime import resolve_device
from .writers import STDOUT, RecordWriter, drop_errors, format_for, in_input_order, read_records, records_path, write_output

# the output cannot be written (disk full, quota, read-only): the user's to fix, like a bad option
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES})
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_MODEL, EXIT_ERROR, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 3, 4, 130, 143




def dataset_items(kind: str, annotations: str, images: str, split: str) -> list[Item]:
    """The images of a dataset split, in annotation-file order, with their dataset image ids
    (so a COCO results file written from them feeds ``captioner evaluate --results``)."""
    from training.datasets import read_dataset  # training is only needed for --dataset

    return dedupe([Item(r.path, r.image_id) for r in read_dataset(kind, annotations, images, split)])


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- loading


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


class StopFlag:
    """First SIGINT/SIGTERM: finish the current batch, then stop. A second SIGINT: stop now."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        _err(f"\n{signal.Signals(signum).name}: stopping after the current batch (Ctrl-C again to stop at once)")

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


# ---------------------------------------------------------------------------------------------- running


def check_options(rpath: str, options: dict, anyway: bool) -> str | None:
    """The options that shape the captions are kept beside the records (RECORDS.options.json). A rerun into records
    made with other options is refused (the message, for exit 2) unless ``anyway``; otherwise they are recorded."""
    side = Path(str(rpath) + ".options.json")
    has_records = Path(rpath).stat().st_size > 0
    if has_records and side.is_file():
        try:
            before = json.loads(side.read_text())
        except (OSError, ValueError):
            before = {}
        # records made before GenerationConfig named two options otherwise
        for old, new in (("do_sample", "sample"), ("return_attention", "attention")):
            if old in before:
                before.setdefault(new, before.pop(old))
        # a generation option that did not exist when those records were made had its default then
        before = {**GenerationConfig().to_dict(), **before}
        changed = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in options.items() if before.get(k) != v]
        if changed and not anyway:
            return (f"{rpath} holds captions made with other options ({'; '.join(changed)}); pass --restart to "
                    "start over, --resume-anyway to add to it, or another --out")
        if changed:
            _err(f"warning: resuming {rpath} although these options changed: {'; '.join(changed)}")
            return None
    if not has_records or not side.is_file():
        write_json_atomic(side, options, indent=1)
    return None


SHOWN_ERRORS = 5  # unreadable images named on stderr per run; every one is an error record in the output


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

    def batch_written(self, captioned: int, errors: list[str], bar, t0: float, stop: StopFlag | None) -> bool:
        """Count a batch that reached the record file (naming its first failures on stderr); True when a signal
        asks the run to stop after it."""
        for e in errors[:max(0, SHOWN_ERRORS - self.failed)]:
            bar.write(f"skipped {e}", file=sys.stderr)  # the message names the file
        self.captioned += captioned
        self.failed += len(errors)
        if not self.first_done:
            self.first_s, self.first_done = time.perf_counter() - t0, self.done
        bar.update(captioned + len(errors))
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


@dataclass
class RunResult:
    exit_code: int
    summary: Summary | None = None


def _record(pos: int, item: Item, captions: list[dict] | None = None, error: str | None = None) -> dict[str, Any]:
    """One line of the record file; ``captions`` as Caption.to_dict(rounded=True) gives them."""
    r: dict[str, Any] = {"path": item.name}
    if item.image_id is not None:
        r["image_id"] = item.image_id
    if error is None:
        r["captions"] = captions
    else:
        r["error"] = error
    r["index"] = pos
    return r


def caption_items(cap, todo: Sequence[tuple[int, Item]], out_path: str, gen: GenerationConfig, batch_size: int,
                  workers: int, progress: bool = True, desc: str = "captioning", position: int = 0,
                  stop: StopFlag | None = None) -> Summary:
    """Caption ``todo`` ((input position, item) pairs) and append a record per image to ``out_path``.

    Loader workers read, decode and preprocess batch k+1 (pinned memory on CUDA) while the model runs batch k.
    """
    from tqdm import tqdm

    s = Summary(images=len(todo))
    if not todo:
        return s
    ds = ImageDataset([it.path for _, it in todo], eval_transform(cap.cfg.preprocess), cap.cfg.preprocess.resize,
                      warn=False)  # failures become error records (and the first few lines on stderr)
    cuda = cap.device.type == "cuda"
    dl = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
                    pin_memory=cuda,
                    worker_init_fn=functools.partial(_worker_init, loader_nice(cap.device)) if workers else None,
                    prefetch_factor=4 if workers else None)
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc=desc, unit="img", position=position, disable=not progress, file=sys.stderr,
               dynamic_ncols=True, smoothing=0.1)
    try:
        batches = iter(dl)
        with RecordWriter(out_path) as writer, torch.inference_mode():
            while True:
                with _one_torch_thread(workers == 0):
                    b = next(batches, None)
                if b is None:
                    break
                pos = b["indices"].tolist()
                caps = cap.caption_batch(b["images"], generation=gen) if pos else []
                recs = {j: _record(*todo[j], captions=[x.to_dict(rounded=True) for x in c]) for j, c in zip(pos, caps)}
                if gen.attention:  # the maps cover the centre crop: this fraction of the shorter side
                    for r in recs.values():
                        r["attention_crop"] = round(cap.cfg.preprocess.image_size / cap.cfg.preprocess.resize, 6)
                recs.update({j: _record(*todo[j], error=e) for j, e in b["errors"]})
                writer.write([recs[j] for j in sorted(recs)])
                if s.batch_written(len(caps), [e for _, e in b["errors"]], bar, t0, stop):
                    break
    except KeyboardInterrupt:  # second Ctrl-C: the batch in flight is lost, the file holds whole batches (or a torn
        s.interrupted = signal.SIGINT  # line that the next run removes)
    except Exception:
        if stop is None or stop.signum is None:
            raise
        s.interrupted = stop.signum  # e.g. the loader complaining about workers killed by the same signal
    finally:
        bar.close()
    s.seconds = time.perf_counter() - t0
    return s


def _init_group(world: int, rank: int) -> bool:
    """Join torchrun's process group (gloo: it only carries the end-of-run status) so rank 0 can merge the parts."""
    import torch.distributed as dist

    if world <= 1 or "MASTER_ADDR" not in os.environ:
        return False
    try:
        # shards may finish far apart (e.g. one resumed nearly done): wait long rather than time out
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(days=7))
        return True
    except Exception as e:  # noqa: BLE001
        _err(f"warning: could not join the torchrun process group ({e}); parts will not be merged automatically")
        return False


def _validate(args) -> str | None:
    if args.batch_size < 1:
        return "--batch-size must be >= 1"
    if args.workers is not None and args.workers < 0:
        return "--workers must be >= 0"
    nice = os.environ.get("CAPTIONER_LOADER_NICE")
    if nice is not None and not (nice.strip().isdigit() and int(nice) <= 19):
        return f"CAPTIONER_LOADER_NICE must be 0..19 (how far loader workers lower their priority), got {nice!r}"
    if args.dataset:
        if args.inputs:
            return "give either INPUT paths or --dataset, not both"
        if not (args.annotations and args.images):
            return "--dataset needs --annotations JSON and --images DIR"
    elif not args.inputs:
        return "nothing to caption: give image files, folders, globs or @list.txt, or --dataset"
    return None


def run(args: argparse.Namespace) -> RunResult:
    from ..api import Captioner, default_checkpoint
    from ..checkpoint import CheckpointError

    def usage(msg: str) -> RunResult:
        _err(f"captioner caption: error: {msg}")
        return RunResult(EXIT_USAGE)

    plan = _plan(args)
    if isinstance(plan, str):
        return usage(plan)
    fmt, my_shard, world, rank, device, gen = plan

    # the model
    ckpt = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    if args.checkpoint is None and not ckpt.exists():
        _err(f"captioner caption: error: no --checkpoint given and no default model installed at {ckpt}")
        return RunResult(EXIT_NO_MODEL)
    cap = engine = None
    try:
        if args.engine == "ray":
            from .ray_engine import EngineError, RayEngine

            try:
                engine = RayEngine(args, ckpt)
            except EngineError as e:
                return usage(str(e))
            cfg, precision = engine.cfg, engine.precision
        else:
            cap = Captioner.from_pretrained(ckpt, device=device, precision=args.precision)
            cfg, precision = cap.cfg, cap.precision
    except (CheckpointError, OSError, ValueError) as e:
        _err(f"captioner caption: error: cannot load the model from {ckpt}: {e}")
        return RunResult(EXIT_NO_MODEL)
    try:
        return _run(args, fmt, my_shard, world, rank, gen, ckpt, cfg, precision, cap, engine)
    finally:
        if engine is not None:
            engine.close()


def _run(args, fmt, my_shard, world, rank, gen, ckpt, cfg, precision, cap, engine) -> RunResult:
    def usage(msg: str) -> RunResult:
        _err(f"captioner caption: error: {msg}")
        return RunResult(EXIT_USAGE)

    if gen.attention and not cfg.attention:
        return usage(f"--attention: the model {cfg.name!r} ({ckpt}) has no attention decoder, so it has no "
                     "attention maps; use a model trained with `captioner train --inject attention`")

    # the inputs
    try:
        if args.dataset:
            items = dataset_items(args.dataset, args.annotations, args.images, args.split)
        else:
            if (missing := missing_folders(args.inputs)):
                return usage(f"input {missing[0]}: no such file or folder")
            items = expand_inputs(args.inputs, warn=_err)
    except (InputError, ValueError) as e:  # DatasetError is a ValueError
        return usage(str(e))
    if not items:
        return usage("no images found in the given inputs")
    assign_image_ids(items)
    mine = shard(items, *my_shard) if my_shard else list(enumerate(items))

    # resume: whatever the record file already holds is done
    rpath = records_path(args.out, fmt, my_shard)
    try:
        if rpath != STDOUT:
            Path(rpath).parent.mkdir(parents=True, exist_ok=True)
            open(rpath, "ab").close()
    except OSError as e:
        return usage(f"cannot write {rpath}: {e}")
    options = {"model": f"{cfg.name} v{cfg.version}", "checkpoint": str(ckpt.resolve()),
               "precision": precision, "seed": args.seed, **gen.to_dict()}  # what ran ('auto' resolved)
    pending = _pending(rpath, mine, options, args) if rpath != STDOUT else (mine, 0)  # stdout: nothing to resume
    if isinstance(pending, str):
        return usage(pending)
    todo, failed_before = pending
    # a file name that is not UTF-8 cannot be written into a record as it is: an error record with the bytes escaped
    unnamed = [(pos, it) for pos, it in todo if not it.has_printable_name]
    todo = [(pos, it) for pos, it in todo if it.has_printable_name]

    if args.seed is not None:
        torch.manual_seed(args.seed)
    tag = f"shard {my_shard[0]}/{my_shard[1]}" if my_shard else "captioning"
    with StopFlag() as stop:
        try:
            if unnamed:
                for _, it in unnamed[:SHOWN_ERRORS]:
                    _err(f"skipped {it.name}: the file name is not valid UTF-8")
                with RecordWriter(rpath) as w:
                    w.write([_record(*t, error=f"{t[1].name}: the file name is not valid UTF-8; rename the file")
                             for t in unnamed])
            if engine is not None:
                s = engine.caption(todo, rpath, gen, progress=not args.no_progress, desc=tag, stop=stop)
            else:
                s = caption_items(cap, todo, rpath, gen, args.batch_size, args.workers,
                                  progress=not args.no_progress, desc=tag, position=rank if world > 1 else 0,
                                  stop=stop)
        except OSError as e:
            if e.errno not in OUTPUT_ERRNOS:
                raise
            _err(f"captioner caption: error: cannot write {rpath}: {os.strerror(e.errno)}; the records written so "
                 "far are kept: make room and re-run the same command to go on")
            return RunResult(EXIT_USAGE)
        except Exception as e:  # noqa: BLE001 - the model itself failed (a bad image never gets here)
            import traceback

            traceback.print_exc()
            hint = " (try a smaller --batch-size)" if "out of memory" in str(e).lower() else ""
            _err(f"captioner caption: error: captioning failed: {type(e).__name__}: {e}{hint}; the records written "
                 f"so far are kept in {rpath}: re-run the same command to go on")
            return RunResult(EXIT_ERROR)
    s.images, s.failed_before = len(mine), failed_before
    s.skipped = len(mine) - len(todo) - len(unnamed)
    s.failed += len(unnamed)
    _err(s.line(f"caption [{tag}]" if my_shard else "caption") + f" -> {rpath}")
    if s.interrupted:
        _err("stopped early: re-run the same command to caption the rest")
        return RunResult(EXIT_SIGTERM if s.interrupted == signal.SIGTERM else EXIT_SIGINT, s)
    code = EXIT_FAILED if s.failed + s.failed_before else EXIT_OK

    code = _finish(args, fmt, rpath, my_shard, world, rank, f"Captions by {cfg.name} v{cfg.version}", s, code)
    return RunResult(code, s)


def _plan(args) -> tuple | str:
    """(output format, this process's shard or None, world size, rank, device, GenerationConfig), or what is wrong
    with the options. Under torchrun every rank takes its own shard and its own GPU; loader workers share the
    machine's cores."""
    if args.out == STDOUT and (args.shard or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return "--out - (standard output) cannot be sharded: give each shard a file"
    if os.path.isdir(args.out):
        return f"--out {args.out} is a folder; give a file name (.jsonl, .json, .parquet or .html)"
    try:
        fmt = format_for(args.out, args.format)
        my_shard = parse_shard(args.shard) if args.shard else None
    except ValueError as e:
        return str(e)
    if (msg := _validate(args)) is not None:
        return msg
    try:
        gen = GenerationConfig.from_args(args)
    except GenerationConfigError as e:
        return str(e)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if args.engine == "ray":  # Ray places the work (and the devices) itself
        if my_shard is not None or world > 1:
            return "--engine ray spreads the work over the Ray cluster itself: no --shard, no torchrun"
        return fmt, None, 1, 0, None, gen
    if args.address or args.concurrency or args.num_gpus is not None:
        return "--address, --concurrency and --num-gpus are options of --engine ray"
    if args.workers is None:  # share the cores among the processes torchrun put on this machine
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        args.workers = max(1, min(8, (os.cpu_count() or 1) // max(1, local_world)))
    if world > 1:
        if my_shard is not None:
            return "--shard cannot be combined with torchrun (each rank already takes its own shard)"
        my_shard = (rank, world)
    try:
        device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else None)
    except (ValueError, RuntimeError) as e:
        return str(e)
    return fmt, my_shard, world, rank, device, gen


def _pending(rpath: str, mine: list, options: dict, args) -> tuple[list, int] | str:
    """Resume: what the record file does not hold yet, and how many of the held ones are errors; or why not
    (options changed: the message for exit 2)."""
    if args.restart:
        open(rpath, "wb").close()
    problem = check_options(rpath, options, args.resume_anyway)
    if problem:
        return problem
    if args.retry_errors and (n := drop_errors(rpath)):
        _err(f"retrying {n} images that failed before")
    prev = read_records(rpath, repair=True, keep=False)
    if prev.torn_bytes:
        _err(f"resume: removed a partial last line ({prev.torn_bytes} bytes) from {rpath}")
    if prev.bad_lines:
        _err(f"warning: {rpath}: ignored {prev.bad_lines} lines that are not records")
    done = prev.done
    return [(pos, it) for pos, it in mine if it.key not in done], sum(done.get(it.key, False) for _, it in mine)


def _finish(args, fmt: str, rpath: str, my_shard, world: int, rank: int, title: str, s: Summary, code: int) -> int:
    """The final output: the file in its format, or under torchrun the merged parts (rank 0), or for a manual
    shard the merge command to run; returns the exit status (failed images on any rank count)."""
    if my_shard is None:
        if fmt != "jsonl":
            write_output(args.out, fmt, in_input_order(read_records(rpath).records), title=title,
                         workers=max(1, args.workers or os.cpu_count() or 1), progress=not args.no_progress)
            _err(f"wrote {args.out}")
    elif _init_group(world, rank):
        import torch.distributed as dist

        statuses: list[Any] = [None] * world
        dist.all_gather_object(statuses, s.failed + s.failed_before)  # every rank got here: all parts are complete
        if rank == 0:
            from .merge import merge_parts

            n, n_err = merge_parts(args.out, fmt, title=title, workers=max(1, args.workers))
            _err(f"merged {world} parts: {n} images ({n_err} failed) -> {args.out}")
        code = EXIT_FAILED if any(statuses) else EXIT_OK
        dist.barrier()
        dist.destroy_process_group()
    else:
        _err(f"shard {my_shard[0]} of {my_shard[1]} done; when every shard is done, run: "
             f"captioner merge --out {args.out}" + (f" --format {args.format}" if args.format else ""))
    return code


def main(args: argparse.Namespace) -> int:
    return run(args).exit_code
