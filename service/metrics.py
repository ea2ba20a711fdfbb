"""Prometheus metrics, in a registry of the app's own (two apps in one process, e.g. tests, never collide).

Average batch size = captioner_batch_size_sum / captioner_batch_size_count (also per time window with rate()).
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .batcher import BatchStats

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch_size: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("captioner_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "method", "status"], registry=r)
        self.request_seconds = Histogram("captioner_request_duration_seconds", "HTTP request wall time",
                                         ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("captioner_queue_depth", "requests waiting for a batch", registry=r)
        self.in_flight = Gauge("captioner_batch_in_flight", "requests in the batches now running", registry=r)
        buckets = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if b < max_batch_size}
                         | {max_batch_size})
        self.batch_size = Histogram("captioner_batch_size", "requests per model batch",
                                    buckets=buckets, registry=r)
        self.queue_wait = Histogram("captioner_queue_wait_seconds", "time from enqueue to the start of its batch",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("captioner_inference_seconds", "wall time of one batch on the model",
                                   buckets=_LATENCY_BUCKETS, registry=r)
        self.images = Counter("captioner_images_processed", "images run through the model, by task",
                              ["task"], registry=r)
        self.batch_errors = Counter("captioner_batch_errors", "batches that raised (then retried in halves)",
                                    registry=r)
        self.isolated = Counter("captioner_isolated_failures",
                                "requests that raised on their own after their batch raised: only these failed",
                                registry=r)
        self.dropped = Counter("captioner_dropped_requests",
                               "queued requests skipped because their caller had gone (timeout, disconnect)",
                               registry=r)
        self.ready = Gauge("captioner_ready", "1 when the model is loaded and warmed up", registry=r)

    def bind_queue(self, qsize: Callable[[], int], in_flight: Callable[[], int]) -> None:
        self.queue_depth.set_function(qsize)
        self.in_flight.set_function(in_flight)

    def on_batch(self, stats: BatchStats) -> None:
        self.dropped.inc(stats.dropped)
        if stats.size == 0:
            return
        self.batch_size.observe(stats.size)
        self.inference.observe(stats.inference_s)
        for w in stats.queue_waits_s:
            self.queue_wait.observe(w)
        if stats.failed:
            self.batch_errors.inc()
            self.isolated.inc(stats.isolated)

    def render(self) -> bytes:
        return generate_latest(self.registry)
