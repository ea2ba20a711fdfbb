"""What one running service holds: the model, the batcher, the decode threads, readiness; and its lifecycle.

Loading and warm-up run in the background after the server starts listening, so /healthz answers at once and
/readyz turns 200 only when the model has run a few batches (the first real request is not the slow one).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from captioner.api import Captioner, default_checkpoint
from captioner.checkpoint import CheckpointError
from captioner.runtime import default_device, model_workers, set_thread_torch_threads

from .batcher import DynamicBatcher
from .images import ByteBudget
from .engine import CaptionJob, Engine, VQAJob
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("service")


class ServiceState:
    def __init__(self, settings: Settings, metrics: Metrics, captioner: Captioner | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.captioner: Captioner | None = captioner
        self.engine: Engine | None = None
        self.batcher: DynamicBatcher | None = None
        self.decode_pool: ThreadPoolExecutor | None = None
        self.decode_budget: ByteBudget | None = None
        self.status = "starting"  # starting -> loading -> warming up -> ready -> shutting down -> stopped | error
        self.error: str | None = None
        self.error_is_input = False  # the checkpoint's files are damaged or unreadable: the operator's to fix
        self.on_fatal: Callable[[str], None] | None = None  # set by `captioner serve`: stop the server
        self._load_task: asyncio.Task | None = None
        self.load_seconds: float | None = None
        self.model_workers = 1
        self._torch_threads = torch.get_num_threads()  # given back at stop(): a service run in-process (tests)
        self.uploads_cut = asyncio.Event()  # set shutdown_timeout_s after SIGTERM: uploads still arriving are cut

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @property
    def checkpoint(self) -> Path:
        return Path(self.settings.checkpoint) if self.settings.checkpoint else default_checkpoint()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        s = self.settings
        self.decode_pool = ThreadPoolExecutor(s.decode_workers, thread_name_prefix="decode")
        self.decode_budget = ByteBudget(s.decode_memory_mb << 20)
        self._load_task = asyncio.create_task(self._load_and_warm_up(), name="load-model")

    async def _load_and_warm_up(self) -> None:
        s = self.settings
        t0 = time.perf_counter()
        try:
            device = self.captioner.device if self.captioner is not None else \
                default_device() if s.device in (None, "auto") else torch.device(s.device)
            self.model_workers, threads = model_workers(device, s.torch_threads or self._torch_threads,
                                                        s.model_workers)
            torch.set_num_threads(threads)  # before loading: the onnxruntime encoder backend takes torch's count
            if self.captioner is None:
                self.status = "loading"
                log.info("loading %s on %s (%s)", self.checkpoint, s.device or "auto", s.precision)
                self.captioner = await asyncio.to_thread(Captioner.from_pretrained, self.checkpoint, s.device,
                                                         s.precision, s.channels_last, s.encode_batch_size,
                                                         encoder_backend=s.encoder_backend)
            self.engine = Engine(self.captioner, on_images=lambda task, n: self.metrics.images.labels(task).inc(n))
            self.batcher = DynamicBatcher(self.engine, s.max_batch_size, s.max_delay_ms, s.max_queue,
                                          s.request_timeout_s, on_batch=self.metrics.on_batch, name="model",
                                          idle_start=True, workers=self.model_workers,
                                          initializer=functools.partial(set_thread_torch_threads, threads))
            self.metrics.bind_queue(self.batcher.qsize, lambda: self.batcher.in_flight)
            if s.warmup:
                self.status = "warming up"
                await asyncio.to_thread(self._warm_up)
            await self.batcher.start()
        except Exception as e:  # noqa: BLE001  (reported through /readyz and the log, then the server stops)
            self.status, self.error = "error", f"{type(e).__name__}: {e}"
            self.error_is_input = isinstance(e, (CheckpointError, OSError))
            if self.error_is_input:  # one clear line: a traceback would only hide it
                log.error("could not load the model from %s: %s", self.checkpoint, e)
            else:
                log.exception("could not load the model from %s", self.checkpoint)
            if self.on_fatal:
                self.on_fatal(self.error)
            return
        self.load_seconds = time.perf_counter() - t0
        if self.status not in ("loading", "warming up", "starting"):  # SIGTERM came while it loaded: stay down
            return
        self.status = "ready"
        self.metrics.ready.set(1)
        cfg = self.captioner.cfg
        log.info("ready: %s v%s on %s, precision %s (asked: %s), in %.1f s (max_batch_size=%d, max_delay_ms=%g, "
                 "model_workers=%d x %d torch threads, vqa=%s)", cfg.name, cfg.version, self.captioner.device,
                 self.captioner.precision, s.precision, self.load_seconds, s.max_batch_size, s.max_delay_ms,
                 self.model_workers, torch.get_num_threads(), self.captioner.can_answer)

    def _warm_up(self) -> None:
        """Run a batch of one and a full batch of each task once, outside the metrics (own Engine, no callback)."""
        cap = self.captioner
        size = cap.cfg.preprocess.image_size
        engine = Engine(cap)
        x = np.zeros((size, size, 3), np.uint8)  # what load_upload gives
        for n in sorted({1, self.settings.max_batch_size}):
            jobs: list = [CaptionJob(x) for _ in range(n)]
            if cap.can_answer:
                jobs[-1] = VQAJob(x, "what is it", ["a dog", "a cat"])
            engine(jobs)

    def begin_drain(self) -> None:
        """SIGTERM arrived (the server stops accepting connections): new requests on open connections get 503,
        uploads still arriving after shutdown_timeout_s are cut, queued requests are answered."""
        if self.status in ("shutting down", "stopped"):
            return
        if self.status != "error":
            self.status = "shutting down"
        self.metrics.ready.set(0)
        log.info("shutdown requested: uploads still arriving in %g s will be cut", self.settings.shutdown_timeout_s)
        asyncio.get_running_loop().call_later(self.settings.shutdown_timeout_s, self.uploads_cut.set)

    async def stop(self) -> None:
        """Refuse new requests (503), answer every accepted one, release the threads."""
        if self.status != "error":
            self.status = "shutting down"
        self.metrics.ready.set(0)
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
            try:
                await self._load_task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if self.batcher is not None:
            await self.batcher.stop()
        if self.decode_pool is not None:
            self.decode_pool.shutdown(wait=True)
        torch.set_num_threads(self._torch_threads)
        if self.status != "error":
            self.status = "stopped"
