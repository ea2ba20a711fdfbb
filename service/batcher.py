"""A small generic dynamic batcher (Triton / Ray Serve ``@serve.batch`` style). It knows nothing about captions.

    batcher = DynamicBatcher(fn, max_batch_size=32, max_delay_ms=5, max_queue=256)
    await batcher.start()
    result = await batcher.submit(item, timeout=30)   # -> Result(value, queue_s, inference_s, batch_size)
    await batcher.stop()                              # refuse new items, answer every accepted one

    with batcher.announce() as arrival:               # optional: "an item is on its way" (e.g. still decoding)
        ...
        await batcher.submit(item, arrival=arrival)

``fn(list[item]) -> list[value]`` runs in a worker thread, so the event loop never blocks on the model; with
``workers=1`` (the default) batches reach the device one at a time, with ``workers=n`` up to n batches run at once,
each in its own thread. A batch starts forming only when a worker is free, so items that arrive while every worker
is busy join the next batch. A value that is an Exception instance fails only its own item.

When ``fn`` raises, the batch is split in halves and each half runs again, down to single items, so only the
item(s) that raise alone fail (BatchFailedError) and every other item gets its normal value: one poisoned request
never fails its neighbours. A batch of n with one culprit costs about 2·log2(n) extra calls; the split stops after
enough calls for RETRY_CULPRITS culprits (30 for n = 32), and what is still unresolved then fails together, so a
batch where everything raises (a broken device) costs at most 31 calls, not 2n - 1 = 63.

Items carry their deadline: one whose caller has gone (timed out, disconnected) or whose deadline has passed is
skipped while the batch forms, and its place goes to the next queued item, so batches stay full of live work.
(Predicting that an item *will* expire during its batch was tried and dropped: batch times under a burst of
uploads vary 15x with CPU contention, and the prediction threw away more servable requests than it saved work.)
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

log = logging.getLogger("service.batcher")

T = TypeVar("T")
R = TypeVar("R")


class QueueFullError(Exception):
    """The queue holds max_queue items: the caller should retry later (HTTP 503 + Retry-After)."""


class ShuttingDownError(Exception):
    """The batcher is stopping or stopped and takes no new items (HTTP 503)."""


class RequestTimeoutError(Exception):
    """The item was not answered within its timeout; its work is dropped (HTTP 504)."""


class BatchFailedError(Exception):
    """The batch holding this item raised; ``error_id`` is the id logged with the traceback (HTTP 500)."""

    def __init__(self, error_id: str, cause: BaseException) -> None:
        super().__init__(f"batch failed (error id {error_id}): {type(cause).__name__}: {cause}")
        self.error_id = error_id
        self.cause = cause


@dataclass
class Result(Generic[R]):
    value: R
    queue_s: float  # enqueue -> start of its batch
    inference_s: float  # the batch function's wall time
    batch_size: int  # items in the batch that ran it


@dataclass
class BatchStats:
    """What one batch did; handed to the on_batch hook (metrics)."""
    size: int
    queue_waits_s: list[float]
    inference_s: float
    failed: bool  # fn raised on the whole batch (its items were then retried in halves)
    dropped: int  # items skipped because their caller had gone (timeout, disconnect) or could not be served in time
    isolated: int = 0  # items failed after their batch raised: the culprits (and, past the retry budget, the rest)


@dataclass
class _Item:
    payload: Any
    future: asyncio.Future
    enqueued: float
    deadline: float  # perf_counter time after which nobody waits for the answer (inf: no timeout)


_STOP = object()
RETRY_CULPRITS = 3  # a failed batch is split far enough to isolate this many culprits (2·log2(n) calls each)


class Arrival:
    """An announced item: counts as 'coming' until it is submitted or its announce() block ends."""

    def __init__(self, batcher: "DynamicBatcher") -> None:
        self._batcher: DynamicBatcher | None = batcher
        batcher._announced += 1

    def close(self) -> None:
        b, self._batcher = self._batcher, None
        if b is not None:
            b._announced -= 1
            if b._not_empty is not None:
                b._not_empty.set()  # a waiting batch re-checks whether anything is still coming


class DynamicBatcher(Generic[T, R]):
    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R | BaseException]],
        max_batch_size: int = 32,
        max_delay_ms: float = 5.0,
        max_queue: int = 256,
        timeout_s: float | None = 30.0,
        on_batch: Callable[[BatchStats], None] | None = None,
        name: str = "batcher",
        idle_start: bool = False,
        workers: int = 1,
        initializer: Callable[[], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or workers < 1:
            raise ValueError("max_batch_size, max_queue and workers must be >= 1")
        self.workers = workers
        self.initializer = initializer  # run once in each worker thread (e.g. its torch thread count)
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1000
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.on_batch = on_batch
        self.name = name
        self.idle_start = idle_start
        self._announced = 0  # announce()d items not yet submitted
        self._items: collections.deque[_Item | object] = collections.deque()
        self._not_empty: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._accepting = False
        self.in_flight = 0  # items in the batches now running
        self._stop_queued = False
        self._forming = 0  # items taken for the next batch, waiting for it to fill or for max_delay

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._worker is not None:
            raise RuntimeError("batcher already started")
        self._not_empty = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=f"{self.name}-worker",
                                            initializer=self.initializer)
        self._worker = asyncio.create_task(self._run(), name=f"{self.name}-loop")
        self._accepting = True

    async def stop(self) -> None:
        """Refuse new items, finish every accepted one, then end the worker."""
        if self._worker is None:
            return
        self._accepting = False
        self._items.append(_STOP)  # after every accepted item: the worker drains them first
        self._stop_queued = True
        self._not_empty.set()
        try:
            await self._worker
        finally:
            self._worker = None
            self._executor.shutdown(wait=True)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def qsize(self) -> int:
        """Items waiting for their batch to start: queued, or taken into the batch being formed."""
        return len(self._items) - self._stop_queued + self._forming

    # ------------------------------------------------------------------ callers

    @contextlib.contextmanager
    def announce(self):
        """Tell the batcher an item is on its way; pass the yielded Arrival to submit(). Leaving the block
        without submitting (e.g. the input was invalid) withdraws it."""
        arrival = Arrival(self)
        try:
            yield arrival
        finally:
            arrival.close()

    async def submit(self, payload: T, timeout: float | None = None, arrival: Arrival | None = None) -> Result[R]:
        """Queue one item and wait for its value; raises QueueFullError, ShuttingDownError, RequestTimeoutError,
        BatchFailedError, or the item's own exception."""
        if arrival is not None:
            arrival.close()  # from here on it is queued (or refused), no longer 'coming'
        if not self._accepting:
            raise ShuttingDownError(f"{self.name} is shutting down")
        if self.qsize() >= self.max_queue:
            raise QueueFullError(f"{self.qsize()} requests are waiting (max_queue={self.max_queue})")
        loop = asyncio.get_running_loop()
        timeout = self.timeout_s if timeout is None else timeout
        now = time.perf_counter()
        item = _Item(payload, loop.create_future(), now, now + timeout if timeout is not None else float("inf"))
        self._items.append(item)
        self._not_empty.set()
        try:
            # on timeout (or when the caller is cancelled) wait_for cancels the future: the worker skips the item
            return await asyncio.wait_for(item.future, timeout)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"not answered within {timeout:g} s") from None

    # ------------------------------------------------------------------ worker

    async def _next(self, deadline: float | None) -> _Item | object | None:
        """The next queued item, or None when ``deadline`` (loop time) passes first (or, with idle_start, when
        nothing is queued or announced)."""
        loop = asyncio.get_running_loop()
        while not self._items:
            self._not_empty.clear()
            if deadline is not None and self.idle_start and self._announced == 0:
                return None
            if deadline is None:
                await self._not_empty.wait()
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._not_empty.wait(), remaining)
            except asyncio.TimeoutError:
                return None
        item = self._items.popleft()
        if item is _STOP:
            self._stop_queued = False
        return item

    def _admit(self, item: _Item) -> bool:
        """Whether a queued item still deserves a place in the batch being formed: its caller is waiting (not
        timed out, not disconnected) and its deadline has not passed. Its place otherwise goes to the next item,
        so batches stay full of work someone will read."""
        if item.future.done():
            return False
        if item.deadline <= time.perf_counter():
            item.future.set_exception(RequestTimeoutError("its deadline passed before its batch ran"))
            return False
        return True

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        free = asyncio.Semaphore(self.workers)
        running: set[asyncio.Task] = set()
        while not stopping:
            await free.acquire()  # a worker is free before the batch forms: items queue up meanwhile
            batch: list[_Item] = []
            deadline = None  # until the first admitted item: wait as long as it takes
            while len(batch) < self.max_batch_size:
                nxt = await self._next(deadline)
                if nxt is None:
                    break
                if nxt is _STOP:
                    stopping = True
                    break
                if not self._admit(nxt):
                    self._report(BatchStats(0, [], 0.0, False, 1))  # counted now: no batch may follow soon
                    continue
                batch.append(nxt)
                self._forming = len(batch)
                if deadline is None:
                    deadline = loop.time() + self.max_delay
            self._forming = 0
            if not batch:
                free.release()
                continue
            task = asyncio.create_task(self._run_batch(batch))
            running.add(task)
            task.add_done_callback(lambda t, batch=batch: (running.discard(t), free.release(),
                                                           self._settle(t, batch)))
        if running:
            await asyncio.wait(running)
        log.debug("%s: worker stopped", self.name)

    async def _run_batch(self, batch: list[_Item]) -> None:
        start = time.perf_counter()
        live = [it for it in batch if not it.future.done()]  # cancelled while the batch was forming
        dropped = len(batch) - len(live)
        if not live:
            self._report(BatchStats(0, [], 0.0, False, dropped))
            return
        waits = [start - it.enqueued for it in live]
        self.in_flight += len(live)
        try:
            failed, isolated = await self._call(live, start, len(live))
        finally:
            self.in_flight -= len(live)
        elapsed = time.perf_counter() - start
        self._report(BatchStats(len(live), waits, elapsed, failed, dropped, isolated))

    async def _call(self, items: list[_Item], start: float, batch_size: int, budget: list[int] | None = None
                    ) -> tuple[bool, int]:
        """Run fn on items and settle their futures; on an exception retry in halves while ``budget`` (extra calls
        left, shared by the whole split) lasts. Returns (raised, the number of items failed)."""
        if budget is None:  # enough for RETRY_CULPRITS culprits; a batch where everything raises stops there
            budget = [RETRY_CULPRITS * 2 * max(1, math.ceil(math.log2(max(len(items), 2))))]
        items = [it for it in items if not it.future.done()]  # a retry skips callers that gave up meanwhile
        if not items:
            return False, 0
        try:
            values = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.fn, [it.payload for it in items])
            if len(values) != len(items):
                raise RuntimeError(f"batch function returned {len(values)} values for {len(items)} items")
        except Exception as e:  # noqa: BLE001  (any failure of the batch fails its items, never the worker)
            if len(items) > 1 and budget[0] >= 2:
                log.warning("%s: batch of %d raised %s: %s; retrying in halves to find the culprit", self.name,
                            len(items), type(e).__name__, e)
                budget[0] -= 2
                half = len(items) // 2
                failed = 0
                for part in (items[:half], items[half:]):
                    failed += (await self._call(part, start, batch_size, budget))[1]
                return True, failed
            error_id = uuid.uuid4().hex[:12]
            what = "an item failed on its own" if len(items) == 1 else \
                f"{len(items)} items failed together (the retry budget for this batch is spent)"
            log.error("%s: %s, error id %s", self.name, what, error_id, exc_info=e)
            for it in items:
                if not it.future.done():
                    it.future.set_exception(BatchFailedError(error_id, e))
            return True, len(items)
        elapsed = time.perf_counter() - start
        for it, value in zip(items, values):
            if it.future.done():  # timed out while its batch ran: nobody is waiting
                continue
            if isinstance(value, BaseException):
                it.future.set_exception(value)
            else:
                it.future.set_result(Result(value, start - it.enqueued, elapsed, batch_size))
        return False, 0

    def _settle(self, task: asyncio.Task, batch: list[_Item]) -> None:
        """A batch task that ended by something _call does not catch (it catches Exception): say so, and fail its
        items that are still waiting instead of leaving them to their timeout."""
        error = None if task.cancelled() else task.exception()
        if task.cancelled() or error is not None:
            error_id = uuid.uuid4().hex[:12]
            log.error("%s: a batch of %d ended abnormally, error id %s", self.name, len(batch), error_id,
                      exc_info=error)
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(BatchFailedError(error_id, error or asyncio.CancelledError()))

    def _report(self, stats: BatchStats) -> None:
        if self.on_batch:
            try:
                self.on_batch(stats)
            except Exception:  # noqa: BLE001  (metrics must never stop the worker)
                log.exception("%s: on_batch hook failed", self.name)
