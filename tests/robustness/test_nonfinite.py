"""The non-finite input policy at every entry point: engine, batcher, inference server, ``infer``, exported models.

Property tests (hypothesis): a row's output never depends on its batch-mates,
for every bucket, for finite and non-finite rows, in the float and int8
reference CNN and MLP (``nonfinite_cases.engines``: small random models,
compiled once per module).
"""

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxopt_serve.cli import main
from jaxopt_serve.engine import InferenceEngine
from jaxopt_serve.engine.nonfinite import mark_rows, nonfinite_rows
from jaxopt_serve.model import Model
from jaxopt_serve.serve import DynamicBatcher, InferenceServer, ServedModel, run_batch_inference
from nonfinite_cases import CNN, KINDS, MATES, MLP, SHAPE, check_row, engines, nonfinite_batch_dependence_cases, row

PROPERTY = settings(max_examples=25, deadline=None, derandomize=True, database=None)


@pytest.fixture(scope="module")
def warm():
    """The four engines, every bucket compiled (shared by every test of this module)."""
    return {name: engine.warmup() for name, engine in engines("propagate").items()}


@st.composite
def bucket_cases(draw):
    """(model name, target row kind, its position, batch-mate kinds, rows in the batch, seed)."""
    name = draw(st.sampled_from(["cnn", "cnn_int8", "mlp", "mlp_int8"]))
    bucket = draw(st.sampled_from([1, 2, 4, 8]))
    rows = draw(st.integers(bucket // 2 + 1, bucket))  # every size that lands in this bucket
    position = draw(st.integers(0, rows - 1))
    kind = draw(st.sampled_from(KINDS))
    mates = [draw(st.lists(st.sampled_from(MATES), min_size=rows - 1, max_size=rows - 1)) for _ in range(2)]
    return name, kind, position, mates, draw(st.integers(0, 2**16))


@PROPERTY
@given(case=bucket_cases())
def test_a_rows_output_does_not_depend_on_its_batch_mates(warm, case):
    name, kind, position, mate_kinds, seed = case
    rng = np.random.default_rng(seed)
    target = row(kind, rng)
    # zero rows (what padding is), then two random sets of finite / NaN / inf / zero mates
    mate_sets = [np.zeros((len(mate_kinds[0]), *SHAPE), np.float32)]
    mate_sets += [
        np.stack([row(k, rng) for k in kinds]) if kinds else np.zeros((0, *SHAPE), np.float32) for kinds in mate_kinds
    ]
    assert check_row(warm[name], target, position, mate_sets) is None


def test_every_bucket_and_row_kind_has_no_batch_dependence(warm):
    failures = []
    assert nonfinite_batch_dependence_cases(failures=failures) == 0, failures


def test_an_all_nan_image_is_nan_in_every_bucket(warm):
    # the reference CNN used to answer class 1 for an all-NaN image once it shared a bucket
    for name in ("cnn", "cnn_int8"):
        for bucket in warm[name].buckets:
            x = np.random.default_rng(bucket).normal(size=(bucket, *SHAPE)).astype(np.float32)
            x[-1] = np.nan
            out = warm[name](x)
            assert np.isnan(out[-1]).all() and np.isfinite(out[:-1]).all(), (name, bucket)


def test_error_policy_names_the_rows_and_large_requests_split_the_same_way():
    engine = engines("error")["mlp"]
    x = np.zeros((20, *SHAPE), np.float32)
    x[[3, 17], 0, 0, 0] = [np.inf, np.nan]
    with pytest.raises(ValueError, match=r"non-finite inputs \(NaN or inf\) in rows \[3, 17\]"):
        engine(x)
    # propagate over a request split into several buckets: the same rows NaN, the rest as if they were zero rows
    out = engines("propagate")["mlp"](x)
    clean = engines("propagate")["mlp"](np.where(np.isfinite(x), x, 0))
    assert np.isnan(out[[3, 17]]).all()
    np.testing.assert_array_equal(np.delete(out, [3, 17], 0), np.delete(clean, [3, 17], 0))


def test_a_pytree_model_marks_float_outputs_and_refuses_integer_ones():
    def f(w, x):
        return {"scores": x["a"] @ w, "count": x["n"] + 1}

    m = Model.function(
        f, np.eye(3, dtype=np.float32), {"a": np.zeros((1, 3), np.float32), "n": np.zeros((1,), np.int32)}
    )
    x = {"a": np.array([[1, 2, 3], [np.nan, 0, 0]], np.float32), "n": np.array([5, 6], np.int32)}
    with pytest.raises(ValueError, match=r"rows \[1\]: this model has integer or bool outputs"):
        InferenceEngine(m, max_batch=4)(x)
    scores = InferenceEngine(
        Model.function(lambda w, x: x["a"] @ w, np.eye(3, dtype=np.float32), {"a": np.zeros((1, 3), np.float32)}),
        max_batch=4,
    )({"a": x["a"]})
    assert scores[0].tolist() == [1, 2, 3] and np.isnan(scores[1]).all()
    assert nonfinite_rows(x).tolist() == [False, True]
    with pytest.raises(ValueError, match="cannot be NaN"):
        mark_rows(np.zeros(2, np.int32), np.array([True, False]))


def test_batcher_refuses_under_error_and_propagates_per_request():
    rng = np.random.default_rng(0)
    finite = rng.normal(size=(3, *SHAPE)).astype(np.float32)
    bad = finite.copy()
    bad[1, 4, 4, 0] = np.nan
    with DynamicBatcher(engines("error")["mlp"]) as batcher:
        with pytest.raises(ValueError, match=r"non-finite inputs \(NaN or inf\) in rows \[1\]"):
            batcher.submit(bad)
        assert batcher.metrics.snapshot()["submitted"] == 0  # refused before queueing
    with DynamicBatcher(engines("propagate")["cnn"], max_wait_ms=50) as batcher:
        futures = [batcher.submit(x) for x in (finite, bad, finite)]
        first, mixed, last = (f.result() for f in futures)
    # the three requests may share a bucket or not: another bucket size may round differently (float32 only)
    np.testing.assert_allclose(first, last, rtol=1e-5, atol=1e-4)
    assert np.isnan(mixed[1]).all() and np.isfinite(mixed[[0, 2]]).all()
    np.testing.assert_allclose(mixed[[0, 2]], first[[0, 2]], rtol=1e-5, atol=1e-4)


def _post(server, name, body, header_length=None):
    headers = {"Inference-Header-Content-Length": str(header_length)} if header_length is not None else {}
    request = urllib.request.Request(f"{server.url}/v2/models/{name}/infer", body, headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_server_answers_400_by_default_and_null_with_propagate():
    pytest.importorskip("starlette")
    from jaxopt_serve.serve.protocol import encode_request

    x = np.zeros((3, *SHAPE), np.float32)
    x[2, 0, 0, 0] = np.inf
    binary, header_length = encode_request([("input", x)], binary=True)
    json_nan = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": np.where(np.isfinite(x), x, np.nan).reshape(-1).tolist(),
                }
            ]
        }
    ).encode()
    # the engine propagates; the served model's own default policy still refuses
    server = InferenceServer(
        [
            ServedModel("mlp", engines("propagate")["mlp"]),
            ServedModel("mlp_propagate", engines("propagate")["mlp"], nan_policy="propagate"),
        ],
        port=0,
    ).start()
    try:
        status, reply = _post(server, "mlp", binary, header_length)
        assert status == 400 and json.loads(reply)["error"] == "non-finite inputs (NaN or inf) in rows [2]"
        status, reply = _post(server, "mlp", json_nan)  # JSON itself has no NaN: refused under either policy
        assert status == 400 and "NaN is not a JSON number" in json.loads(reply)["error"]
        finite, n = encode_request([("input", x[:2])], binary=True)
        assert _post(server, "mlp", finite, n)[0] == 200  # the server is not disturbed
        status, reply = _post(server, "mlp_propagate", binary, header_length)
        data = json.loads(reply)["outputs"][0]["data"]  # valid JSON: the NaN outputs are null
        out = np.asarray([np.nan if v is None else v for v in data], np.float32).reshape(3, -1)
        assert status == 200 and np.isnan(out[2]).all() and np.isfinite(out[:2]).all()
    finally:
        server.stop()
    with pytest.raises(ValueError, match="nan_policy must be 'propagate' or 'error'"):
        ServedModel("m", engines("propagate")["mlp"], nan_policy="ignore")


@pytest.fixture(scope="module")
def mlp_artifact(tmp_path_factory):
    from jaxopt_serve.artifact import Artifact, save_artifact
    from nonfinite_cases import random_variables

    path = tmp_path_factory.mktemp("nonfinite") / "mlp.jxs"
    save_artifact(path, Artifact(MLP, random_variables(MLP, 3), SHAPE))
    return path


def test_infer_refuses_by_default_naming_rows_of_the_file(tmp_path, mlp_artifact, capsys):
    x = np.random.default_rng(1).normal(size=(50, *SHAPE)).astype(np.float32)
    x[37, 1, 1, 0] = np.nan
    np.save(tmp_path / "in.npy", x)
    args = [
        "infer",
        str(mlp_artifact),
        "--input",
        str(tmp_path / "in.npy"),
        "--output",
        str(tmp_path / "out.npy"),
        "--chunk-size",
        "16",
        "--no-progress",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "non-finite inputs (NaN or inf) in rows [37] of in.npy" in err and "--nonfinite propagate" in err
    assert not (tmp_path / "out.npy").exists()
    # the chunks before the bad one are kept: the rerun with propagate resumes after them
    assert main([*args, "--nonfinite", "propagate"]) == 0
    assert "resumed at chunk 2" in capsys.readouterr().out
    out = np.load(tmp_path / "out.npy")
    assert np.isnan(out[37]).all() and np.isfinite(np.delete(out, 37, 0)).all()
    # the other rows of the chunk are exactly those of a run where the NaN row is a zero row
    x[37] = 0
    np.save(tmp_path / "zero.npy", x)
    same_buckets = InferenceEngine(MLP, _variables(mlp_artifact), max_batch=16)  # as the command builds it
    run_batch_inference(
        same_buckets,
        tmp_path / "zero.npy",
        tmp_path / "zero_out.npy",
        artifact_path=mlp_artifact,
        chunk_size=16,
        progress=False,
    )
    np.testing.assert_array_equal(np.delete(out, 37, 0), np.delete(np.load(tmp_path / "zero_out.npy"), 37, 0))


def _variables(path):
    from jaxopt_serve.artifact import load_artifact

    return load_artifact(path).variables


def test_exported_model_follows_the_same_policy(tmp_path):
    pytest.importorskip("flatbuffers")
    from jaxopt_serve.engine import export_model
    from jaxopt_serve.exported import load_exported
    from nonfinite_cases import random_variables

    variables = random_variables(CNN, 2)
    export_model(tmp_path / "cnn.jxe", CNN, variables)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, *SHAPE)).astype(np.float32)
    y = x.copy()
    y[1:] = np.nan  # other batch-mates
    y[2] = rng.normal(size=SHAPE)
    x[3] = np.nan
    model = load_exported(tmp_path / "cnn.jxe")  # "propagate", as the engine
    a, b = model(x), model(y)
    np.testing.assert_array_equal(a[0], b[0])
    assert np.isnan(a[3]).all() and np.isnan(b[[1, 3]]).all()
    with pytest.raises(ValueError, match=r"non-finite inputs \(NaN or inf\) in rows \[3\]"):
        load_exported(tmp_path / "cnn.jxe", nan_policy="error")(x)


def test_serve_and_infer_default_to_error():
    from jaxopt_serve.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve", "m.jxs"]).nonfinite == "error"
    assert parser.parse_args(["infer", "m.jxs", "--input", "a.npy", "--output", "b.npy"]).nonfinite == "error"
    assert parser.parse_args(["serve", "m.jxs", "--nonfinite", "propagate"]).nonfinite == "propagate"
