"""The generic dynamic batcher, driven by plain batch functions with controllable sleeps (no model)."""
from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from service.batcher import (BatchFailedError, BatchStats, DynamicBatcher, QueueFullError, RequestTimeoutError,
                             ShuttingDownError)


class Recorder:
    """A batch function: records each batch, sleeps (in its thread), returns x * 10 (or raises on 'boom')."""

    def __init__(self, sleep: float = 0.0) -> None:
        self.sleep = sleep
        self.batches: list[list] = []
        self.threads: set[str] = set()

    def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.sleep)
        if "boom" in items:
            raise RuntimeError("boom in batch")
        return [ValueError(f"bad item {x}") if x == "bad" else x * 10 for x in items]


def run(coro):
    return asyncio.run(coro)


def test_items_queued_together_form_full_batches():
    fn, stats = Recorder(), []

    async def main():
        b = DynamicBatcher(fn, max_batch_size=4, max_delay_ms=50, on_batch=stats.append)
        await b.start()
        results = await asyncio.gather(*(b.submit(i) for i in range(10)))
        await b.stop()
        return results

    results = run(main())
    assert [r.value for r in results] == [i * 10 for i in range(10)]  # each caller gets its own answer
    assert [len(x) for x in fn.batches] == [4, 4, 2]
    assert [s.size for s in stats] == [4, 4, 2]
    assert [r.batch_size for r in results] == [4] * 8 + [2] * 2
    assert len(fn.threads) == 1 and threading.main_thread().name not in fn.threads


def test_lone_item_waits_at_most_max_delay():
    fn = Recorder()

    async def main():
        b = DynamicBatcher(fn, max_batch_size=8, max_delay_ms=80)
        await b.start()
        t0 = time.perf_counter()
        r = await b.submit(1)
        dt = time.perf_counter() - t0
        await b.stop()
        return r, dt

    r, dt = run(main())
    assert r.value == 10 and r.batch_size == 1
    assert 0.07 <= dt < 1.0, dt  # waited for company, then ran alone
    assert r.queue_s >= 0.07


def test_items_arriving_within_the_delay_join_the_batch():
    fn = Recorder()

    async def main():
        b = DynamicBatcher(fn, max_batch_size=8, max_delay_ms=300)
        await b.start()

        async def later(x, delay):
            await asyncio.sleep(delay)
            return await b.submit(x)

        rs = await asyncio.gather(later(1, 0), later(2, 0.05), later(3, 0.1))
        await b.stop()
        return rs

    rs = run(main())
    assert fn.batches == [[1, 2, 3]] and all(r.batch_size == 3 for r in rs)


def test_event_loop_keeps_running_while_a_batch_runs():
    fn = Recorder(sleep=0.3)  # time.sleep in the worker thread: would freeze the loop if run on it

    async def main():
        b = DynamicBatcher(fn, max_batch_size=1, max_delay_ms=0)
        await b.start()
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        await b.submit(1)
        t.cancel()
        await b.stop()
        return ticks

    assert run(main()) >= 10


def test_queue_full_raises():
    fn = Recorder(sleep=0.3)

    async def main():
        b = DynamicBatcher(fn, max_batch_size=1, max_delay_ms=0, max_queue=2)
        await b.start()
        first = asyncio.create_task(b.submit(0))
        await asyncio.sleep(0.05)  # item 0 is now running on the worker
        waiting = [asyncio.create_task(b.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0)
        assert b.qsize() == 2
        with pytest.raises(QueueFullError):
            await b.submit(3)
        rs = await asyncio.gather(first, *waiting)
        await b.stop()
        return rs

    assert [r.value for r in run(main())] == [0, 10, 20]
    assert 3 not in [x for batch in fn.batches for x in batch]


def test_timed_out_item_is_dropped_before_its_batch():
    fn, stats = Recorder(sleep=0.3), []

    async def main():
        b = DynamicBatcher(fn, max_batch_size=1, max_delay_ms=0, on_batch=stats.append)
        await b.start()
        first = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0.05)
        with pytest.raises(RequestTimeoutError):
            await b.submit(2, timeout=0.1)  # waits behind item 1 and gives up
        r = await first
        ok = await b.submit(3)
        await b.stop()
        return r, ok

    r, ok = run(main())
    assert (r.value, ok.value) == (10, 30)
    assert fn.batches == [[1], [3]]  # item 2's work never ran
    assert sum(s.dropped for s in stats) == 1


def test_a_raising_item_fails_alone_and_its_neighbours_are_answered(caplog):
    fn, stats = Recorder(), []

    async def main():
        b = DynamicBatcher(fn, max_batch_size=2, max_delay_ms=20, on_batch=stats.append)
        await b.start()
        pair = await asyncio.gather(b.submit("boom"), b.submit(1), return_exceptions=True)
        good = await b.submit(2)
        await b.stop()
        return pair, good

    with caplog.at_level(logging.WARNING, logger="service.batcher"):
        (bad, neighbour), good = run(main())
    assert isinstance(bad, BatchFailedError) and len(bad.error_id) >= 8
    assert bad.error_id in caplog.text and "boom in batch" in caplog.text  # the id leads to the traceback
    assert neighbour.value == 10 and neighbour.batch_size == 2  # answered as if nothing had happened
    assert fn.batches == [["boom", 1], ["boom"], [1], [2]]  # the batch, then its halves, then the worker goes on
    assert (stats[0].failed, stats[0].isolated, stats[0].size) == (True, 1, 2)
    assert good.value == 20 and not stats[1].failed


@pytest.mark.parametrize("poison", [[5], [0, 7], [1, 2, 3, 4, 5, 6, 7, 0]])
def test_bisection_finds_every_culprit_in_a_batch_of_8(poison):
    fn, stats = Recorder(), []
    items = ["boom" if i in poison else i for i in range(8)]

    async def main():
        b = DynamicBatcher(fn, max_batch_size=8, max_delay_ms=50, on_batch=stats.append)
        await b.start()
        rs = await asyncio.gather(*(b.submit(x) for x in items), return_exceptions=True)
        await b.stop()
        return rs

    rs = run(main())
    for i, r in enumerate(rs):
        if i in poison:
            assert isinstance(r, BatchFailedError), (i, r)
        else:
            assert r.value == i * 10, (i, r)
    assert len(stats) == 1 and stats[0].isolated == len(poison) and stats[0].failed
    calls = len(fn.batches) - 1
    assert calls <= 2 * len(poison) * 3  # each culprit costs at most 2 calls per level of the 3-level split
    assert fn.batches[0] == items


def test_a_batch_where_everything_raises_stops_splitting_at_the_retry_budget():
    fn, stats = Recorder(), []

    async def main():
        b = DynamicBatcher(fn, max_batch_size=32, max_delay_ms=50, on_batch=stats.append)
        await b.start()
        rs = await asyncio.gather(*(b.submit("boom") for _ in range(32)), return_exceptions=True)
        await b.stop()
        return rs

    rs = run(main())
    assert all(isinstance(r, BatchFailedError) for r in rs)
    assert len(fn.batches) <= 31  # not the 63 calls of a full split
    assert stats[0].isolated == 32 and stats[0].failed


def test_an_item_whose_caller_gave_up_leaves_its_batch_place_to_the_next():
    fn, stats = Recorder(sleep=0.2), []

    async def main():
        b = DynamicBatcher(fn, max_batch_size=2, max_delay_ms=0, on_batch=stats.append)
        await b.start()
        first = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0.02)  # item 1 runs alone for 0.2 s; meanwhile three more queue up
        gone = asyncio.create_task(b.submit(2, timeout=0.1))  # gives up while item 1 runs
        rest = [asyncio.create_task(b.submit(i)) for i in (3, 4)]
        with pytest.raises(RequestTimeoutError):
            await gone
        out = [await first, *[await t for t in rest]]
        await b.stop()
        return out

    assert [r.value for r in run(main())] == [10, 30, 40]
    assert fn.batches == [[1], [3, 4]]  # item 2's work never ran, and its place went to item 4: a full batch
    assert sum(s.dropped for s in stats) == 1


def test_exception_value_fails_only_that_item():
    fn = Recorder()

    async def main():
        b = DynamicBatcher(fn, max_batch_size=4, max_delay_ms=20)
        await b.start()
        rs = await asyncio.gather(b.submit(1), b.submit("bad"), b.submit(3), return_exceptions=True)
        await b.stop()
        return rs

    rs = run(main())
    assert rs[0].value == 10 and rs[2].value == 30
    assert isinstance(rs[1], ValueError) and "bad item" in str(rs[1])


def test_wrong_number_of_results_is_a_batch_failure():
    async def main():
        b = DynamicBatcher(lambda items: items[:-1], max_batch_size=2, max_delay_ms=20)
        await b.start()
        rs = await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)
        await b.stop()
        return rs

    rs = run(main())  # the halves return 0 values for 1 item: each fails alone, with the reason
    assert all(isinstance(e, BatchFailedError) and "returned 0 values for 1" in str(e) for e in rs)


def test_stop_drains_every_accepted_item_then_refuses():
    fn = Recorder(sleep=0.05)

    async def main():
        b = DynamicBatcher(fn, max_batch_size=2, max_delay_ms=10)
        await b.start()
        tasks = [asyncio.create_task(b.submit(i)) for i in range(7)]
        await asyncio.sleep(0)  # all seven are queued
        await b.stop()  # returns only when every accepted item is answered
        with pytest.raises(ShuttingDownError):
            await b.submit(99)
        # the worker is gone, so these can only complete if stop() already answered them
        results = await asyncio.wait_for(asyncio.gather(*tasks), 0.5)
        return [r.value for r in results]

    assert run(main()) == [i * 10 for i in range(7)]
    assert sum(len(x) for x in fn.batches) == 7


def test_qsize_counts_queued_and_forming_items():
    fn = Recorder()

    async def main():
        b = DynamicBatcher(fn, max_batch_size=8, max_delay_ms=200)
        await b.start()
        tasks = [asyncio.create_task(b.submit(i)) for i in range(3)]
        await asyncio.sleep(0.05)  # taken into the forming batch, which waits for more
        depth = b.qsize()
        await asyncio.gather(*tasks)
        after = b.qsize()
        await b.stop()
        return depth, after

    assert run(main()) == (3, 0)


def test_on_batch_reports_sizes_waits_and_failures():
    stats: list[BatchStats] = []

    async def main():
        b = DynamicBatcher(Recorder(sleep=0.02), max_batch_size=3, max_delay_ms=10, on_batch=stats.append)
        await b.start()
        await asyncio.gather(*(b.submit(i) for i in range(3)))
        await asyncio.gather(b.submit("boom"), return_exceptions=True)
        await b.stop()

    run(main())
    assert [(s.size, s.failed) for s in stats] == [(3, False), (1, True)]
    assert len(stats[0].queue_waits_s) == 3 and stats[0].inference_s >= 0.02


def test_idle_start_runs_a_lone_item_at_once():
    fn = Recorder()

    async def main():
        b = DynamicBatcher(fn, max_batch_size=8, max_delay_ms=500, idle_start=True)
        await b.start()
        t0 = time.perf_counter()
        r = await b.submit(1)
        dt = time.perf_counter() - t0
        await b.stop()
        return r, dt

    r, dt = run(main())
    assert r.value == 10 and dt < 0.25, dt  # nothing else queued or announced: no 500 ms wait


def test_idle_start_waits_for_announced_items_only_while_they_are_coming():
    fn = Recorder()

    async def main():
        b = DynamicBatcher(fn, max_batch_size=8, max_delay_ms=2000, idle_start=True)
        await b.start()

        async def slow_client(x, work_s):  # announces itself, then 'decodes' for work_s before submitting
            with b.announce() as arrival:
                await asyncio.sleep(work_s)
                return await b.submit(x, arrival=arrival)

        async def dropout():  # announces, then fails validation and never submits
            with b.announce():
                await asyncio.sleep(0.2)

        t0 = time.perf_counter()
        rs = await asyncio.gather(slow_client(1, 0), slow_client(2, 0.1), slow_client(3, 0.15), dropout())
        dt = time.perf_counter() - t0
        await b.stop()
        return rs, dt

    rs, dt = run(main())
    assert fn.batches == [[1, 2, 3]]  # the batch waited for the announced items...
    assert dt < 1.0, dt  # ...and stopped waiting once the last one had withdrawn, long before max_delay
    assert all(r.batch_size == 3 for r in rs[:3])


# ------------------------------------------------------------------ several model workers

def test_two_workers_run_two_batches_at_once():
    def needs_company(timeout):
        barrier = threading.Barrier(2, timeout=timeout)

        def fn(items):
            barrier.wait()  # returns only when another batch is running at the same moment
            return [x * 10 for x in items]
        return fn

    async def main(workers, timeout):
        b = DynamicBatcher(needs_company(timeout), max_batch_size=2, max_delay_ms=0, workers=workers)
        await b.start()
        results = await asyncio.gather(*(b.submit(i) for i in range(4)), return_exceptions=True)
        await b.stop()
        return results

    assert [r.value for r in run(main(2, 5))] == [0, 10, 20, 30]
    assert all(isinstance(r, BatchFailedError) for r in run(main(1, 0.2)))  # one worker: nobody to meet


def test_a_batch_forms_only_when_a_worker_is_free():
    fn, active, peak, lock = Recorder(sleep=0.3), [0], [0], threading.Lock()

    def counted(items):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return fn(items)
        finally:
            with lock:
                active[0] -= 1

    async def main():
        b = DynamicBatcher(counted, max_batch_size=4, max_delay_ms=0, workers=2)
        await b.start()
        first = [asyncio.ensure_future(b.submit(0))]
        await asyncio.sleep(0.05)
        first.append(asyncio.ensure_future(b.submit(1)))
        await asyncio.sleep(0.05)
        in_flight = b.in_flight  # both workers busy with a batch of one
        later = [asyncio.ensure_future(b.submit(i)) for i in range(2, 8)]  # arrive while both are busy
        results = await asyncio.gather(*first, *later)
        await b.stop()
        return in_flight, results

    in_flight, results = run(main())
    assert [r.value for r in results] == [i * 10 for i in range(8)]
    assert in_flight == 2 and peak[0] == 2
    # the six late items waited for a free worker, so they formed full batches instead of six batches of one
    assert [len(x) for x in fn.batches] == [1, 1, 4, 2]
    assert len(fn.threads) == 2


def test_stop_answers_the_items_of_every_running_batch():
    fn = Recorder(sleep=0.2)

    async def main():
        b = DynamicBatcher(fn, max_batch_size=2, max_delay_ms=0, workers=2)
        await b.start()
        futures = [asyncio.ensure_future(b.submit(i)) for i in range(6)]
        await asyncio.sleep(0.05)  # two batches running, two items queued
        await b.stop()
        return [r.value for r in await asyncio.gather(*futures)]  # none refused: all were accepted before stop

    assert run(main()) == [i * 10 for i in range(6)]


def test_a_batch_ended_by_a_base_exception_fails_its_items_and_the_batcher_goes_on(caplog):
    class Odd(BaseException):  # not an Exception: _call does not catch it
        pass

    def fn(items):
        if "odd" in items:
            raise Odd("not an Exception")
        return [x * 10 for x in items]

    async def main():
        b = DynamicBatcher(fn, max_batch_size=2, max_delay_ms=0, workers=2, timeout_s=30)
        await b.start()
        t0 = time.perf_counter()
        first = await asyncio.gather(b.submit("odd"), return_exceptions=True)
        waited = time.perf_counter() - t0
        later = await b.submit(4)
        await b.stop()
        return first, waited, later

    with caplog.at_level(logging.ERROR):
        (first,), waited, later = run(main())
    assert isinstance(first, BatchFailedError) and waited < 5  # failed at once, not at its 30 s timeout
    assert "ended abnormally" in caplog.text and later.value == 40
