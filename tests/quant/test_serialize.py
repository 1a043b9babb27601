import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

from conftest import random_variables
from jaxopt_serve.artifact import Artifact, ArtifactError, load_artifact, save_artifact
from jaxopt_serve.models import CNNConfig, MLPConfig, predict_fn
from jaxopt_serve.quant import (
    QArray,
    QuantRule,
    QuantSpec,
    UnusedRuleWarning,
    decode_qtree,
    default_rules,
    dequantize_tree,
    encode_qtree,
    quantize,
    quantized_artifact,
    ternary_rules,
)
from jaxopt_serve.quant.calibrate import calibrate

CNN = CNNConfig(channels=(4, 8), hidden=16)  # kernels (3,3,1,4), (3,3,4,8), (8,16), (16,10)
MLP = MLPConfig(features=(16,))  # kernels (64,16), (16,10)
PREDICT = {
    # The default binds each config's own predict function (the point of it, so not a B008 slip).
    config.name: jax.jit(lambda v, x, predict=predict_fn(config): predict(dequantize_tree(v), x))  # noqa: B008
    for config in (CNN, MLP)
}


SPECS = {
    "int8-symmetric-channel": [QuantRule(r".*kernel", QuantSpec(qtype="int8"))],
    "int8-asymmetric-channel": [QuantRule(r".*kernel", QuantSpec(qtype="int8", symmetric=False))],
    "int4-group": [
        QuantRule(r"params/conv_\d+/kernel", QuantSpec(qtype="int4", granularity="group", group_size=3, axis=0)),
        QuantRule(r".*kernel", QuantSpec(qtype="int4", granularity="group", group_size=8)),
    ],
    "ternary": [QuantRule(r".*kernel", QuantSpec(qtype="ternary"))],
    "binary": [QuantRule(r".*kernel", QuantSpec(qtype="binary"))],
    "mixed": [  # the ternary recipe with asymmetric per-tensor int4 convs
        QuantRule(r"params/conv_\d+/kernel", QuantSpec(qtype="int4", granularity="tensor", symmetric=False)),
        *ternary_rules(),
    ],
}


def _quantize(variables, rules):
    """``quantize(variables, rules).variables``, compiled as one program (eager quantization compiles op by op)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedRuleWarning)  # the conv rule of "int4-group" on the MLP
        return jax.jit(lambda v: quantize(v, rules).variables)(variables)


def _assert_bit_exact(a, b):
    is_q = lambda x: isinstance(x, QArray)  # noqa: E731
    assert jax.tree.structure(a, is_leaf=is_q) == jax.tree.structure(b, is_leaf=is_q)
    leaves_a, tree_a = jax.tree.flatten(a)  # QArray metadata is in the treedef
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


@pytest.mark.parametrize("config", [CNN, MLP], ids=lambda c: c.name)
@pytest.mark.parametrize("name", sorted(SPECS))
def test_round_trip_is_bit_exact(tmp_path, config, name):
    q = _quantize(random_variables(config, 3), SPECS[name])
    path = tmp_path / "q.jxs"
    save_artifact(path, quantized_artifact(config, q, (8, 8, 1), {"recipe": name}))
    loaded = load_artifact(path)
    assert loaded.layout == "quantized" and loaded.metadata == {"recipe": name} and loaded.config == config
    _assert_bit_exact(loaded.variables, q)
    x = np.random.default_rng(0).uniform(size=(4, 8, 8, 1)).astype(np.float32)
    predict = PREDICT[config.name]
    np.testing.assert_array_equal(predict(loaded.variables, x), predict(q, x))


def test_served_layouts_encode_as_the_original():
    """``encode_qtree`` stores what ``serving_layout`` laid out (packed panels, 2-D and 3-D, or (out, in)) in the
    original layout, as ``quantized_artifact`` does."""
    from jaxopt_serve import native
    from jaxopt_serve.quant import serving_layout

    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": rng.normal(size=(16, 8))}, "heads": {"kernel": rng.normal(size=(4, 2, 16))}}
    q = quantize({"params": params}).variables
    for kernel_path in [*native.supported_kernels()[:1], "xla"]:
        with native.use_kernel(kernel_path):
            served = serving_layout(q, {"params/heads/kernel": 2})
            if kernel_path != "xla":
                assert served["params"]["heads"]["kernel"].packed == 2
            _assert_bit_exact(decode_qtree(encode_qtree(served)), q)


def test_encode_decode_without_a_file():
    q = _quantize(random_variables(MLP), default_rules(QuantSpec(qtype="int4", symmetric=False)))
    encoded = encode_qtree(q)
    entry = encoded["params"]["dense_0"]["kernel"]["__qarray__"]
    assert sorted(entry) == ["meta", "scale", "values", "zero_point"]
    assert entry["values"].dtype == np.uint8 and entry["values"].shape == (64 * 16 // 2,)
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(encoded))
    _assert_bit_exact(decode_qtree(encoded), q)
    _assert_bit_exact(encode_qtree(encoded), encoded)  # idempotent


def test_static_activation_scales_round_trip(tmp_path):
    q = calibrate(
        MLP, _quantize(random_variables(MLP), default_rules()), np.ones((8, 8, 8, 1), np.float32), method="absmax"
    )
    save_artifact(tmp_path / "s.jxs", quantized_artifact(MLP, q, (8, 8, 1)))
    loaded = load_artifact(tmp_path / "s.jxs")
    _assert_bit_exact(loaded.variables, q)


@pytest.mark.parametrize(
    ("spec", "at_least"),
    # Measured: 3.80x, 6.73x, 12.9x, 21.6x.
    [
        (QuantSpec(qtype="int8"), 3.5),
        (QuantSpec(qtype="int4", granularity="group", group_size=64), 6.0),
        (QuantSpec(qtype="ternary"), 10.0),
        (QuantSpec(qtype="binary"), 16.0),
    ],
    ids=lambda v: getattr(v, "qtype", v),
)
def test_files_are_smaller(tmp_path, spec, at_least):
    config = MLPConfig(features=(256, 256))
    variables = random_variables(config)
    float_bytes = save_artifact(tmp_path / "f.jxs", Artifact(config, variables, (8, 8, 1)))
    q = _quantize(variables, default_rules(spec))
    quantized_bytes = save_artifact(tmp_path / "q.jxs", quantized_artifact(config, q, (8, 8, 1)))
    assert float_bytes / quantized_bytes >= at_least, (float_bytes, quantized_bytes)


@pytest.fixture
def saved(tmp_path):
    q = _quantize(random_variables(MLP), default_rules(QuantSpec(qtype="int4")))
    path = tmp_path / "q.jxs"
    save_artifact(path, quantized_artifact(MLP, q, (8, 8, 1)))
    return path


@pytest.mark.parametrize("where", ["header", "payload", "digest"])
def test_corrupted_quantized_artifact_says_corrupted(saved, where):
    data = bytearray(saved.read_bytes())
    header_len = int.from_bytes(data[8:16], "little")
    position = {"header": 16 + header_len // 2, "payload": 16 + header_len + 200, "digest": len(data) - 1}[where]
    data[position] ^= 0x01
    saved.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="is corrupted"):
        load_artifact(saved)


def test_truncated_quantized_artifact_says_truncated(saved):
    saved.write_bytes(saved.read_bytes()[:-5])
    with pytest.raises(ArtifactError, match="is truncated"):
        load_artifact(saved)


def _save_unchecked(path, config, variables):
    """Bypass quantized_artifact's check: a well-formed file whose variables do not fit its model."""
    save_artifact(path, Artifact(config, variables, (8, 8, 1), layout="quantized"))


def test_quantized_kernel_of_the_wrong_shape_is_named(tmp_path):
    q = _quantize(random_variables(MLPConfig(features=(32,))), default_rules())
    _save_unchecked(tmp_path / "q.jxs", MLP, q)
    with pytest.raises(
        ArtifactError,
        match=r"q\.jxs: quantized variable params/classifier/kernel \(int8\) is "
        r"float32\[32, 10\], the model expects float32\[16, 10\]",
    ):
        load_artifact(tmp_path / "q.jxs")
    with pytest.raises(ArtifactError, match=r"params/classifier/kernel \(int8\)"):
        quantized_artifact(MLP, q, (8, 8, 1))


def test_float_leaf_of_the_wrong_dtype_missing_and_extra_are_named(tmp_path):
    q = _quantize(random_variables(MLP), default_rules())
    bad = {"params": {**q["params"], "dense_0": {**q["params"]["dense_0"], "bias": np.zeros(16, np.float16)}}}
    _save_unchecked(tmp_path / "a.jxs", MLP, bad)
    with pytest.raises(
        ArtifactError, match=r"variable params/dense_0/bias is float16\[16\], the model expects float32"
    ):
        load_artifact(tmp_path / "a.jxs")
    missing = {"params": {"dense_0": q["params"]["dense_0"], "extra": {"kernel": q["params"]["classifier"]["kernel"]}}}
    _save_unchecked(tmp_path / "b.jxs", MLP, missing)
    with pytest.raises(
        ArtifactError,
        match=r"missing \['params/classifier/bias', 'params/classifier/kernel'\], "
        r"unexpected \['params/extra/kernel'\]",
    ):
        load_artifact(tmp_path / "b.jxs")


def _tamper(entry_fn):
    q = _quantize(random_variables(MLP), default_rules(QuantSpec(qtype="int4")))
    encoded = encode_qtree(q)
    entry_fn(encoded["params"]["dense_0"]["kernel"]["__qarray__"])
    return encoded


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda e: e.update(values=e["values"][:-1]), r"int4 values of shape \[64, 16\] must be uint8\[512\]"),
        (lambda e: e.update(scale=e["scale"].astype(np.float64)), r"scale must be float32\[1, 16\]"),
        (lambda e: e.update(zero_point=np.zeros((1, 16), np.int32)), r"zero_point must be int8\[1, 16\]"),
        (lambda e: e.update(meta=np.frombuffer(b'{"qtype": "int3"}', np.uint8)), r"metadata must have exactly"),
        (lambda e: e.update(meta=np.frombuffer(b"\xff{", np.uint8)), r"metadata is not valid JSON"),
        (lambda e: e.pop("scale"), r"expected keys values, scale, meta"),
    ],
    ids=["values", "scale", "zero-point", "meta-fields", "meta-json", "missing-scale"],
)
def test_malformed_qarrays_are_named_by_path(tmp_path, tamper, message):
    path = tmp_path / "t.jxs"
    # A raw encoded tree is already plain arrays, so the layout's encoder leaves it as it is.
    _save_unchecked(path, MLP, _tamper(tamper))
    with pytest.raises(ArtifactError, match=r"quantized variable params/dense_0/kernel: " + message):
        load_artifact(path)


def test_a_fresh_process_loads_a_quantized_artifact(saved):
    code = (
        "import jaxopt_serve as js; "
        f"print(type(js.load_artifact({str(saved)!r}).variables['params']['dense_0']['kernel']).__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "QArray"
