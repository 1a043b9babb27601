"""Closed-loop load generation against a batcher: N concurrent clients, each waiting for its answer."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Any

import numpy as np


def closed_loop_async(batcher: Any, x: np.ndarray, clients: int, seconds: float) -> dict[str, float]:
    """``clients`` coroutines on one event loop awaiting ``batcher.predict_async(x)`` back to back for ``seconds``.

    Returns throughput (``requests/s``), latency percentiles (``p50 ms``,
    ``p99 ms``) and the request count. Called where an event loop is already
    running (a Jupyter or Colab cell), it runs its own loop in a helper thread.
    """
    if clients <= 0 or seconds <= 0:
        raise ValueError(f"clients and seconds must be > 0, got {clients} and {seconds}")

    async def run() -> dict[str, float]:
        latencies: list[float] = []
        stop = time.perf_counter() + seconds

        async def client() -> None:
            while True:
                start = time.perf_counter()
                if start >= stop:
                    return
                await batcher.predict_async(x)
                latencies.append(time.perf_counter() - start)

        begin = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - begin
        ms = np.asarray(latencies) * 1e3
        return {"requests/s": len(ms) / elapsed, "p50 ms": float(np.percentile(ms, 50)),
                "p99 ms": float(np.percentile(ms, 99)), "requests": int(len(ms))}

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:  # asyncio.run refuses a running loop
        return pool.submit(lambda: asyncio.run(run())).result()
