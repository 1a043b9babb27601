import io
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from jaxopt_serve.engine import InferenceEngine
from jaxopt_serve.models import MLPConfig, init_variables
from jaxopt_serve.serve import DynamicBatcher, PredictServer

CONFIG = MLPConfig(features=(16,))


@pytest.fixture(scope="module")
def server():
    engine = InferenceEngine(CONFIG, init_variables(CONFIG, 0), max_batch=16).warmup()
    srv = PredictServer(DynamicBatcher(engine), port=0, max_body_bytes=64 << 10).start()
    yield srv
    srv.stop()


def _request(server, path, body=None, content_type="application/json", accept=None):
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", data=body)
    if body is not None:
        request.add_header("Content-Type", content_type)
    if accept:
        request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers.get("Content-Type"), response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type"), err.read()


def _npy(x):
    buffer = io.BytesIO()
    np.save(buffer, x)
    return buffer.getvalue()


def test_json_and_npy_predictions_match_the_engine(server):
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 1)).astype(np.float32)
    expected = server.batcher.engine(x)
    status, _, body = _request(server, "/v1/predict", json.dumps({"inputs": x.tolist()}).encode())
    assert status == 200
    np.testing.assert_allclose(np.asarray(json.loads(body)["outputs"]), expected, rtol=1e-5, atol=1e-6)
    status, content_type, body = _request(server, "/v1/predict", _npy(x), "application/x-npy", accept="application/x-npy")
    assert status == 200 and content_type == "application/x-npy"
    np.testing.assert_allclose(np.load(io.BytesIO(body)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("body, content_type, status, reason", [
    (b"{not json", "application/json", 400, "not valid JSON"),
    (b'{"x": 1}', "application/json", 400, '"inputs" array'),
    (json.dumps({"inputs": [[1, 2], [3, 4]]}).encode(), "application/json", 400, "expected a batch of shape"),
    (json.dumps({"inputs": [["a"]]}).encode(), "application/json", 400, "must hold numbers"),
    (_npy(np.zeros((2, 8, 8, 1), np.int32)), "application/x-npy", 400, "expected float32 inputs"),
    (b"garbage", "application/x-npy", 400, "not a valid .npy"),
    (b"{}", "text/plain", 415, "not supported"),
    (b"x" * (65 << 10), "application/json", 413, "exceeds the limit"),
])
def test_malformed_requests_get_a_4xx_with_a_reason(server, body, content_type, status, reason):
    got, _, payload = _request(server, "/v1/predict", body, content_type)
    assert got == status
    assert reason in json.loads(payload)["error"]


def test_concurrent_requests_and_the_server_stays_up(server):
    results = []

    def client(i):
        x = np.full((1 + i % 3, 8, 8, 1), i / 10, np.float32)
        status, _, body = _request(server, "/v1/predict", json.dumps({"inputs": x.tolist()}).encode())
        results.append((status, np.asarray(json.loads(body)["outputs"]).shape, 1 + i % 3))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(status == 200 and shape == (rows, 10) for status, shape, rows in results)
    assert _request(server, "/healthz")[0] == 200
    status, content_type, text = _request(server, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    assert "jaxopt_serve_requests_completed_total" in text.decode()
    snapshot = json.loads(_request(server, "/v1/metrics")[2])
    assert snapshot["completed"] >= 24 and snapshot["rejected"] == 0
    assert _request(server, "/nope")[0] == 404
