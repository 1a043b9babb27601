"""Serving metrics: latency percentiles, queue and execution time, batch and padding histograms, counters.

``ServingMetrics`` is updated by the batcher's threads (under a lock) and
read as a plain dict (``snapshot()``), the view for notebooks and logs;
latency percentiles cover the most recent ``window`` requests. Listeners
(``add_listener``) see every recorded request and batch as it happens: the
server's Prometheus metrics (``jaxopt_serve.serve.prometheus``) are one, with
cumulative counters and fixed-bucket histograms in seconds.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

import numpy as np

_PERCENTILES = (50, 95, 99)


class ServingMetrics:
    """Counters and distributions of one batcher.

    Example:
        >>> m = ServingMetrics()
        >>> m.record_batch(rows=3, bucket=4, exec_ms=1.5)
        >>> for ms in (1.0, 2.0, 3.0):
        ...     m.record_request(latency_ms=ms, queue_ms=0.5)
        >>> snap = m.snapshot()
        >>> snap["completed"], snap["latency_ms"]["p50"], snap["padding_rows"]
        (3, 2.0, {'1': 1})
    """

    def __init__(self, *, window: int = 10000) -> None:
        self._lock = threading.Lock()
        self._latency: collections.deque[float] = collections.deque(maxlen=window)
        self._queue: collections.deque[float] = collections.deque(maxlen=window)
        self._exec: collections.deque[float] = collections.deque(maxlen=window)
        self.batch_rows: collections.Counter[int] = collections.Counter()
        self.padding_rows: collections.Counter[int] = collections.Counter()
        self.counts = {"submitted": 0, "completed": 0, "rejected": 0, "timed_out": 0, "failed": 0}
        self.queue_length = 0
        self.compile_count = 0
        self._listeners: list[Any] = []

    def add_listener(self, listener: Any) -> None:
        """Call ``listener.record_request(latency_ms=, queue_ms=)`` and ``listener.record_batch(rows=, bucket=,
        exec_ms=)`` for every request and batch recorded from now on (from the batcher's worker thread)."""
        self._listeners.append(listener)

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def record_request(self, *, latency_ms: float, queue_ms: float) -> None:
        self.record_requests(latency_ms=[latency_ms], queue_ms=[queue_ms])

    def record_requests(self, *, latency_ms: list[float], queue_ms: list[float]) -> None:
        """``record_request`` for each request of a batch, under one acquisition of the lock."""
        with self._lock:
            self._latency.extend(latency_ms)
            self._queue.extend(queue_ms)
            self.counts["completed"] += len(latency_ms)
        for listener in self._listeners:
            for latency, queue in zip(latency_ms, queue_ms):
                listener.record_request(latency_ms=latency, queue_ms=queue)

    def record_batch(self, *, rows: int, bucket: int, exec_ms: float) -> None:
        with self._lock:
            self._exec.append(exec_ms)
            self.batch_rows[rows] += 1
            self.padding_rows[bucket - rows] += 1
        for listener in self._listeners:
            listener.record_batch(rows=rows, bucket=bucket, exec_ms=exec_ms)

    def snapshot_counts(self) -> dict[str, int]:
        """The counters, queue length and compile count alone (cheap: no percentiles)."""
        with self._lock:
            return {**self.counts, "queue_length": self.queue_length, "compile_count": self.compile_count}

    def snapshot(self) -> dict[str, Any]:
        """Everything as JSON-ready values (milliseconds; percentiles over the recent window)."""
        with self._lock:
            return {
                **self.counts,
                "queue_length": self.queue_length,
                "compile_count": self.compile_count,
                "latency_ms": _summary(self._latency),
                "queue_ms": _summary(self._queue),
                "exec_ms": _summary(self._exec),
                "batch_rows": {str(k): v for k, v in sorted(self.batch_rows.items())},
                "padding_rows": {str(k): v for k, v in sorted(self.padding_rows.items())},
            }


def _summary(values: collections.deque[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0, **{f"p{p}": None for p in _PERCENTILES}, "mean": None}
    array = np.fromiter(values, float)
    out = {"count": len(array), **{f"p{p}": float(np.percentile(array, p)) for p in _PERCENTILES}}
    out["mean"] = float(array.mean())
    return out
