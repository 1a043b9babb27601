"""Dynamic batching in front of the inference engine.

Callers ``submit(x)`` (a batch of one or more examples) and get a
``concurrent.futures.Future``; ``await batcher.predict_async(x)`` is the asyncio
form. A request is whatever the engine takes as one input: an array, a pytree
(``{"input_ids": ..., "attention_mask": ...}``), or a tuple of the inputs of a
model with several; axis 0 of every leaf holds the request's rows. One worker
thread takes waiting requests in arrival order until their rows reach
``max_batch`` or ``max_wait_ms`` has passed since the first one, concatenates
them leaf by leaf, runs them as one engine call (the engine pads to its
bucket) and hands each request its own rows of every output leaf back. With
an engine that buckets sequence lengths (``length_buckets``), requests of
different lengths are zero-padded to the longest one in the batch and every
request's outputs are cut back to its own length along ``output_length_axes``.

Overload is explicit: the queue holds at most ``max_queue`` requests and
``submit`` on a full queue raises ``Overloaded`` at once. A request whose
``timeout`` passes before it runs fails with ``RequestTimeout`` (and is not
run). ``close()`` stops intake and finishes every accepted request before
returning. Every submitted request ends exactly one way: result, rejection,
timeout, or an error from the model.

Non-finite inputs follow the engine's ``nan_policy``: under ``"error"``
``submit`` refuses such a request at once (``ValueError`` naming its rows),
so it never joins a batch; under ``"propagate"`` its non-finite rows run as
zero rows and come back NaN, and no request's outputs depend on the requests
batched with it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import numbers
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxopt_serve.engine.pytrees import batch_rows, concat_rows, take_rows
from jaxopt_serve.serve.metrics import ServingMetrics


class Overloaded(RuntimeError):
    """The request queue is full: the request was rejected, not queued."""


class RequestTimeout(TimeoutError):
    """The request waited longer than its timeout and was not run."""


class Closed(RuntimeError):
    """The batcher is shutting down and accepts no new requests."""


class _Request:
    __slots__ = ("x", "rows", "length", "future", "arrived", "deadline", "loop")

    def __init__(
        self,
        x: Any,
        rows: int,
        length: int | None,
        deadline: float | None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.x = x  # a checked request: an array or a pytree of arrays, rows on axis 0 of every leaf
        self.rows = rows
        self.length = length  # its sequence length, for an engine with length buckets
        self.loop = loop  # asyncio requests: resolved on their loop, one wake-up per batch
        self.future: Any = loop.create_future() if loop is not None else concurrent.futures.Future()
        self.arrived = time.perf_counter()
        self.deadline = deadline


def _settle(settled: list[tuple[_Request, Any, BaseException | None]]) -> None:
    """Hand results (or errors) to their futures: thread futures directly, asyncio ones once per loop."""
    by_loop: dict[Any, list] = {}
    for request, value, error in settled:
        if request.loop is None:
            if error is None:
                request.future.set_result(value)
            else:
                request.future.set_exception(error)
        else:
            by_loop.setdefault(request.loop, []).append((request.future, value, error))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, items)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _resolve(items: list) -> None:
    for future, value, error in items:
        if future.done():  # cancelled by its caller
            continue
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)


class DynamicBatcher:
    """Group concurrent requests into engine batches.

    Args:
        engine: an ``InferenceEngine`` (or anything with ``check_input``, ``__call__``,
            ``bucket_for``, ``max_batch`` and ``compile_count``; ``request_length``,
            ``pad_request`` and ``cut_outputs`` when it has ``length_buckets``).
        max_batch: rows per engine call (default: the engine's largest bucket).
        max_wait_ms: how long the first request of a batch may wait for company; 0 (default)
            batches greedily: whatever queued while the engine was busy runs next, so an idle
            server adds no delay and a busy one batches by itself.
        max_queue: requests that may wait; more are rejected with ``Overloaded``.
        timeout_s: default per-request timeout (``None``: none).
        max_request_rows: the largest request accepted (default ``max_batch``).
        preferred_batch_sizes: batch sizes to cut the queue at (as Triton's option of that name):
            of the whole waiting requests a batch could take (up to ``max_batch`` rows), it takes
            the longest run from the front whose rows add up to a preferred size exactly, and
            leaves the rest for the next batch; when no run adds up to one, it takes them all.
            With ``max_wait_ms``, a batch runs as soon as whole waiting requests add up to a
            preferred size (Triton's rule); otherwise the first request waits up to the delay.
            For a model whose batch of 32 costs much more than a batch of 16, ``(16, 32)`` keeps
            26 waiting requests from running as one padded batch of 32 and a small one behind it,
            the split a closed loop of clients otherwise settles into. ``None`` (default): take
            them all.

    Example:
        >>> import numpy as np
        >>> from jaxopt_serve.engine import InferenceEngine
        >>> from jaxopt_serve.models import MLPConfig, init_variables
        >>> cfg = MLPConfig(features=(8,))
        >>> with DynamicBatcher(InferenceEngine(cfg, init_variables(cfg, 0), max_batch=8)) as batcher:
        ...     futures = [batcher.submit(np.zeros((1, 8, 8, 1), np.float32)) for _ in range(5)]
        ...     [f.result().shape for f in futures][:2]
        [(1, 10), (1, 10)]
    """

    def __init__(
        self,
        engine: Any,
        *,
        max_batch: int | None = None,
        max_wait_ms: float = 0.0,
        max_queue: int = 1024,
        timeout_s: float | None = None,
        max_request_rows: int | None = None,
        preferred_batch_sizes: Sequence[int] | None = None,
    ) -> None:
        self.engine = engine
        self.max_batch = max_batch or engine.max_batch
        self.max_wait = max_wait_ms / 1e3
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.max_request_rows = max_request_rows or self.max_batch
        if self.max_batch <= 0 or max_queue <= 0 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be > 0 and max_wait_ms >= 0")
        preferred = list(preferred_batch_sizes or ())
        if any(
            not isinstance(n, numbers.Integral) or isinstance(n, bool) or not 0 < n <= self.max_batch for n in preferred
        ):
            raise ValueError(
                f"preferred_batch_sizes must be integers in [1, max_batch={self.max_batch}], got {preferred}"
            )
        self.preferred_batch_sizes = frozenset(int(n) for n in preferred)
        self.metrics = ServingMetrics()
        self._queue: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._worker = threading.Thread(target=self._run, name="jaxopt-serve-batcher", daemon=True)
        self._worker.start()

    # -- intake -------------------------------------------------------------------------------------

    def submit(self, x: Any, *, timeout_s: float | None = None, _loop: Any = None, _checked: bool = False) -> Any:
        """Queue ``x`` (a batch of examples, any pytree the engine takes); its future resolves to their outputs.

        Raises (at once, nothing queued):
            ValueError: ``x`` does not fit the model, or has more rows than ``max_request_rows``.
            Overloaded: the queue is full.
            Closed: the batcher is shutting down.
        """
        if not _checked:  # (a caller that already checked ``x`` against the engine, the server, skips this)
            x = self.engine.check_input(x)
        rows = batch_rows(x)
        if rows > self.max_request_rows:
            raise ValueError(f"a request may hold at most {self.max_request_rows} examples, got {rows}")
        length = self.engine.request_length(x) if getattr(self.engine, "length_buckets", None) else None
        timeout = self.timeout_s if timeout_s is None else timeout_s
        request = _Request(x, rows, length, time.perf_counter() + timeout if timeout is not None else None, _loop)
        with self._cond:
            if self._closing:
                raise Closed("the batcher is shutting down; no new requests")
            self.metrics.count("submitted")
            if len(self._queue) >= self.max_queue:
                self.metrics.count("rejected")
                raise Overloaded(f"request queue full ({self.max_queue} waiting); retry later")
            self._queue.append(request)
            self.metrics.queue_length = len(self._queue)
            self._cond.notify()
        return request.future

    def predict(self, x: Any, *, timeout_s: float | None = None) -> Any:
        """``submit(x).result()``: block until the outputs are ready."""
        return self.submit(x, timeout_s=timeout_s).result()

    async def predict_async(self, x: Any, *, timeout_s: float | None = None, _checked: bool = False) -> Any:
        """The asyncio form of ``predict``: the outputs for ``x``, awaited on the running loop.

        The worker resolves all of a batch's requests from one loop with a
        single thread-safe callback, so many concurrent coroutines cost one
        wake-up per batch instead of one per request.
        """
        return await self.submit(x, timeout_s=timeout_s, _loop=asyncio.get_running_loop(), _checked=_checked)

    # -- the worker ----------------------------------------------------------------------------------

    def _take(self) -> list[_Request] | None:
        """The next batch of requests, or ``None`` when closed and drained."""
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            first_arrival = self._queue[0].arrived
            while True:
                rows = sum(r.rows for r in self._queue)
                remaining = first_arrival + self.max_wait - time.perf_counter()
                # a preferred size runs at once (Triton's rule)
                if rows >= self.max_batch or remaining <= 0 or self._closing or self._preferred_cut() is not None:
                    break
                self._cond.wait(remaining)
            batch, rows, limit = [], 0, self._preferred_cut() or self.max_batch
            while self._queue and (not batch or rows + self._queue[0].rows <= limit):
                request = self._queue.popleft()
                batch.append(request)
                rows += request.rows
            self.metrics.queue_length = len(self._queue)
            return batch

    def _preferred_cut(self) -> int | None:
        """The largest preferred size that whole waiting requests from the front add up to (within ``max_batch``
        rows), or ``None``."""
        rows, cut = 0, None
        for request in self._queue if self.preferred_batch_sizes else ():
            rows += request.rows
            if rows > self.max_batch:
                break
            if rows in self.preferred_batch_sizes:
                cut = rows
        return cut

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            now = time.perf_counter()
            live, settled = [], []
            for request in batch:
                if request.deadline is not None and now > request.deadline:
                    self.metrics.count("timed_out")
                    settled.append((request, None, RequestTimeout("request timed out in the queue")))
                elif request.loop is not None or request.future.set_running_or_notify_cancel():
                    live.append(request)
            if live:
                x = self._combine(live)
                start = time.perf_counter()
                try:
                    out = self.engine(x)
                except Exception as err:  # noqa: BLE001 - reported to every caller of this batch
                    self.metrics.count("failed", len(live))
                    settled += [(request, None, err) for request in live]
                else:
                    done = time.perf_counter()
                    rows = sum(r.rows for r in live)
                    bucket = self.engine.bucket_for(min(rows, self.engine.max_batch))
                    self.metrics.record_batch(rows=rows, bucket=bucket, exec_ms=(done - start) * 1e3)
                    self.metrics.compile_count = self.engine.compile_count
                    offset = 0
                    for request in live:
                        settled.append((request, self._own(out, offset, request), None))
                        offset += request.rows
                    arrivals = [r.arrived for r in live]
                    self.metrics.record_requests(
                        latency_ms=[(done - t) * 1e3 for t in arrivals], queue_ms=[(start - t) * 1e3 for t in arrivals]
                    )
            _settle(settled)

    def _combine(self, live: list[_Request]) -> Any:
        """One engine batch: the requests concatenated leaf by leaf (padded to one length first, if any)."""
        if len(live) == 1:
            return live[0].x
        requests = [r.x for r in live]
        if type(requests[0]) is np.ndarray and live[0].length is None:  # one array per request: no pytree walk
            return np.concatenate(requests)
        lengths = {r.length for r in live}
        if len(lengths) > 1:
            longest = max(lengths)
            requests = [self.engine.pad_request(x, longest) for x in requests]
        return concat_rows(requests)

    def _own(self, out: Any, offset: int, request: _Request) -> Any:
        """A request's rows of every output leaf (cut back to its own length, if any)."""
        if type(out) is np.ndarray and request.length is None:  # one output array: no pytree walk
            return out[offset : offset + request.rows]
        mine = take_rows(out, offset, offset + request.rows)
        return self.engine.cut_outputs(mine, request.length) if request.length is not None else mine

    # -- shutdown -------------------------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting requests, finish every accepted one, stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._worker.join(timeout)

    def __enter__(self) -> DynamicBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
