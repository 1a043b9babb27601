"""Prometheus metrics of an inference server, with ``prometheus_client`` (the ``serve`` extra).

Each server has its own ``CollectorRegistry`` (never the process-global one),
so two servers in one process, or a test and a server, do not share counts.
Every metric has a ``model`` label; names follow Prometheus conventions
(seconds, ``_total`` counters, histograms with fixed buckets):

* ``jaxopt_serve_requests_total{model,route,status}``: HTTP requests by route and status code.
* ``jaxopt_serve_request_errors_total{model,reason}``: failed inference requests by reason
  (``invalid``, ``too_large``, ``read_timeout``, ``deadline``, ``overloaded``, ``draining``, ``model_error``).
* ``jaxopt_serve_request_duration_seconds{model}``: inference request latency, body read to response.
* ``jaxopt_serve_queue_wait_seconds{model}``: time a request waited in the batcher's queue.
* ``jaxopt_serve_batch_duration_seconds{model}``: one engine call.
* ``jaxopt_serve_batch_size{model}``: rows per engine call.
* ``jaxopt_serve_batcher_requests_total{model,outcome}``: the batcher's own accounting
  (``submitted``, ``completed``, ``rejected``, ``timed_out``, ``failed``).
* ``jaxopt_serve_queue_depth{model}`` and ``jaxopt_serve_in_flight_requests{model}``: gauges.
* ``jaxopt_serve_compiles_total{model}``: executables compiled by the model's engine.
"""

from __future__ import annotations

from typing import Any

from jaxopt_serve.extras import require

# seconds: 100 us .. 10 s, fixed so that rates and quantiles can be computed across scrapes and restarts
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
ERROR_REASONS = ("invalid", "too_large", "read_timeout", "deadline", "overloaded", "draining", "model_error")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _client() -> Any:
    return require("prometheus_client", extra="serve", purpose="the server's Prometheus metrics")


class ServerMetrics:
    """The metrics of one server over its models (``{name: DynamicBatcher}``); ``exposition()`` renders them."""

    def __init__(self, batchers: dict[str, Any]) -> None:
        prom = _client()
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter(
            "jaxopt_serve_requests", "HTTP requests by route and status code.", ["model", "route", "status"], registry=r
        )
        self.errors = prom.Counter(
            "jaxopt_serve_request_errors", "Failed inference requests by reason.", ["model", "reason"], registry=r
        )
        self.latency = prom.Histogram(
            "jaxopt_serve_request_duration_seconds",
            "Inference request latency, from reading the body to the response.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = prom.Histogram(
            "jaxopt_serve_queue_wait_seconds",
            "Time a request waited in the batcher's queue.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_duration = prom.Histogram(
            "jaxopt_serve_batch_duration_seconds", "One engine call.", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = prom.Histogram(
            "jaxopt_serve_batch_size", "Rows per engine call.", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.in_flight = prom.Gauge(
            "jaxopt_serve_in_flight_requests", "Inference requests being served.", ["model"], registry=r
        )
        r.register(_BatcherCollector(batchers))
        for name, batcher in batchers.items():
            for reason in ERROR_REASONS:  # every series exists from the start: rate() needs a first sample
                self.errors.labels(name, reason)
            self.latency.labels(name)
            self.in_flight.labels(name)
            batcher.metrics.add_listener(_BatcherListener(self, name))

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return _client().generate_latest(self.registry)


class _BatcherListener:
    """Feeds one model's batcher events into the histograms (converted to seconds)."""

    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self.queue_wait = metrics.queue_wait.labels(model)
        self.batch_duration = metrics.batch_duration.labels(model)
        self.batch_size = metrics.batch_size.labels(model)

    def record_request(self, *, latency_ms: float, queue_ms: float) -> None:
        self.queue_wait.observe(queue_ms / 1e3)

    def record_batch(self, *, rows: int, bucket: int, exec_ms: float) -> None:
        self.batch_duration.observe(exec_ms / 1e3)
        self.batch_size.observe(rows)


class _BatcherCollector:
    """Reads the batchers' cumulative counts, queue depth and compile counts at scrape time."""

    def __init__(self, batchers: dict[str, Any]) -> None:
        self.batchers = batchers

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        outcomes = CounterMetricFamily(
            "jaxopt_serve_batcher_requests", "The batcher's requests by outcome.", labels=["model", "outcome"]
        )
        depth = GaugeMetricFamily(
            "jaxopt_serve_queue_depth", "Requests waiting in the batcher's queue.", labels=["model"]
        )
        compiles = CounterMetricFamily(
            "jaxopt_serve_compiles", "Executables compiled by the model's engine.", labels=["model"]
        )
        for name, batcher in self.batchers.items():
            snap = batcher.metrics.snapshot_counts()
            for outcome in ("submitted", "completed", "rejected", "timed_out", "failed"):
                outcomes.add_metric([name, outcome], snap[outcome])
            depth.add_metric([name], snap["queue_length"])
            compiles.add_metric([name], getattr(batcher.engine, "compile_count", snap["compile_count"]))
        yield outcomes
        yield depth
        yield compiles
