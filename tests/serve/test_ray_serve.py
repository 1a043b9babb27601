"""The Ray Serve deployment answers v2 infer requests as the local engine does, and refuses malformed ones."""

import json
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from jaxopt_serve.artifact import Artifact, save_artifact  # noqa: E402
from jaxopt_serve.models import CNNConfig, init_variables  # noqa: E402
from jaxopt_serve.serve.ray_serve import V2Error, decode_request, encode_response, v2_deployment  # noqa: E402
from jaxopt_serve.serve.servable import load_servable  # noqa: E402

CNN = CNNConfig(channels=(8, 16), hidden=16)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")


@pytest.fixture(scope="module")
def app(local_ray, tmp_path_factory):
    path = tmp_path_factory.mktemp("ray_serve") / "cnn.jxs"
    save_artifact(path, Artifact(CNN, init_variables(CNN, 0), (8, 8, 1)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = serve.run(v2_deployment(path, name="cnn", max_batch_size=8), route_prefix="/", name="cnn")
        yield f"http://127.0.0.1:{port}", handle, load_servable(path, max_batch=8)
    finally:
        serve.shutdown()


def _post(url, body):
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _request(x):
    return json.dumps(
        {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
    ).encode()


def test_http_answers_equal_the_local_engine_bit_for_bit(app):
    url, _, engine = app
    for rows in (1, 3, 8):
        x = np.random.default_rng(rows).normal(size=(rows, 8, 8, 1)).astype(np.float32)
        status, body = _post(f"{url}/v2/models/cnn/infer", _request(x))
        assert status == 200, body
        assert body["model_name"] == "cnn" and [o["name"] for o in body["outputs"]] == ["output"]
        out = body["outputs"][0]
        assert out["datatype"] == "FP32" and out["shape"] == [rows, 10]
        np.testing.assert_array_equal(np.asarray(out["data"], np.float32).reshape(out["shape"]), engine(x))
    with urllib.request.urlopen(f"{url}/v2/models/cnn", timeout=30) as response:
        meta = json.loads(response.read())
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 8, 8, 1]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]


def test_handle_calls_are_batched_and_match_the_engine(app):
    _, handle, engine = app
    xs = [np.random.default_rng(10 + i).normal(size=(2, 8, 8, 1)).astype(np.float32) for i in range(6)]
    responses = [handle.infer.remote({"input": x}) for x in xs]  # concurrent: @serve.batch may group them
    for x, response in zip(xs, responses):
        # a request grouped with others runs in a larger bucket: last-bit differences only
        np.testing.assert_allclose(response.result(timeout_s=60), engine(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        (
            "/v2/models/cnn/infer",
            b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [NaN]}]}',
            400,
            "NaN",
        ),
        ("/v2/models/cnn/infer", b"{not json", 400, "not valid JSON"),
        (
            "/v2/models/cnn/infer",
            b'{"inputs": [{"name": "input", "shape": [1, 8, 8, 1], "datatype": "FP32", '
            b'"data": [1e39' + b", 0" * 63 + b"]}]}",
            400,
            "overflow",
        ),
        (
            "/v2/models/cnn/infer",
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
            400,
            "takes the inputs",
        ),
        (
            "/v2/models/cnn/infer",
            b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}',
            400,
            "shape",
        ),
        ("/v2/models/other/infer", b'{"inputs": []}', 404, "unknown model"),
    ],
)
def test_malformed_requests_get_4xx_naming_the_problem(app, path, body, status, message):
    url, _, _ = app
    got, answer = _post(url + path, body)
    assert got == status and message in answer["error"], answer


def test_codec_without_ray():
    with pytest.raises(V2Error, match="BOOL|numbers"):
        decode_request(b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [true]}]}')
    with pytest.raises(V2Error, match="needs 2 values"):
        decode_request(b'{"inputs": [{"name": "input", "shape": [2], "datatype": "INT32", "data": [1]}]}')
    tensors = decode_request(b'{"inputs": [{"name": "a", "shape": [2, 1], "datatype": "INT8", "data": [[1], [-2]]}]}')
    assert tensors["a"].dtype == np.int8 and tensors["a"].tolist() == [[1], [-2]]
    response = encode_response("m", (np.ones((2, 3), np.float32), np.arange(2, dtype=np.int32)))
    assert [(o["name"], o["datatype"], o["shape"]) for o in response["outputs"]] == [
        ("0", "FP32", [2, 3]),
        ("1", "INT32", [2]),
    ]
