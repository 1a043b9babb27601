"""Closed-loop load generation: N concurrent clients, each waiting for its answer, against a batcher or an HTTP
server."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from typing import Any

import numpy as np


def closed_loop_async(batcher: Any, x: np.ndarray, clients: int, seconds: float) -> dict[str, float]:
    """``clients`` coroutines on one event loop awaiting ``batcher.predict_async(x)`` back to back for ``seconds``.

    Returns throughput (``requests/s``), latency percentiles (``p50 ms``,
    ``p99 ms``) and the request count. The loop is uvloop's where installed
    (the ``serve`` extra: the loop the server runs on). Called where an event
    loop is already running (a Jupyter or Colab cell), it runs its own loop in
    a helper thread.
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
        return {
            "requests/s": len(ms) / elapsed,
            "p50 ms": float(np.percentile(ms, 50)),
            "p99 ms": float(np.percentile(ms, 99)),
            "requests": int(len(ms)),
        }

    return _run_loop(run)


def http_closed_loop(
    host: str,
    port: int,
    path: str,
    body: bytes,
    *,
    clients: int,
    seconds: float,
    headers: dict[str, str] | None = None,
    connect_timeout: float = 10.0,
) -> dict[str, Any]:
    """``clients`` keep-alive HTTP/1.1 connections on one event loop, each POSTing ``body`` back to back for
    ``seconds``.

    A small raw-socket client (no HTTP library), so that the load generator
    costs little CPU next to the server it measures. Returns throughput
    (``requests/s``), latency percentiles of the 200 answers (``p50 ms``,
    ``p99 ms``), ``sent``, ``answered`` and the count of each status
    (``status``: ``{code: n}``); a connection closed mid-request counts as
    ``lost``. A response with ``Connection: close`` makes its client reconnect.
    """
    if clients <= 0 or seconds <= 0:
        raise ValueError(f"clients and seconds must be > 0, got {clients} and {seconds}")
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {"Content-Type": "application/json"}).items())
    request = head.encode() + b"\r\n" + body

    async def run() -> dict[str, Any]:
        latencies: list[float] = []
        statuses: collections.Counter[int] = collections.Counter()
        counts = {"sent": 0, "lost": 0}
        stop = time.perf_counter() + seconds

        async def client() -> None:
            reader = writer = None
            while time.perf_counter() < stop:
                if writer is None:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), connect_timeout)
                start = time.perf_counter()
                writer.write(request)
                counts["sent"] += 1
                try:
                    status, close = await _read_response(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    counts["lost"] += 1
                    writer.close()
                    reader = writer = None
                    continue
                statuses[status] += 1
                if status == 200:
                    latencies.append(time.perf_counter() - start)
                if close:
                    writer.close()
                    reader = writer = None
            if writer is not None:
                writer.close()

        begin = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - begin
        ms = np.asarray(latencies) * 1e3 if latencies else np.zeros(1)
        return {
            "requests/s": len(latencies) / elapsed,
            "p50 ms": float(np.percentile(ms, 50)),
            "p99 ms": float(np.percentile(ms, 99)),
            "sent": counts["sent"],
            "answered": sum(statuses.values()),
            "lost": counts["lost"],
            "status": dict(sorted(statuses.items())),
        }

    return _run_loop(run)


def _run_loop(main: Any) -> Any:
    """``main()`` run to completion on a new event loop: uvloop's where installed (the loop uvicorn serves on),
    asyncio's otherwise; in a helper thread where a loop is already running (a notebook cell)."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return runner(main())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:  # a running loop refuses a second one
        return pool.submit(lambda: runner(main())).result()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one HTTP/1.1 response with a Content-Length body: ``(status, the server closes the connection)``."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    await reader.readexactly(length)
    return status, close
