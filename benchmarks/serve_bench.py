"""Serving benchmark: closed-loop clients through the dynamic batcher vs one request at a time.

    python benchmarks/serve_bench.py --json results/serve.json

Each client sends one example, waits for its answer, and sends the next
(closed loop). "Serial" serves one request at a time (one engine call per
request, behind a lock); "batched" goes through ``DynamicBatcher``, driven by
client threads (``predict``) and by coroutines on one event loop
(``predict_async``). The checks use the asyncio clients; the single-request
latency is the median latency of one asyncio client alone through the batcher. An HTTP section drives ``jaxopt-serve serve`` in a separate
process over loopback with keep-alive connections. Writes
``{"device", "checks", "tables"}``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import Report  # noqa: E402

from jaxopt_serve.artifact import Artifact, save_artifact  # noqa: E402
from jaxopt_serve.engine import InferenceEngine  # noqa: E402
from jaxopt_serve.models import CNNConfig, init_variables  # noqa: E402
from jaxopt_serve.serve import DynamicBatcher  # noqa: E402
from jaxopt_serve.serve.load import closed_loop_async  # noqa: E402


def closed_loop(call, clients: int, seconds: float) -> dict[str, float]:
    """``clients`` threads calling ``call()`` back to back for ``seconds``; throughput and latency percentiles."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    stop = time.perf_counter() + seconds
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        barrier.wait()
        mine = latencies[i]
        while True:
            start = time.perf_counter()
            if start >= stop:
                return
            call()
            mine.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    begin = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - begin
    all_ms = np.concatenate([np.asarray(lat) for lat in latencies]) * 1e3
    return {"requests/s": len(all_ms) / elapsed, "p50 ms": float(np.percentile(all_ms, 50)),
            "p99 ms": float(np.percentile(all_ms, 99)), "requests": int(len(all_ms))}


def batcher_section(report: Report, *, seconds: float, max_wait_ms: float) -> None:
    config = CNNConfig()
    engine = InferenceEngine(config, init_variables(config, 0), max_batch=64).warmup()
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 1)).astype(np.float32)
    lock = threading.Lock()

    def serial() -> None:
        with lock:
            engine(x)

    batcher = DynamicBatcher(engine, max_wait_ms=max_wait_ms, max_queue=4096)
    single = closed_loop_async(batcher, x, 1, seconds)
    rows = []
    results = {}
    for clients in (1, 4, 16, 32, 64):
        s = closed_loop(serial, clients, seconds)
        t = closed_loop(lambda: batcher.predict(x), clients, seconds)
        a = closed_loop_async(batcher, x, clients, seconds)
        results[clients] = (s, a)
        rows.append({"clients": clients, "serial req/s": s["requests/s"], "serial p99 ms": s["p99 ms"],
                     "batched (threads) req/s": t["requests/s"], "threads p99 ms": t["p99 ms"],
                     "batched (asyncio) req/s": a["requests/s"], "asyncio p50 ms": a["p50 ms"],
                     "asyncio p99 ms": a["p99 ms"], "ratio (asyncio / serial)": a["requests/s"] / s["requests/s"]})
    batcher.close()
    snapshot = batcher.metrics.snapshot()
    report.table(f"reference CNN, single examples, closed loop, {seconds:g} s per point; serial = one engine call per "
                 f"request behind a lock; single-request latency (1 asyncio client through the batcher): p50 "
                 f"{single['p50 ms']:.3f} ms", rows)
    report.table("batcher metrics over the whole run", [{
        "completed": snapshot["completed"], "rejected": snapshot["rejected"], "timed_out": snapshot["timed_out"],
        "mean rows per engine call": snapshot["completed"] / max(1, sum(snapshot["batch_rows"].values())),
        "compiles": snapshot["compile_count"]}])
    s32, a32 = results[32]
    report.check("throughput_ratio_batched_vs_serial_32_clients", a32["requests/s"] / s32["requests/s"], 5.0, ">=")
    report.check("p99_ratio_batched_32_clients_vs_single_request", a32["p99 ms"] / single["p50 ms"], 3.0, "<=")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_section(report: Report, *, seconds: float) -> None:
    config = CNNConfig()
    path = os.path.join(tempfile.mkdtemp(prefix="serve_bench_"), "cnn.jxs")
    save_artifact(path, Artifact(config, init_variables(config, 0), (8, 8, 1)))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    server = subprocess.Popen([sys.executable, "-m", "jaxopt_serve", "serve", path, "--port", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        server.stdout.readline()  # "serving ... on http://..." once it listens
        body = json.dumps({"inputs": np.zeros((1, 8, 8, 1)).tolist()}).encode()
        local = threading.local()

        def call() -> None:
            if not hasattr(local, "conn"):
                local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            local.conn.request("POST", "/v1/predict", body, {"Content-Type": "application/json"})
            response = local.conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")

        rows = []
        for clients in (1, 32):
            r = closed_loop(call, clients, seconds)
            rows.append({"clients": clients, **r})
        report.table("HTTP (jaxopt-serve serve in another process, loopback, JSON bodies)", rows)
    finally:
        server.terminate()
        server.wait(timeout=60)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="write the checks and tables as JSON")
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each load point")
    parser.add_argument("--max-wait-ms", type=float, default=0.0, help="batching window of the batcher")
    parser.add_argument("--skip", choices=["batcher", "http"], action="append", default=[])
    args = parser.parse_args(argv)
    report = Report("serving benchmark")
    if "batcher" not in args.skip:
        batcher_section(report, seconds=args.seconds, max_wait_ms=args.max_wait_ms)
    if "http" not in args.skip:
        http_section(report, seconds=args.seconds)
    report.print()
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
