import re

import jax
import numpy as np
import pytest

from jaxopt_serve.artifact import ArtifactError, load_artifact, save_artifact
from jaxopt_serve.models import MLPConfig, init_variables
from jaxopt_serve.prune import PruneRule, prune, sparse_artifact
from jaxopt_serve.prune.sparse_io import decode_sparse, encode_sparse
from jaxopt_serve.quant import QArray, QuantRule, QuantSpec, quantize

CONFIG = MLPConfig(features=(256,), num_classes=10)


@pytest.fixture(scope="module")
def pruned():
    variables = jax.tree.map(np.asarray, init_variables(CONFIG, 0))
    result = prune(variables["params"], [PruneRule(r"params/.*/kernel", 0.9)])
    return {**variables, "params": jax.tree.map(np.asarray, result.params)}


def _dense_bytes(variables):
    return sum(x.nbytes for x in jax.tree.leaves(variables))


def test_float_round_trip_is_exact_and_smaller(tmp_path, pruned):
    path = tmp_path / "sparse.jxs"
    size = save_artifact(path, sparse_artifact(CONFIG, pruned, (8, 8, 1)))
    loaded = load_artifact(path)
    assert loaded.layout == "sparse" and loaded.compression == "lzma"
    for a, b in zip(jax.tree.leaves(pruned), jax.tree.leaves(loaded.variables)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert size < _dense_bytes(pruned) / 4  # 10% of the values + positions


@pytest.mark.parametrize("qtype", ["int8", "int4"])
def test_quantized_round_trip_restores_the_qarrays(tmp_path, pruned, qtype):
    q = quantize(pruned, [QuantRule(r"params/.*/kernel", QuantSpec(qtype=qtype))]).variables
    path = tmp_path / f"{qtype}.jxs"
    size = save_artifact(path, sparse_artifact(CONFIG, q, (8, 8, 1)))
    loaded = load_artifact(path).variables
    kernel = loaded["params"]["dense_0"]["kernel"]
    assert isinstance(kernel, QArray) and kernel.qtype == qtype
    np.testing.assert_array_equal(kernel.int_values(), q["params"]["dense_0"]["kernel"].int_values())
    np.testing.assert_array_equal(kernel.scale, q["params"]["dense_0"]["kernel"].scale)
    bits = 8 if qtype == "int8" else 4
    assert size < _dense_bytes(pruned) * (0.1 * bits / 32 + 0.06)


def test_float16_storage_restores_float32_leaves(tmp_path, pruned):
    path = tmp_path / "half.jxs"
    save_artifact(path, sparse_artifact(CONFIG, pruned, (8, 8, 1), float_dtype="float16"))
    loaded = load_artifact(path).variables
    bias = loaded["params"]["dense_0"]["bias"]
    assert bias.dtype == np.float32
    np.testing.assert_allclose(bias, pruned["params"]["dense_0"]["bias"], rtol=1e-3, atol=1e-4)


def test_long_zero_runs_use_escape_coded_gaps():
    keep = np.zeros(5000, bool)
    keep[[0, 3, 700, 4999]] = True
    kernel = np.where(keep, 1.0, 0.0).astype(np.float32).reshape(50, 100)
    encoded = encode_sparse({"params": {"classifier": {"kernel": kernel}}})
    entry = encoded["params"]["classifier"]["kernel"]["__sparse__"]
    assert "gaps" in entry and entry["gaps"].dtype == np.uint8
    assert entry["gaps"].size == 4 + 700 // 255 + 4295 // 255  # escapes for the runs longer than 254
    config = MLPConfig(features=(50,), num_classes=100, input_shape=(1,))
    variables = jax.tree.map(np.asarray, init_variables(config, 0))
    variables["params"]["classifier"]["kernel"] = kernel
    decoded = decode_sparse(
        MLPConfig(features=(50,), num_classes=100, input_shape=(1,)), encode_sparse(variables), (1,)
    )
    np.testing.assert_array_equal(decoded["params"]["classifier"]["kernel"], kernel)


def test_malformed_entries_name_the_path(tmp_path, pruned):
    encoded = encode_sparse(pruned)
    entry = encoded["params"]["dense_0"]["kernel"]["__sparse__"]
    entry["values"] = entry["values"][:-3]
    with pytest.raises(ArtifactError, match=re.escape("sparse variable params/dense_0/kernel is malformed")):
        decode_sparse(CONFIG, encoded, (8, 8, 1))


def test_asymmetric_sparse_quantized_leaves_are_refused(pruned):
    q = quantize(pruned, [QuantRule(r"params/dense_0/kernel", QuantSpec(qtype="int8", symmetric=False))]).variables
    with pytest.raises(ValueError, match="params/dense_0/kernel: a sparse quantized leaf must be symmetric"):
        sparse_artifact(CONFIG, q, (8, 8, 1))


def test_variables_that_do_not_fit_the_model_are_refused(pruned):
    with pytest.raises(ArtifactError, match="the model expects"):
        sparse_artifact(CONFIG.replace(features=(128,)), pruned, (8, 8, 1))
