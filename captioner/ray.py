"""Ray Data as the batch engine: caption a Ray Dataset of images on one machine or a cluster.

    import ray, captioner.ray
    ds = ray.data.read_binary_files("s3://bucket/photos/", include_paths=True)  # columns: bytes, path
    out = captioner.ray.caption_dataset(ds, checkpoint="runs/coco/best", beam_size=5, concurrency=8, num_gpus=1)
    out.write_parquet("s3://bucket/captions/")   # columns: path, captions, error, and the input's other columns

Two stages, Ray Data's pattern for offline inference:
  decode   Ray tasks (CPU) read each image (its ``bytes`` column, else the file at ``path``), resize and crop it
           (pixels.crop, torch-free) into uint8 pixels; an unreadable image gets ``error`` and blank pixels.
  caption  a pool of actors (CaptionPredictor), each loading the model once, normalise the pixels next to the
           model (preprocess.normalize_batch: the same bits as the local engine) and run beam search or sampling.
The checkpoint travels through Ray's object store, so worker machines need no copy of it; images are read where
the decode task runs (a shared filesystem, or a ``bytes`` column from object storage).

Each output row: ``captions`` a list of {caption, log_prob, score} (+ words, attention with attention=True),
best first, and ``error`` null; or, for an unreadable image, ``captions`` null and ``error`` saying why.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from .config import PreprocessConfig
from .generation import GenerationConfig, with_options
from .pixels import ImageError, crop, load_image  # torch-free: decode workers start in a second, not five


def init(address: str | None = None, **kwargs) -> None:
    """Join the Ray cluster at ``address``; without one, $RAY_ADDRESS, else the cluster ``ray start --head``
    last started on this machine, else start a local one on this machine's cores (Ray's own order). Nothing to do
    when this process is already connected."""
    if ray.is_initialized():
        return
    # Ray runs its workers at nice 15 (keeping its own daemons responsive). A CPU model actor at 15 next to the
    # decoders at 19 is preempted mid OpenMP region nearly as often as at equal priority; at 0 it runs 1.2x faster
    # on 2 cores (bench/batch_ray.py). This reaches a cluster that this call starts; `ray start` reads it too.
    os.environ.setdefault("RAY_worker_niceness", "0")
    kwargs.setdefault("include_dashboard", False)  # a cluster started for one job: the dashboard only costs CPU
    kwargs.setdefault("configure_logging", False)
    ray.init(address=address or None, **kwargs)
    _StderrFilter.install((b"has constructor arguments in the object store and max_restarts > 0",))


class _StderrFilter:
    """This process's file descriptor 2 through a pipe that drops the lines containing one of ``drop``.

    Ray Data gives every actor of a pool an object-store argument of its own (its map function), so Ray's C++ core
    logs an error-level line for each model actor (ray-project/ray#53727, #57733: restarts could fail if that
    object were lost; it is held for the whole job). Nothing of ours can avoid or fix it, and an error line on
    every run teaches users to ignore error lines. Installed after ray.init(), so Ray's daemons keep the real
    stderr; everything else written to fd 2 (Python, tqdm, other C++ lines) passes unchanged."""

    _installed: "_StderrFilter | None" = None

    @classmethod
    def install(cls, drop: tuple[bytes, ...]) -> None:
        if cls._installed is None:
            cls._installed = cls(drop)

    def __init__(self, drop: tuple[bytes, ...]) -> None:
        self.drop = drop
        self.real = os.dup(2)
        r, w = os.pipe()
        os.dup2(w, 2)
        os.close(w)
        self.thread = threading.Thread(target=self._pump, args=(r,), name="stderr-filter", daemon=True)
        self.thread.start()
        atexit.register(self.close)

    def _pump(self, r: int) -> None:
        pending = b""
        try:
            while chunk := os.read(r, 1 << 16):
                *lines, pending = (pending + chunk).split(b"\n")
                out = b"".join(line + b"\n" for line in lines if not any(d in line for d in self.drop))
                if pending and not pending.startswith(b"["):  # a progress bar's partial line goes on at once; a
                    out, pending = out + pending, b""            # C++ log line ('[time E pid]') waits for its end
                if out:
                    os.write(self.real, out)
            if pending:
                os.write(self.real, pending)
        except OSError:  # the real stderr is gone: never leave fd 2 a pipe nobody reads (writers would block)
            os.dup2(self.real, 2)
        finally:
            os.close(r)

    def close(self) -> None:
        """Back to the real stderr (at exit): the pipe's last write end closes, the thread drains it and ends."""
        sys.stderr.flush()
        os.dup2(self.real, 2)
        self.thread.join(timeout=2)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------- decode stage


def _decode(batch: pa.Table, pre: PreprocessConfig, nice: int) -> pa.Table:
    """Ray task body: rows with ``path`` (and maybe ``bytes``) -> the same rows with ``image`` (the crop's uint8
    pixels, S x S x 3 bytes) and ``error`` (null; or why the image could not be read, and ``image`` is null)."""
    _lower_priority(nice)
    paths = [str(p) for p in batch.column("path").to_pylist()]
    data = batch.column("bytes").to_pylist() if "bytes" in batch.column_names else None
    images: list[bytes | None] = []
    errors: list[str | None] = []
    for i, path in enumerate(paths):
        try:
            im = crop(load_image(path if data is None else data[i], min_side=pre.resize), pre)
            images.append(im.tobytes())  # RGB, row-major: the (S, S, 3) array normalize_batch takes
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - one strange file must not fail the task (and the job)
            images.append(None)  # ImageError names the file (bytes are named "<bytes>"); anything else gets it here
            errors.append(str(e).replace("<bytes>", path, 1) if isinstance(e, ImageError)
                          else f"{path}: {type(e).__name__}: {e}")
    if data is not None:
        batch = batch.drop_columns(["bytes"])
    return batch.append_column("image", pa.array(images, type=pa.binary(3 * pre.image_size ** 2))) \
        .append_column("error", pa.array(errors, type=pa.string()))


_niced = False


def _lower_priority(nice: int) -> None:
    """On a CPU-only pipeline the model is the bottleneck: decoders at nice 19 fill the gaps the model's threads
    leave instead of preempting them (the local engine's loader_nice; +11 % there). Once per worker process."""
    global _niced
    if nice and not _niced:
        os.nice(nice)
        _niced = True


# ---------------------------------------------------------------------------------------------- caption stage


class CaptionPredictor:
    """Ray actor: loads the model once, then captions batches of decoded rows."""

    def __init__(self, model_files: list, precision: str, threads: int | None, seed: int | None,
                 generation: GenerationConfig) -> None:
        import torch

        from .api import Caption, Captioner

        files: dict[str, bytes] = ray.get(model_files[0])
        folder = Path(tempfile.mkdtemp(prefix="captioner-model-"))
        try:
            for name, blob in files.items():
                (folder / name).write_bytes(blob)
            gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()  # Ray sets CUDA_VISIBLE_DEVICES for us
            if not gpu:
                # the model owns the cores it runs on (Ray's default would be one thread per reserved CPU)
                torch.set_num_threads(threads or _cores())
            self.cap = Captioner.from_pretrained(folder, device="cuda" if gpu else "cpu", precision=precision)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if seed is not None:
            torch.manual_seed(seed)
        self.generation = generation
        self.type = Caption.arrow_type(generation.attention)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from .preprocess import normalize_batch

        pixels = batch.column("image").to_pylist()
        ok = [i for i, p in enumerate(pixels) if p is not None]
        captions: list[list[dict] | None] = [None] * len(pixels)
        if ok:
            s = self.cap.cfg.preprocess.image_size
            arr = np.frombuffer(bytearray(b"".join(pixels[i] for i in ok)), dtype=np.uint8).reshape(len(ok), s, s, 3)
            with torch.inference_mode():
                caps = self.cap.caption_batch(normalize_batch(arr, self.cap.cfg.preprocess),
                                              generation=self.generation)
            for i, c in zip(ok, caps):
                captions[i] = [x.to_dict(rounded=True) for x in c]
        return batch.drop_columns(["image"]).append_column("captions", pa.array(captions, type=self.type))


# ---------------------------------------------------------------------------------------------- the pipeline


def model_files(checkpoint: str | Path) -> dict[str, bytes]:
    """The checkpoint directory's files (config, vocabulary, weights, card), to ship through the object store."""
    folder = Path(checkpoint)
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _pool(concurrency: int | tuple[int, int]):
    if isinstance(concurrency, int):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        return ray.data.ActorPoolStrategy(size=concurrency)
    lo, hi = concurrency
    if not 1 <= lo <= hi:
        raise ValueError(f"concurrency (min, max) needs 1 <= min <= max, got {concurrency}")
    return ray.data.ActorPoolStrategy(min_size=lo, max_size=hi)


def caption_dataset(ds: "ray.data.Dataset", checkpoint: str | Path | None = None, *, batch_size: int = 32,
                    concurrency: int | tuple[int, int] = 1, num_gpus: float = 0, workers: int | None = None,
                    precision: str = "auto", threads: int | None = None, seed: int | None = None,
                    generation: GenerationConfig | None = None, **options) -> "ray.data.Dataset":
    """Caption every row of ``ds`` (a ``path`` column; a ``bytes`` column, as read_binary_files(include_paths=True)
    gives, is decoded instead of reading the file). Lazy, like any Ray Dataset: iterate it or write it.

    checkpoint   model directory (default: the model shipped with the package)
    batch_size   images per model call
    concurrency  model actors: N, or (min, max) for a pool that Ray grows while there is work
    num_gpus     GPUs per actor (0: CPU actors; fractions share a GPU)
    workers      decode tasks running at once (default: as many as free CPUs allow)
    precision    auto, fp32, bf16 or fp16 ('auto' is resolved on each actor's device)
    threads      torch threads per CPU actor (default: all cores of its machine; set it when several CPU actors
                 share a machine)
    seed         torch seed of each actor (sampling)
    generation   how to caption (default GenerationConfig()); **options change its fields, as Captioner.caption's
    """
    from .api import default_checkpoint
    from .checkpoint import load_pretrained

    gen = with_options(generation, options)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_gpus < 0 or (workers is not None and workers < 1):
        raise ValueError("num_gpus must be >= 0 and workers >= 1")
    cols = ds.columns(fetch_if_missing=False)  # known without running anything for most sources
    if cols is not None and "path" not in cols:
        raise ValueError(f"the dataset needs a 'path' column (it has {cols}); "
                         "ray.data.read_binary_files(..., include_paths=True) gives one")
    ckpt = Path(checkpoint) if checkpoint is not None else default_checkpoint()
    cfg = load_pretrained(ckpt)[0].cfg  # a bad checkpoint fails here, on the driver, not in every actor
    if gen.attention and not cfg.attention:
        raise ValueError(f"attention: the model {cfg.name!r} ({ckpt}) has no attention decoder")
    files = ray.put(model_files(ckpt))
    # CPU actors: the model is the bottleneck and owns the cores; decoders run niced in its gaps, two per reserved
    # CPU (the local engine's 2 loader workers beside a 2-thread model). With GPUs decoding is the bottleneck: a
    # CPU each. The differing reservation also keeps Ray from fusing decoding into the actors, which would
    # serialise the two.
    env_nice = os.environ.get("CAPTIONER_LOADER_NICE")
    nice = int(env_nice) if env_nice is not None else (19 if num_gpus == 0 else 0)
    decoded = ds.map_batches(_decode, fn_kwargs=dict(pre=cfg.preprocess, nice=nice),
                             batch_size=batch_size, batch_format="pyarrow", num_cpus=0.5 if num_gpus == 0 else 1,
                             compute=ray.data.TaskPoolStrategy(size=workers) if workers else None)
    return decoded.map_batches(
        CaptionPredictor, batch_size=batch_size, batch_format="pyarrow", num_cpus=1, num_gpus=num_gpus or None,
        compute=_pool(concurrency),
        fn_constructor_kwargs=dict(model_files=[files], precision=precision, threads=threads, seed=seed,
                                   generation=gen))
