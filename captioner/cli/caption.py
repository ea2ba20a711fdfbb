"""``captioner caption``: caption image files, folders, globs, @lists or a dataset split into JSONL, COCO results
or an HTML gallery; pipelined, resumable, shardable across processes and GPUs.

Exit status: 0 every image captioned; 1 some images could not be read (each has an error record); 2 usage error
(bad option, nothing to caption, output not writable); 3 no usable model; 4 the model failed while captioning
(e.g. out of memory; what was written is kept); 130 stopped by Ctrl-C (143 by SIGTERM) after writing the current
batch. After 4, 130 or 143, re-run the same command to finish: done images are skipped.
"""
from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from ..fileio import write_json_atomic
from ..generation import GenerationConfig, GenerationConfigError
from ..inputs import (InputError, Item, assign_image_ids, dedupe, expand_inputs, missing_folders, parse_shard,
                      shard)
from ..runtime import resolve_device
from .engine import SHOWN_ERRORS, Engine, StopFlag, Summary, UsageError, err, record
from .writers import STDOUT, RecordWriter, drop_errors, format_for, in_input_order, read_records, records_path, write_output

# the output cannot be written (disk full, quota, read-only): the user's to fix, like a bad option
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES})
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_MODEL, EXIT_ERROR, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 3, 4, 130, 143


def dataset_items(kind: str, annotations: str, images: str, split: str) -> list[Item]:
    """The images of a dataset split, in annotation-file order, with their dataset image ids
    (so a COCO results file written from them feeds ``captioner evaluate --results``)."""
    from training.datasets import read_dataset  # training is only needed for --dataset

    return dedupe([Item(r.path, r.image_id) for r in read_dataset(kind, annotations, images, split)])


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
            err(f"warning: resuming {rpath} although these options changed: {'; '.join(changed)}")
            return None
    if not has_records or not side.is_file():
        write_json_atomic(side, options, indent=1)
    return None


@dataclass
class RunResult:
    exit_code: int
    summary: Summary | None = None


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
        err(f"warning: could not join the torchrun process group ({e}); parts will not be merged automatically")
        return False


def _validate(args) -> None:
    if args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    if args.workers is not None and args.workers < 0:
        raise UsageError("--workers must be >= 0")
    if args.model_workers is not None and args.model_workers < 1:
        raise UsageError("--model-workers must be >= 1")
    nice = os.environ.get("CAPTIONER_LOADER_NICE")
    if nice is not None and not (nice.strip().isdigit() and int(nice) <= 19):
        raise UsageError(f"CAPTIONER_LOADER_NICE must be 0..19 (how far loader workers lower their priority), "
                         f"got {nice!r}")
    if args.dataset:
        if args.inputs:
            raise UsageError("give either INPUT paths or --dataset, not both")
        if not (args.annotations and args.images):
            raise UsageError("--dataset needs --annotations JSON and --images DIR")
    elif not args.inputs:
        raise UsageError("nothing to caption: give image files, folders, globs or @list.txt, or --dataset")


@dataclass(frozen=True)
class Plan:
    """What the options ask for, checked before a model or an input is touched."""
    fmt: str  # the output format
    shard: tuple[int, int] | None  # (i, n): this process captions the i-th of n shards
    world: int  # torchrun processes (1 without torchrun)
    rank: int
    device: torch.device | None  # None: Ray places the work
    generation: GenerationConfig

    @property
    def tag(self) -> str:
        """How the progress bar and the summary name this process's share."""
        return f"shard {self.shard[0]}/{self.shard[1]}" if self.shard else "captioning"


def _plan(args) -> Plan:
    """The plan, or UsageError saying what is wrong with the options. Under torchrun every rank takes its own shard
    and its own GPU; loader workers share the machine's cores."""
    if args.out == STDOUT and (args.shard or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        raise UsageError("--out - (standard output) cannot be sharded: give each shard a file")
    if os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a folder; give a file name (.jsonl, .json, .parquet or .html)")
    try:
        fmt = format_for(args.out, args.format)
        my_shard = parse_shard(args.shard) if args.shard else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    _validate(args)
    try:
        gen = GenerationConfig.from_args(args)
    except GenerationConfigError as e:
        raise UsageError(str(e)) from None
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if args.model_workers is not None and args.engine == "ray":
        raise UsageError("--model-workers is the local engine's (--engine local); Ray's actors: --concurrency")
    if args.model_workers is not None and args.model_workers > 1 and gen.sample:
        raise UsageError("--sample runs on one model worker: the workers would draw from one random generator in "
                         "turn, and --seed would no longer give the same captions")
    if args.encoder_backend == "onnxruntime":
        if args.engine == "ray":
            raise UsageError("--encoder-backend onnxruntime runs in the local engine (--engine local)")
        if importlib.util.find_spec("onnxruntime") is None:
            raise UsageError('--encoder-backend onnxruntime needs ONNX Runtime: pip install "captioner[onnx]"')
    if args.engine == "ray":  # Ray places the work (and the devices) itself
        if my_shard is not None or world > 1:
            raise UsageError("--engine ray spreads the work over the Ray cluster itself: no --shard, no torchrun")
        return Plan(fmt, None, 1, 0, None, gen)
    if args.address or args.concurrency or args.num_gpus is not None:
        raise UsageError("--address, --concurrency and --num-gpus are options of --engine ray")
    if args.workers is None:  # share the cores among the processes torchrun put on this machine
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        args.workers = max(1, min(8, (os.cpu_count() or 1) // max(1, local_world)))
    if world > 1:
        if my_shard is not None:
            raise UsageError("--shard cannot be combined with torchrun (each rank already takes its own shard)")
        my_shard = (rank, world)
    try:
        device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else None)
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from None
    if args.encoder_backend == "onnxruntime" and device.type != "cpu":
        raise UsageError(f"--encoder-backend onnxruntime runs on the CPU, not {device}: add --device cpu")
    return Plan(fmt, my_shard, world, rank, device, gen)


def run(args: argparse.Namespace) -> RunResult:
    try:
        return _run(args)
    except UsageError as e:
        err(f"captioner caption: error: {e}")
        return RunResult(EXIT_USAGE)


def _run(args: argparse.Namespace) -> RunResult:
    from ..api import default_checkpoint
    from ..checkpoint import CheckpointError

    plan = _plan(args)
    ckpt = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    if args.checkpoint is None and not ckpt.exists():
        err(f"captioner caption: error: no --checkpoint given and no default model installed at {ckpt}")
        return RunResult(EXIT_NO_MODEL)
    try:
        engine = _open_engine(args, plan, ckpt)
    except (CheckpointError, OSError, ValueError) as e:
        err(f"captioner caption: error: cannot load the model from {ckpt}: {e}")
        return RunResult(EXIT_NO_MODEL)
    try:
        return _caption(args, plan, ckpt, engine)
    finally:
        engine.close()


def _open_engine(args, plan: Plan, ckpt: Path) -> Engine:
    if args.engine == "ray":
        from .ray_engine import RayEngine

        return RayEngine(args, ckpt)
    from ..api import Captioner
    from .local_engine import LocalEngine

    cap = Captioner.from_pretrained(ckpt, device=plan.device, precision=args.precision,
                                    encoder_backend=args.encoder_backend)
    return LocalEngine(cap, args.batch_size, args.workers, args.model_workers, progress=not args.no_progress,
                       desc=plan.tag, position=plan.rank if plan.world > 1 else 0)


def _caption(args, plan: Plan, ckpt: Path, engine: Engine) -> RunResult:
    cfg, gen = engine.cfg, plan.generation
    if gen.attention and not cfg.attention:
        raise UsageError(f"--attention: the model {cfg.name!r} ({ckpt}) has no attention decoder, so it has no "
                         "attention maps; use a model trained with `captioner train --inject attention`")
    mine = _inputs(args, plan)
    rpath = _records_file(args, plan)
    options = {"model": f"{cfg.name} v{cfg.version}", "checkpoint": str(ckpt.resolve()),
               "precision": engine.precision, "seed": args.seed, **gen.to_dict()}  # what ran ('auto' resolved)
    todo, failed_before = _pending(rpath, mine, options, args) if rpath != STDOUT else (mine, 0)  # stdout: no resume
    # a file name that is not UTF-8 cannot be written into a record as it is: an error record with the bytes escaped
    unnamed = [(pos, it) for pos, it in todo if not it.has_printable_name]
    todo = [(pos, it) for pos, it in todo if it.has_printable_name]

    if args.seed is not None:
        torch.manual_seed(args.seed)
    with StopFlag() as stop:
        try:
            if unnamed:
                for _, it in unnamed[:SHOWN_ERRORS]:
                    err(f"skipped {it.name}: the file name is not valid UTF-8")
                with RecordWriter(rpath) as w:
                    w.write([record(*t, error=f"{t[1].name}: the file name is not valid UTF-8; rename the file")
                             for t in unnamed])
            s = engine.run(todo, rpath, gen, stop) if todo else Summary()
        except OSError as e:
            if e.errno not in OUTPUT_ERRNOS:
                raise
            raise UsageError(f"cannot write {rpath}: {os.strerror(e.errno)}; the records written so far are kept: "
                             "make room and re-run the same command to go on") from None
        except Exception as e:  # noqa: BLE001 - the model itself failed (a bad image never gets here)
            import traceback

            traceback.print_exc()
            hint = " (try a smaller --batch-size)" if "out of memory" in str(e).lower() else ""
            err(f"captioner caption: error: captioning failed: {type(e).__name__}: {e}{hint}; the records written "
                f"so far are kept in {rpath}: re-run the same command to go on")
            return RunResult(EXIT_ERROR)
    s.images, s.failed_before = len(mine), failed_before
    s.skipped = len(mine) - len(todo) - len(unnamed)
    s.failed += len(unnamed)
    err(s.line(f"caption [{plan.tag}]" if plan.shard else "caption") + f" -> {rpath}")
    if s.interrupted:
        err("stopped early: re-run the same command to caption the rest")
        return RunResult(EXIT_SIGTERM if s.interrupted == signal.SIGTERM else EXIT_SIGINT, s)
    code = EXIT_FAILED if s.failed + s.failed_before else EXIT_OK
    code = _finish(args, plan, rpath, f"Captions by {cfg.name} v{cfg.version}", s, code)
    return RunResult(code, s)


def _inputs(args, plan: Plan) -> list[tuple[int, Item]]:
    """This process's share of the images, with their input positions."""
    try:
        if args.dataset:
            items = dataset_items(args.dataset, args.annotations, args.images, args.split)
        elif (missing := missing_folders(args.inputs)):
            raise UsageError(f"input {missing[0]}: no such file or folder")
        else:
            items = expand_inputs(args.inputs, warn=err)
    except (InputError, ValueError) as e:  # DatasetError is a ValueError
        raise UsageError(str(e)) from None
    if not items:
        raise UsageError("no images found in the given inputs")
    assign_image_ids(items)
    return shard(items, *plan.shard) if plan.shard else list(enumerate(items))


def _records_file(args, plan: Plan) -> str:
    """Where this process appends its records, created (empty) if new, so a run that cannot write stops now."""
    rpath = records_path(args.out, plan.fmt, plan.shard)
    try:
        if rpath != STDOUT:
            Path(rpath).parent.mkdir(parents=True, exist_ok=True)
            open(rpath, "ab").close()
    except OSError as e:
        raise UsageError(f"cannot write {rpath}: {e}") from None
    return rpath


def _pending(rpath: str, mine: list, options: dict, args) -> tuple[list, int]:
    """Resume: what the record file does not hold yet, and how many of the held ones are errors. UsageError when
    the options changed since those records were made."""
    if args.restart:
        open(rpath, "wb").close()
    problem = check_options(rpath, options, args.resume_anyway)
    if problem:
        raise UsageError(problem)
    if args.retry_errors and (n := drop_errors(rpath)):
        err(f"retrying {n} images that failed before")
    prev = read_records(rpath, repair=True, keep=False)
    if prev.torn_bytes:
        err(f"resume: removed a partial last line ({prev.torn_bytes} bytes) from {rpath}")
    if prev.bad_lines:
        err(f"warning: {rpath}: ignored {prev.bad_lines} lines that are not records")
    done = prev.done
    return [(pos, it) for pos, it in mine if it.key not in done], sum(done.get(it.key, False) for _, it in mine)


def _finish(args, plan: Plan, rpath: str, title: str, s: Summary, code: int) -> int:
    """The final output: the file in its format, or under torchrun the merged parts (rank 0), or for a manual
    shard the merge command to run; returns the exit status (failed images on any rank count)."""
    if plan.shard is None:
        if plan.fmt != "jsonl":
            write_output(args.out, plan.fmt, in_input_order(read_records(rpath).records), title=title,
                         workers=max(1, args.workers or os.cpu_count() or 1), progress=not args.no_progress)
            err(f"wrote {args.out}")
    elif _init_group(plan.world, plan.rank):
        import torch.distributed as dist

        statuses: list[Any] = [None] * plan.world
        dist.all_gather_object(statuses, s.failed + s.failed_before)  # every rank got here: all parts are complete
        if plan.rank == 0:
            from .merge import merge_parts

            n, n_err = merge_parts(args.out, plan.fmt, title=title, workers=max(1, args.workers))
            err(f"merged {plan.world} parts: {n} images ({n_err} failed) -> {args.out}")
        code = EXIT_FAILED if any(statuses) else EXIT_OK
        dist.barrier()
        dist.destroy_process_group()
    else:
        err(f"shard {plan.shard[0]} of {plan.shard[1]} done; when every shard is done, run: "
            f"captioner merge --out {args.out}" + (f" --format {args.format}" if args.format else ""))
    return code


def main(args: argparse.Namespace) -> int:
    return run(args).exit_code
