"""Graceful drain: in-process (``stop()``), and SIGTERM to a real server process 20 times under keep-alive load."""

import http.client
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from numpy_engine import NumpyEngine, expected

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from jaxopt_serve.serve import InferenceServer, ServedModel  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _post(server, body):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        conn.request("POST", "/v2/models/slow/infer", body)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_drain_finishes_accepted_requests_and_turns_new_ones_away():
    server = InferenceServer(
        [ServedModel("slow", NumpyEngine(max_batch=1, delay_s=0.3))], port=0, drain_grace_s=0.3
    ).start()
    x = np.ones((1, 2, 3), np.float32)
    body = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 2, 3], "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
    ).encode()
    accepted = []
    threads = [threading.Thread(target=lambda: accepted.append(_post(server, body))) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.1)  # the three are in the batcher: one running, two queued
    server.begin_drain()
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.request("GET", "/v2/health/ready")
    ready = conn.getresponse()
    assert (
        ready.status == 503
        and ready.getheader("connection") == "close"
        and json.loads(ready.read()) == {"ready": False}
    )
    conn.close()
    status, headers, raw = _post(server, body)
    assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
    assert "shutting down" in json.loads(raw)["error"]
    server.stop()
    for t in threads:
        t.join(30)
    assert [a[0] for a in accepted] == [200, 200, 200]  # accepted before the drain: all answered
    for _, _headers, raw in accepted:
        assert json.loads(raw)["outputs"][0]["data"] == expected(x).reshape(-1).tolist()
    assert server.drained.is_set()


def test_sigterm_under_keep_alive_load_loses_no_response_and_exits_cleanly_20_times():
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "drain_trials.py"), "--trials", "20", "--clients", "32"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = json.loads(result.stdout.strip().splitlines()[-1])["trials"]
    assert len(trials) == 20
    for i, t in enumerate(trials):
        assert t["exit_code"] == 0 and t["killed_by_signal"] is None, (i, t)  # never SIGABRT, never a crash
        assert t.get("lost", 0) == 0 and t["bad"] == 0 and t.get("refused", 0) == 0, (i, t)
        assert t.get("closed") == 32 and t["stuck_clients"] == 0, (i, t)  # every client was told to go
        assert t["answered_before_sigterm"] >= 100, (i, t)
    # during the drains, requests already accepted were answered 200 and the rest 503
    assert sum(t.get("closed_with_200", 0) for t in trials) > 0
    assert sum(t.get("closed_with_503", 0) for t in trials) > 0
    print(f"20 SIGTERM trials in {time.perf_counter() - start:.1f} s")
