import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from jaxopt_serve.engine import InferenceEngine
from jaxopt_serve.models import MLPConfig, init_variables
from jaxopt_serve.serve import Closed, DynamicBatcher, Overloaded, RequestTimeout

CONFIG = MLPConfig(features=(16,))


@pytest.fixture(scope="module")
def engine():
    return InferenceEngine(CONFIG, init_variables(CONFIG, 0), max_batch=16).warmup()


class SlowEngine:
    """The real engine, plus a fixed delay per call: makes queues fill up on purpose."""

    def __init__(self, engine, delay):
        self.engine, self.delay = engine, delay
        self.max_batch, self.input_dtype = engine.max_batch, engine.input_dtype

    def check_input(self, x):
        return self.engine.check_input(x)

    def bucket_for(self, n):
        return self.engine.bucket_for(n)

    @property
    def compile_count(self):
        return self.engine.compile_count

    def __call__(self, x):
        time.sleep(self.delay)
        return self.engine(x)


def test_concurrent_requests_get_their_own_rows_back(engine):
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(int(rng.integers(1, 5)), 8, 8, 1)).astype(np.float32) for _ in range(200)]
    with DynamicBatcher(engine, max_wait_ms=5) as batcher, ThreadPoolExecutor(16) as pool:
        outputs = list(pool.map(batcher.predict, inputs))
        snapshot = batcher.metrics.snapshot()
    for x, out in zip(inputs, outputs):
        np.testing.assert_allclose(out, engine(x), rtol=1e-5, atol=1e-6)
    assert snapshot["completed"] == 200 and snapshot["submitted"] == 200
    assert max(int(k) for k in snapshot["batch_rows"]) > 4  # requests really were grouped
    assert sum(snapshot["batch_rows"].values()) < 200
    assert snapshot["latency_ms"]["p99"] >= snapshot["latency_ms"]["p50"] > 0


def test_overload_every_request_ends_as_result_rejection_or_timeout(engine):
    slow = SlowEngine(engine, delay=0.004)  # ~4 rows per 4 ms: about 1,000 requests/s sustainable
    batcher = DynamicBatcher(slow, max_batch=4, max_wait_ms=1, max_queue=8, timeout_s=0.03)
    outcomes = {"result": 0, "rejected": 0, "timeout": 0}
    lock = threading.Lock()
    x = np.zeros((1, 8, 8, 1), np.float32)

    def client(n):
        futures = []
        for _ in range(n):  # as fast as possible: far over 10x the sustainable rate
            try:
                futures.append(batcher.submit(x))
            except Overloaded:
                with lock:
                    outcomes["rejected"] += 1
        for f in futures:
            try:
                f.result(timeout=10)
                kind = "result"
            except RequestTimeout:
                kind = "timeout"
            with lock:
                outcomes[kind] += 1

    threads = [threading.Thread(target=client, args=(250,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    snapshot = batcher.metrics.snapshot()
    assert sum(outcomes.values()) == 1000 == snapshot["submitted"]
    assert outcomes["rejected"] == snapshot["rejected"] > 0
    assert outcomes["timeout"] == snapshot["timed_out"]
    assert outcomes["result"] == snapshot["completed"] > 0


def test_shutdown_finishes_every_accepted_request(engine):
    batcher = DynamicBatcher(SlowEngine(engine, delay=0.002), max_batch=4, max_wait_ms=1)
    futures = [batcher.submit(np.full((1, 8, 8, 1), i, np.float32)) for i in range(60)]
    batcher.close()  # returns once the queue is drained
    assert all(f.done() and f.exception() is None for f in futures)
    np.testing.assert_allclose(futures[7].result(), engine(np.full((1, 8, 8, 1), 7, np.float32)), rtol=1e-5)
    with pytest.raises(Closed):
        batcher.submit(np.zeros((1, 8, 8, 1), np.float32))


def test_asyncio_form(engine):
    async def main(batcher):
        xs = [np.full((2, 8, 8, 1), i, np.float32) for i in range(10)]
        return xs, await asyncio.gather(*(batcher.predict_async(x) for x in xs))

    with DynamicBatcher(engine) as batcher:
        xs, outs = asyncio.run(main(batcher))
    for x, out in zip(xs, outs):
        np.testing.assert_allclose(out, engine(x), rtol=1e-5)


def test_bad_requests_fail_at_submit_and_leave_others_alone(engine):
    with DynamicBatcher(engine, max_request_rows=8) as batcher:
        good = batcher.submit(np.zeros((1, 8, 8, 1), np.float32))
        with pytest.raises(ValueError, match="expected a batch of shape"):
            batcher.submit(np.zeros((1, 4), np.float32))
        with pytest.raises(ValueError, match="at most 8 examples, got 9"):
            batcher.submit(np.zeros((9, 8, 8, 1), np.float32))
        assert good.result().shape == (1, 10)
        assert batcher.metrics.snapshot()["submitted"] == 1


def test_metrics_listeners_see_every_request_and_batch(engine):
    seen = {"requests": [], "batches": []}

    class Listener:
        def record_request(self, *, latency_ms, queue_ms):
            seen["requests"].append((latency_ms, queue_ms))

        def record_batch(self, *, rows, bucket, exec_ms):
            seen["batches"].append((rows, bucket))

    with DynamicBatcher(engine) as batcher:
        batcher.metrics.add_listener(Listener())
        batcher.predict(np.zeros((3, 8, 8, 1), np.float32))
        counts = batcher.metrics.snapshot_counts()
    assert seen["batches"] == [(3, 4)]  # 3 rows ran in the 4-row bucket
    assert len(seen["requests"]) == 1 and seen["requests"][0][0] >= seen["requests"][0][1] >= 0
    assert counts["completed"] == 1 and counts["submitted"] == 1 and counts["queue_length"] == 0


class GatedEngine(SlowEngine):
    """The real engine; its first call waits for ``open`` (so a queue builds up behind it); records batch sizes."""

    def __init__(self, engine):
        super().__init__(engine, 0.0)
        self.open, self.sizes = threading.Event(), []

    def __call__(self, x):
        self.sizes.append(len(x))
        self.open.wait(30)
        return self.engine(x)


@pytest.mark.parametrize(
    "preferred, rows, batches",
    [
        (None, [1] * 13, [13]),  # greedy: all that waited
        ((4, 8), [1] * 13, [8, 4, 1]),  # the largest preferred size the queue adds up to, each time
        ((4, 8), [1] * 7, [4, 3]),
        ((4, 8), [1] * 3, [3]),  # no preferred size reached: all of them
        ((8,), [5, 3, 4], [8, 4]),  # whole requests that add up to 8
        ((8,), [3, 3, 3, 3], [12]),  # no run of whole requests adds up to 8: one batch, as greedy
        ((6,), [3, 3, 3, 3], [6, 6]),
        (np.array([8]), [5, 5, 5], [15]),
    ],
)
def test_preferred_batch_sizes_cut_the_queue(engine, preferred, rows, batches):
    gated = GatedEngine(engine)
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(n, 8, 8, 1)).astype(np.float32) for n in rows]
    with DynamicBatcher(gated, max_batch=16, preferred_batch_sizes=preferred) as batcher:
        first = batcher.submit(inputs[0][:1])
        while not gated.sizes:  # the worker holds the first request in the engine
            time.sleep(0.001)
        futures = [batcher.submit(x) for x in inputs]
        gated.open.set()
        outputs = [f.result(30) for f in [first, *futures]]
    assert gated.sizes == [1, *batches]
    for x, out in zip([inputs[0][:1], *inputs], outputs):
        np.testing.assert_allclose(out, engine(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "rows, delay_ms, batches",
    [
        ((3, 5), 60_000, {"8": 1}),  # adds up to a preferred size: runs well before the minute's delay
        ((1, 1, 1, 1), 60_000, {"4": 1}),  # the smaller preferred size too (as Triton's)
        ((3, 3, 3), 300, {"9": 1}),  # no preferred size: waits out the delay, then takes them all
    ],
)
def test_a_batch_that_adds_up_to_a_preferred_size_does_not_wait_out_max_wait(engine, rows, delay_ms, batches):
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(n, 8, 8, 1)).astype(np.float32) for n in rows]
    with DynamicBatcher(engine, max_batch=16, max_wait_ms=delay_ms, preferred_batch_sizes=(4, 8)) as batcher:
        start = time.perf_counter()
        with batcher._cond:  # queued together, so the worker sees them all at once
            futures = [batcher.submit(x) for x in inputs]
        outputs = [f.result(30) for f in futures]
        waited = time.perf_counter() - start
        assert batcher.metrics.snapshot()["batch_rows"] == batches
    if delay_ms < 1000:
        assert waited >= 0.9 * delay_ms / 1e3
    for x, out in zip(inputs, outputs):
        np.testing.assert_allclose(out, engine(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preferred", [(0, 8), (17,), (8.0,), (True,)])
def test_preferred_batch_sizes_must_fit_the_batch(engine, preferred):
    with pytest.raises(ValueError, match=r"preferred_batch_sizes must be integers in \[1, max_batch=16\]"):
        DynamicBatcher(engine, max_batch=16, preferred_batch_sizes=preferred)
