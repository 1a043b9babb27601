"""Graceful-drain trials: a real server process gets SIGTERM while keep-alive clients hammer it.

    python tests/serve/drain_trials.py --trials 20 --clients 32

Each trial forks a fresh server process (a numpy model: no JAX backend, so
forking is safe and a trial starts in milliseconds) serving through
``InferenceServer.serve_forever`` (uvicorn in its main thread, real signal
handling). ``clients`` threads of this process each keep one HTTP/1.1
keep-alive connection and POST back to back; once the server has answered a
few hundred requests it gets SIGTERM. A client stops at the first response
that closes its connection (every response during a drain does). Counted per
trial: requests whose connection broke before a complete response (``lost``),
answers other than a correct 200 or a 503 (``bad``), clients refused a
connection, and how the server process ended (it must exit 0: no SIGABRT, no
signal death; reaped after the last trial, so that its interpreter exit
overlaps the next trial). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from numpy_engine import NumpyEngine, expected  # noqa: E402

from jaxopt_serve.serve import InferenceServer, ServedModel  # noqa: E402

X = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 2, 3], "datatype": "FP32", "data": X.reshape(-1).tolist()}]}
).encode()
WANT = expected(X).reshape(-1).tolist()


def serve_child(pipe: int) -> None:
    server = InferenceServer([ServedModel("m", NumpyEngine(max_batch=32, delay_s=0.002))], port=0, drain_grace_s=0.1)
    os.write(pipe, f"{server.port}\n".encode())
    os.close(pipe)
    server.serve_forever()


def client(port: int, stats: dict, lock: threading.Lock) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    ended = "running"
    while ended == "running":
        try:
            conn.request("POST", "/v2/models/m/infer", BODY, {"Content-Type": "application/json"})
        except ConnectionRefusedError:
            ended = "refused"
            break
        except OSError:
            ended = "lost"  # the request could not be written on the open connection
            break
        try:
            response = conn.getresponse()
            raw = response.read()
        except (http.client.HTTPException, OSError):
            ended = "lost"  # written, then the connection broke before a complete response
            break
        with lock:
            if response.status == 200 and json.loads(raw)["outputs"][0]["data"] == WANT:
                stats["ok"] += 1
            elif response.status == 503:
                stats["unavailable"] += 1
            else:
                stats["bad"] += 1
        if (response.getheader("connection") or "").lower() == "close":
            ended = "closed"
            with lock:
                stats["closed_with_" + str(response.status)] = stats.get("closed_with_" + str(response.status), 0) + 1
    conn.close()
    with lock:
        stats[ended] = stats.get(ended, 0) + 1


def run_trial(pid: int, port: int, clients: int, warm_answers: int) -> dict:
    stats = {"ok": 0, "unavailable": 0, "bad": 0}
    lock = threading.Lock()
    threads = [threading.Thread(target=client, args=(port, stats, lock)) for _ in range(clients)]
    for t in threads:
        t.start()
    deadline = time.perf_counter() + 20
    while stats["ok"] < warm_answers and time.perf_counter() < deadline:
        time.sleep(0.005)
    answered_before = stats["ok"]
    os.kill(pid, signal.SIGTERM)
    signalled = time.perf_counter()
    for t in threads:
        t.join(30)
    stats["answered_before_sigterm"] = answered_before
    stats["seconds_to_last_answer"] = round(time.perf_counter() - signalled, 3)
    stats["stuck_clients"] = sum(t.is_alive() for t in threads)
    return stats


def reap(pid: int, stats: dict) -> None:
    """How the server process ended (waited for after all trials: its interpreter exit overlaps the next trial)."""
    _, status = os.waitpid(pid, 0)
    stats["exit_code"] = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    stats["killed_by_signal"] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--warm-answers", type=int, default=100)
    args = parser.parse_args()
    trials, pids = [], []
    start = time.perf_counter()
    for _ in range(args.trials):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the server: serves until SIGTERM, then leaves through a normal interpreter exit
            os.close(read)
            serve_child(write)
            sys.exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            port = int(pipe.readline())
        trials.append(run_trial(pid, port, args.clients, args.warm_answers))
        pids.append(pid)
    for pid, stats in zip(pids, trials):
        reap(pid, stats)
    print(json.dumps({"trials": trials, "seconds": round(time.perf_counter() - start, 2)}))


if __name__ == "__main__":
    main()
