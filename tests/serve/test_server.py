"""The Open Inference Protocol server: every route and status, hostile requests, overload, metrics.

One module-scoped server (uvicorn in a background thread) holds a tiny MLP
("mlp", nan policy "error"), the same MLP with nan policy "propagate", and
numpy models that are slow ("slow": overload and deadlines) or fail
("broken"). A good client runs next to every hostile case and must keep
getting correct answers.
"""

import http.client
import json
import socket
import struct
import sys
import threading
import time

import numpy as np
import pytest
from numpy_engine import NumpyEngine, expected

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from jaxopt_serve.engine import InferenceEngine  # noqa: E402
from jaxopt_serve.models import MLPConfig, init_variables  # noqa: E402
from jaxopt_serve.serve import InferenceServer, ServedModel  # noqa: E402
from jaxopt_serve.serve.prometheus import BATCH_BUCKETS, LATENCY_BUCKETS  # noqa: E402
from jaxopt_serve.serve.protocol import decode_response, encode_request  # noqa: E402

CONFIG = MLPConfig(features=(16,))
LIMIT = 256 << 10
READ_TIMEOUT = 0.5


@pytest.fixture(scope="module")
def engine():
    return InferenceEngine(CONFIG, init_variables(CONFIG, 0), max_batch=8).warmup()


@pytest.fixture(scope="module")
def server(engine):
    models = [
        ServedModel("mlp", engine, max_request_rows=8),
        ServedModel("mlp_propagate", engine, nan_policy="propagate"),
        ServedModel("slow", NumpyEngine(max_batch=1, delay_s=0.05), max_queue=2, timeout_s=0.12),
        ServedModel("broken", NumpyEngine(fail=True)),
    ]
    srv = InferenceServer(models, port=0, max_body_bytes=LIMIT, read_timeout_s=READ_TIMEOUT).start()
    yield srv
    srv.stop()


def call(server, method, path, body=None, headers=None, timeout=30):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        conn.request(method, path, body, headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def infer_body(x, name="input", datatype="FP32"):
    x = np.asarray(x)
    return json.dumps(
        {"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.reshape(-1).tolist()}]}
    ).encode()


def strict_json(raw):
    """JSON that must not hold NaN or Infinity tokens (Python's json would accept them)."""

    def refuse(token):
        raise AssertionError(f"the server wrote {token} into JSON")

    return json.loads(raw, parse_constant=refuse)


def raw_exchange(server, data, *, timeout=5.0, shut_write=False, later=b""):
    """Send raw bytes (and ``later`` 0.1 s after them); return everything the server sends until it closes, or its
    response is complete, or the timeout."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        sock.sendall(data)
        if later:
            time.sleep(0.1)
            sock.sendall(later)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                    break
        except TimeoutError:
            pass
        return b"".join(chunks)


def _complete(raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def status_of(raw):
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else None


class GoodClient:
    """Keep-alive requests with random inputs in a thread; every answer is checked against the engine."""

    def __init__(self, server, engine):
        self.server, self.engine = server, engine
        self.answers, self.errors = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        rng = np.random.default_rng(0)
        conn = http.client.HTTPConnection(self.server.host, self.server.port, timeout=30)
        while not self._stop.is_set():
            x = rng.normal(size=(1 + rng.integers(3), 8, 8, 1)).astype(np.float32)
            try:
                conn.request("POST", "/v2/models/mlp/infer", infer_body(x))
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    self.errors.append((response.status, body))
                    continue
                out = np.asarray(strict_json(body)["outputs"][0]["data"], np.float32).reshape(len(x), 10)
                np.testing.assert_allclose(out, self.engine(x), rtol=1e-5, atol=1e-6)
                self.answers += 1
            except Exception as err:  # noqa: BLE001 - reported by the test
                self.errors.append(repr(err))
                conn.close()
                conn = http.client.HTTPConnection(self.server.host, self.server.port, timeout=30)
        conn.close()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        deadline = time.perf_counter() + 30
        while self.answers < 2 and not self.errors and time.perf_counter() < deadline:  # overlap the hostile case
            time.sleep(0.01)
        self._stop.set()
        self._thread.join(30)
        assert self.errors == [] and self.answers > 0, (self.answers, self.errors[:3])


# ---------------------------------------------------------------------------------------------- routes


@pytest.mark.parametrize(
    "method, path, status, check",
    [
        ("GET", "/v2/health/live", 200, lambda r: r == {"live": True}),
        ("GET", "/v2/health/ready", 200, lambda r: r == {"ready": True}),
        ("GET", "/v2", 200, lambda r: r["extensions"] == ["binary_tensor_data"] and "mlp" in r["models"]),
        (
            "GET",
            "/v2/models/mlp",
            200,
            lambda r: (
                r["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 8, 8, 1]}]
                and r["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]
            ),
        ),
        ("GET", "/v2/models/mlp/ready", 200, lambda r: r == {"name": "mlp", "ready": True}),
        ("GET", "/v2/models/nope", 404, lambda r: "unknown model 'nope'" in r["error"]),
        ("GET", "/v2/models/nope/ready", 404, lambda r: "unknown model 'nope'" in r["error"]),
        ("POST", "/v2/models/nope/infer", 404, lambda r: "unknown model 'nope'" in r["error"]),
        ("GET", "/v1/predict", 404, lambda r: "no route /v1/predict" in r["error"]),
        ("GET", "/v2/models/mlp/infer", 405, lambda r: "method GET is not allowed" in r["error"]),
        ("PUT", "/v2/models/mlp/infer", 405, lambda r: "allowed: POST" in r["error"]),
        ("DELETE", "/v2/health/live", 405, lambda r: "allowed: GET, HEAD" in r["error"]),
        ("POST", "/metrics", 405, lambda r: "allowed: GET, HEAD" in r["error"]),
    ],
)
def test_every_route_and_status_answers_json(server, method, path, status, check):
    body = infer_body(np.zeros((1, 8, 8, 1))) if method in ("POST", "PUT") else None
    got, headers, raw = call(server, method, path, body)
    assert got == status
    assert headers["content-type"].startswith("application/json")
    assert check(strict_json(raw))
    if status == 405:
        assert headers["allow"]


def test_json_and_binary_inference_match_the_engine(server, engine):
    x = np.random.default_rng(1).normal(size=(3, 8, 8, 1)).astype(np.float32)
    status, headers, raw = call(server, "POST", "/v2/models/mlp/infer", infer_body(x))
    reply = strict_json(raw)
    assert status == 200 and reply["model_name"] == "mlp"
    assert reply["outputs"][0]["shape"] == [3, 10] and reply["outputs"][0]["datatype"] == "FP32"
    np.testing.assert_allclose(np.asarray(reply["outputs"][0]["data"]).reshape(3, 10), engine(x), rtol=1e-5, atol=1e-6)
    # the binary tensor extension, both ways: exactly the engine's float32 bits
    body, header_length = encode_request([("input", x)], binary=True, binary_outputs=True, request_id="r1")
    status, headers, raw = call(
        server, "POST", "/v2/models/mlp/infer", body, {"Inference-Header-Content-Length": str(header_length)}
    )
    assert status == 200 and headers["content-type"] == "application/octet-stream"
    out = decode_response(raw, int(headers["inference-header-content-length"]))["output"]
    np.testing.assert_array_equal(out, engine(x))
    assert json.loads(raw[: int(headers["inference-header-content-length"])])["id"] == "r1"
    # nested data is accepted too (row-major)
    status, _, raw = call(
        server,
        "POST",
        "/v2/models/mlp/infer",
        json.dumps(
            {"inputs": [{"name": "input", "shape": [3, 8, 8, 1], "datatype": "FP32", "data": x.tolist()}]}
        ).encode(),
    )
    assert status == 200
    np.testing.assert_allclose(
        np.asarray(strict_json(raw)["outputs"][0]["data"]).reshape(3, 10), engine(x), rtol=1e-5, atol=1e-6
    )


# ---------------------------------------------------------------------------------------------- hostile bodies


def _tensor(data, shape=(1, 8, 8, 1), datatype="FP32", name="input"):
    return json.dumps({"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data}]})


ZEROS = [0.0] * 64
NAN_BINARY = np.zeros((2, 8, 8, 1), np.float32)
NAN_BINARY[1, 3, 3, 0] = np.nan

HOSTILE_BODIES = {
    "not JSON": (b"{not json", 400, "not valid JSON"),
    "JSON NaN": (_tensor(ZEROS).replace("0.0", "NaN", 1).encode(), 400, "NaN is not a JSON number"),
    "JSON Infinity": (_tensor(ZEROS).replace("0.0", "Infinity", 1).encode(), 400, "Infinity is not a JSON number"),
    "JSON -Infinity": (_tensor(ZEROS).replace("0.0", "-Infinity", 1).encode(), 400, "Infinity is not a JSON number"),
    "float32 overflow": (_tensor([1e39] + ZEROS[1:]).encode(), 400, "overflows FP32"),
    "float64 overflow (1e400)": (_tensor(ZEROS).replace("0.0", "1e400", 1).encode(), 400, "overflows FP32"),
    "integer beyond float64": (_tensor(ZEROS).replace("0.0", "1" + "0" * 400, 1).encode(), 400, "overflows FP32"),
    "booleans for numbers": (_tensor([True] + ZEROS[1:]).encode(), 400, "true/false where FP32 numbers"),
    "strings for numbers": (_tensor(["1"] + ZEROS[1:]).encode(), 400, "must be numbers, got str"),
    "null for a number": (_tensor([None] + ZEROS[1:]).encode(), 400, "must be numbers, got NoneType"),
    "deeply nested": (b"[" * 100_000, 400, "nested too deeply"),
    "deeply nested data": (_tensor("X").replace('"X"', "[" * 50_000 + "]" * 50_000).encode(), 400, "not valid JSON"),
    "ragged nesting": (_tensor([[0.0], 1.0]).encode(), 400, "mixes arrays and scalars"),
    "top level array": (b"[1, 2]", 400, "must be a JSON object"),
    "no inputs": (b'{"outputs": []}', 400, '"inputs"'),
    "count mismatch": (_tensor(ZEROS[:10]).encode(), 400, "holds 64 elements, data has 10"),
    "wrong shape": (_tensor([0.0] * 16, shape=(1, 4, 4, 1)).encode(), 400, "expected shape [-1, 8, 8, 1]"),
    "wrong rank": (_tensor(ZEROS, shape=(64,)).encode(), 400, "expected shape [-1, 8, 8, 1]"),
    "wrong datatype": (_tensor(ZEROS, datatype="FP64").encode(), 400, "expected datatype FP32, got FP64"),
    "unknown datatype": (_tensor(ZEROS, datatype="FLOAT").encode(), 400, "unknown datatype 'FLOAT'"),
    "fractions for INT32": (_tensor([0.5] * 64, datatype="INT32").encode(), 400, "fractional numbers"),
    "wrong input name": (_tensor(ZEROS, name="x").encode(), 400, "missing ['input']; unexpected ['x']"),
    "negative shape": (_tensor(ZEROS, shape=(-1, 8, 8, 1)).encode(), 400, "non-negative integers"),
    "too many rows": (_tensor([0.0] * 64 * 9, shape=(9, 8, 8, 1)).encode(), 400, "at most 8 rows, got 9"),
    "empty batch": (_tensor([], shape=(0, 8, 8, 1)).encode(), 400, "no rows"),
    "unknown output": (
        json.dumps({"inputs": json.loads(_tensor(ZEROS))["inputs"], "outputs": [{"name": "zz"}]}).encode(),
        400,
        "no outputs ['zz']",
    ),
    "invalid UTF-8": (b'{"inputs": "\xff\xfe"}', 400, "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_BODIES))
def test_hostile_bodies_get_a_400_and_a_good_client_is_unaffected(server, engine, case):
    body, status, reason = HOSTILE_BODIES[case]
    with GoodClient(server, engine):
        got, headers, raw = call(server, "POST", "/v2/models/mlp/infer", body)
    assert got == status, raw
    assert reason in strict_json(raw)["error"]


@pytest.mark.parametrize(
    "case, header_length, status, reason",
    [
        ("NaN rows under the error policy", None, 400, "non-finite inputs (NaN or inf) in rows [1]"),
        ("header length past the body", 10**6, 400, "not within the body"),
        ("non-numeric header length", "x", 400, "not a number"),
        ("binary size mismatch", "cut", 400, "binary_data_size"),
    ],
)
def test_hostile_binary_bodies(server, engine, case, header_length, status, reason):
    body, n = encode_request([("input", NAN_BINARY)], binary=True)
    if header_length == "cut":
        body = body[:-4]
    elif header_length is not None:
        n = header_length
    with GoodClient(server, engine):
        got, _, raw = call(server, "POST", "/v2/models/mlp/infer", body, {"Inference-Header-Content-Length": str(n)})
    assert got == status and reason in strict_json(raw)["error"]


def test_nan_policy_propagate_answers_null_never_a_nan_token(server, engine):
    body, n = encode_request([("input", NAN_BINARY)], binary=True)
    status, _, raw = call(
        server, "POST", "/v2/models/mlp_propagate/infer", body, {"Inference-Header-Content-Length": str(n)}
    )
    data = strict_json(raw)["outputs"][0]["data"]  # valid JSON: null marks the non-finite values
    assert status == 200 and data[10:] == [None] * 10
    np.testing.assert_allclose(data[:10], engine(NAN_BINARY[:1])[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the wire


def test_conflicting_content_length_headers_are_a_400(server, engine):
    body = infer_body(np.zeros((1, 8, 8, 1)))
    request = (
        b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nContent-Length: %d\r\n\r\n"
        % (len(body), len(body) - 5)
    ) + body
    with GoodClient(server, engine):
        raw = raw_exchange(server, request)
    assert status_of(raw) == 400 and b"Content-Length" in raw.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("size", [LIMIT + 1, 50 << 20])
def test_an_oversized_body_from_an_ordinary_client_gets_the_413(server, engine, size):
    body = b"x" * size  # http.client sends the whole body before it reads the answer: no broken pipe
    with GoodClient(server, engine):
        status, headers, raw = call(server, "POST", "/v2/models/mlp/infer", body)
    assert status == 413 and headers["connection"] == "close"
    assert f"exceeds the limit of {LIMIT} bytes" in strict_json(raw)["error"]


def test_expect_100_continue_gets_the_413_before_sending_the_body(server):
    request = b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (
        50 << 20
    )
    raw = raw_exchange(server, request)
    assert status_of(raw) == 413  # had the server waited for the body, the read timeout would answer 408


def test_chunked_body_over_the_limit_is_a_413(server):
    chunk = b"x" * 32768
    request = b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    request += b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(10)) + b"0\r\n\r\n"
    assert status_of(raw_exchange(server, request)) == 413


@pytest.mark.parametrize(
    "partial, status",
    [
        (b"", None),  # connects and says nothing: closed
        (b"POST /v2/models/mlp/inf", 408),  # half a request line
        (b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Le", 408),  # half the headers
        (b'POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"inputs"', 408),  # half a body
    ],
)
def test_stalled_requests_get_a_408_or_are_closed_within_the_read_timeout(server, engine, partial, status):
    with GoodClient(server, engine):
        start = time.perf_counter()
        raw = raw_exchange(server, partial, timeout=READ_TIMEOUT + 10)
        elapsed = time.perf_counter() - start
    assert status_of(raw) == status
    assert READ_TIMEOUT * 0.8 < elapsed < READ_TIMEOUT + 5.0  # closed by the deadline (loose: a loaded machine)
    if status:
        assert b"read timeout" in raw


def test_a_drip_fed_body_times_out_as_a_whole(server):
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        start, raw = time.perf_counter(), b""
        while time.perf_counter() - start < READ_TIMEOUT + 10:
            try:
                sock.sendall(b" ")  # one byte every 0.1 s: never idle for long, never done
            except OSError:
                break
            sock.settimeout(0.1)
            try:
                raw += sock.recv(4096)
                if raw:
                    break
            except TimeoutError:
                pass
    assert status_of(raw) == 408 and time.perf_counter() - start < READ_TIMEOUT + 5


def test_a_body_that_came_with_its_headers_is_read_without_a_timer_and_a_late_one_with_one(engine, monkeypatch):
    from jaxopt_serve.serve import server as server_module

    timers = []
    real = server_module.asyncio.timeout

    def counted(delay):
        timers.append(delay)
        return real(delay)

    monkeypatch.setattr(server_module.asyncio, "timeout", counted)
    # its own server: no other test's connection arms a timer meanwhile
    server = InferenceServer([ServedModel("mlp", engine)], port=0, read_timeout_s=READ_TIMEOUT).start()
    try:
        _timed_and_untimed_bodies(server, timers)
    finally:
        server.stop()


def _timed_and_untimed_bodies(server, timers):
    body = infer_body(np.ones((1, 8, 8, 1), np.float32))
    head = b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    # headers and body in one write (http.client would send them in two, which a busy server may read apart)
    assert status_of(raw_exchange(server, head + body, timeout=10)) == 200 and timers == []
    # the body comes later: its reading is timed
    assert status_of(raw_exchange(server, head, timeout=10, later=body)) == 200
    assert len(timers) == 1 and 0 < timers[0] <= READ_TIMEOUT


def test_many_stalled_sockets_do_not_block_good_clients(server, engine):
    socks = [socket.create_connection((server.host, server.port)) for _ in range(100)]
    try:
        for s in socks:
            s.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
        with GoodClient(server, engine) as good:
            time.sleep(0.3)
        assert good.answers >= 2  # served while 100 sockets hold half-sent requests
    finally:
        for s in socks:
            s.close()


def test_oversized_headers_get_a_431(server):
    request = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"X-Junk: " + b"a" * (70 << 10) + b"\r\n\r\n"
    raw = raw_exchange(server, request)
    assert status_of(raw) == 431 and b"exceed" in raw


# ---------------------------------------------------------------------------------------------- load shedding


def _concurrent(server, path, body, n):
    results = [None] * n

    def one(i):
        results[i] = call(server, "POST", path, body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_a_full_queue_answers_429_with_retry_after_and_deadlines_504(server):
    x = np.ones((1, 2, 3), np.float32)
    results = _concurrent(server, "/v2/models/slow/infer", infer_body(x), 12)
    statuses = sorted(r[0] for r in results)
    assert set(statuses) <= {200, 429, 504} and 429 in statuses and 200 in statuses
    for status, headers, raw in results:
        if status == 429:
            assert headers["retry-after"] == "1" and "queue full" in strict_json(raw)["error"]
        elif status == 504:
            assert "timed out" in strict_json(raw)["error"]
        else:
            np.testing.assert_allclose(strict_json(raw)["outputs"][0]["data"], expected(x)[0])
    snap = server.models["slow"].batcher.metrics.snapshot()
    # every request ended exactly one way
    assert snap["submitted"] == snap["completed"] + snap["rejected"] + snap["timed_out"] + snap["failed"]


def test_a_failing_model_is_a_500_and_the_server_stays_up(server, engine):
    status, _, raw = call(server, "POST", "/v2/models/broken/infer", infer_body(np.ones((1, 2, 3))))
    assert status == 500 and "the model broke" in strict_json(raw)["error"]
    with GoodClient(server, engine):
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- metrics


def _scrape(server):
    status, headers, raw = call(server, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(raw.decode())}
    values = {}
    for family in families.values():
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return families, values


def test_metrics_parse_are_cumulative_and_monotonic(server, engine):
    families, before = _scrape(server)
    assert families["jaxopt_serve_requests"].type == "counter"
    assert families["jaxopt_serve_request_duration_seconds"].type == "histogram"
    assert families["jaxopt_serve_queue_wait_seconds"].type == "histogram"
    assert families["jaxopt_serve_batch_size"].type == "histogram"
    assert families["jaxopt_serve_queue_depth"].type == "gauge"
    assert families["jaxopt_serve_in_flight_requests"].type == "gauge"
    assert families["jaxopt_serve_compiles"].type == "counter"
    x = np.zeros((2, 8, 8, 1), np.float32)
    for _ in range(5):
        assert call(server, "POST", "/v2/models/mlp/infer", infer_body(x))[0] == 200
    assert call(server, "POST", "/v2/models/mlp/infer", b"{bad")[0] == 400
    families, after = _scrape(server)
    for key, value in before.items():  # counters and histogram counts never go down
        if key[0].endswith(("_total", "_count", "_sum", "_bucket")):
            assert after.get(key, 0) >= value, key
    ok = ("jaxopt_serve_requests_total", (("model", "mlp"), ("route", "infer"), ("status", "200")))
    bad = ("jaxopt_serve_requests_total", (("model", "mlp"), ("route", "infer"), ("status", "400")))
    assert after[ok] - before.get(ok, 0) == 5 and after[bad] - before.get(bad, 0) == 1
    invalid = ("jaxopt_serve_request_errors_total", (("model", "mlp"), ("reason", "invalid")))
    assert after[invalid] - before[invalid] == 1
    count = ("jaxopt_serve_request_duration_seconds_count", (("model", "mlp"),))
    assert after[count] - before[count] == 5
    les = sorted(
        float(s.labels["le"])
        for s in families["jaxopt_serve_queue_wait_seconds"].samples
        if s.name.endswith("_bucket") and s.labels["model"] == "mlp"
    )
    assert les == sorted([*LATENCY_BUCKETS, float("inf")])  # fixed buckets, in seconds
    sizes = sorted(
        float(s.labels["le"])
        for s in families["jaxopt_serve_batch_size"].samples
        if s.name.endswith("_bucket") and s.labels["model"] == "mlp"
    )
    assert sizes == sorted([*map(float, BATCH_BUCKETS), float("inf")])
    compiles = ("jaxopt_serve_compiles_total", (("model", "mlp"),))
    assert after[compiles] == engine.compile_count
    completed = ("jaxopt_serve_batcher_requests_total", (("model", "mlp"), ("outcome", "completed")))
    assert after[completed] - before[completed] == 5
    assert after[("jaxopt_serve_queue_depth", (("model", "mlp"),))] == 0
    assert after[("jaxopt_serve_in_flight_requests", (("model", "mlp"),))] == 0


def test_two_servers_do_not_share_metrics(engine):
    first = InferenceServer([ServedModel("m", NumpyEngine())], port=0)
    second = InferenceServer([ServedModel("m", NumpyEngine())], port=0)
    assert first.metrics.registry is not second.metrics.registry
    first.metrics.requests.labels("m", "infer", "200").inc()
    assert "m" in first.metrics.exposition().decode()
    assert 'status="200"' not in second.metrics.exposition().decode()
    first.stop()
    second.stop()


# ---------------------------------------------------------------------------------------------- construction


def test_bad_configuration_names_the_parameter(engine):
    with pytest.raises(ValueError, match="model name 'a b'"):
        ServedModel("a b", NumpyEngine())
    with pytest.raises(ValueError, match="names must differ"):
        InferenceServer([ServedModel("m", NumpyEngine()), ServedModel("m", NumpyEngine())], port=0)
    with pytest.raises(ValueError, match="read_timeout_s must be > 0 and finite, got nan"):
        InferenceServer([ServedModel("m", NumpyEngine())], port=0, read_timeout_s=float("nan"))
    with pytest.raises(ValueError, match="max_body_bytes must be a positive int"):
        InferenceServer([ServedModel("m", NumpyEngine())], port=0, max_body_bytes=0)
    with pytest.raises(ValueError, match="nan_policy must be 'propagate' or 'error'"):
        ServedModel("m", NumpyEngine(), nan_policy="ignore")


def test_binary_bytes_codec_round_trips():
    from jaxopt_serve.serve.protocol import decode_request

    body, n = encode_request([("text", ["héllo", "a"])], binary=True)
    assert decode_request(body, n).inputs["text"].tolist() == ["héllo".encode(), b"a"]
    assert struct.unpack_from("<I", body, n)[0] == len("héllo".encode())


def test_without_the_serve_extra_the_error_names_it(monkeypatch):
    from jaxopt_serve.extras import MissingExtraError

    monkeypatch.setitem(sys.modules, "starlette", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'jaxopt_serve\[serve\]'"):
        InferenceServer([ServedModel("m", NumpyEngine())], port=0)
