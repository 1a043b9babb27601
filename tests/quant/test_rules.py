"""Tests of jaxopt_serve.quant.rules: rule-based quantization of whole variable trees."""

import re
from collections import namedtuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxopt_serve.models import (
    CNNConfig,
    MLPConfig,
    NNXMLPConfig,
    TransformerConfig,
    init_variables,
    nnx_module,
    nnx_variables,
    predict_fn,
)
from jaxopt_serve.quant import (
    QArray,
    QuantizeResult,
    QuantRule,
    QuantSpec,
    UnusedRuleWarning,
    default_rules,
    dequantize_tree,
    quantize,
    tree_nbytes,
)
from jaxopt_serve.quant.qarray import _grouped_shape
from jaxopt_serve.quant.rules import path_str

# Small models with few distinct kernel shapes: quantize runs eagerly, and every
# new shape compiles its ops once. The NNX MLP has the Linen MLP's kernel shapes.
MLP = MLPConfig(features=(64, 64), num_classes=10)
NNX_MLP = NNXMLPConfig(features=(64, 64), num_classes=10)
CNN = CNNConfig(channels=(4, 8), hidden=16)
TRANSFORMER = TransformerConfig(vocab_size=50, max_len=16, hidden_size=16, num_heads=2, mlp_dim=32, num_layers=1)
DEFAULT_PATTERN = r"params/(.*/)?kernel"
DEFAULT_SPEC = QuantSpec()  # frozen: one shared instance, as a default argument would be
MLP_KERNEL_SIZES = (64 * 64, 64 * 64, 64 * 10)
MLP_KERNELS = {"params/dense_0/kernel", "params/dense_1/kernel", "params/classifier/kernel"}


def _init(config):
    # init_variables under jit: the same variables (a plain nested dict of arrays), one
    # compilation instead of one per op.
    return jax.jit(init_variables, static_argnums=(0, 1))(config, 0)


@pytest.fixture(scope="module")
def mlp_variables():
    return _init(MLP)


@pytest.fixture(scope="module")
def cnn_variables():
    return _init(CNN)


@pytest.fixture(scope="module")
def transformer_variables():
    return _init(TRANSFORMER)


def _paths(tree):
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, QArray))
    return {path_str(path): leaf for path, leaf in leaves}


def _nbytes(x):
    return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


def _check_only_kernels_quantized(original, result: QuantizeResult, spec=DEFAULT_SPEC):
    before, after = _paths(original), _paths(result.variables)
    assert set(before) == set(after)  # same leaves, same paths
    kernels = {path for path in before if path.startswith("params/") and path.endswith("/kernel")}
    assert kernels, "the model has kernels"
    assert set(result.quantized) == kernels
    assert set(result.quantized.values()) == {DEFAULT_PATTERN}
    for path, leaf in after.items():
        if path in kernels:
            assert isinstance(leaf, QArray), path
            assert (leaf.qtype, leaf.granularity, leaf.shape) == (spec.qtype, spec.granularity, before[path].shape)
            assert leaf.dtype == "float32"
        else:
            assert leaf is before[path], path  # untouched: the very same array
            assert jnp.issubdtype(leaf.dtype, jnp.floating)
    assert result.unused_rules == []
    assert result.float_bytes == sum(_nbytes(before[p]) for p in kernels)
    assert result.quantized_bytes == sum(after[p].nbytes for p in kernels)
    assert result.compression == pytest.approx(result.float_bytes / result.quantized_bytes)
    return before, after


def _assert_dequantized_close(original, result):
    """Every dequantized kernel is within half a quantization step of the original; the rest is untouched."""
    deq = dequantize_tree(result.variables)
    assert jax.tree.structure(deq) == jax.tree.structure(original)
    before, after, quantized = _paths(original), _paths(deq), _paths(result.variables)
    for path, value in after.items():
        assert value.shape == before[path].shape and value.dtype == before[path].dtype, path
        if path in result.quantized:
            q = quantized[path]
            scale = np.asarray(q.scale)
            err = np.abs(np.asarray(value) - np.asarray(before[path]))
            if q.granularity == "group":
                err = err.reshape(_grouped_shape(q.shape, q.axis, q.group_size))
            np.testing.assert_array_less(err, np.broadcast_to(scale * (0.5 + 1e-4), err.shape), err_msg=path)
        else:
            assert value is before[path], path
    return deq


# --------------------------------------------------------------------------- QuantRule / default_rules / path_str


def test_rule_matches_the_full_path():
    rule = QuantRule(r".*/kernel", QuantSpec(qtype="int8"))
    assert rule.matches("params/dense_0/kernel")
    assert not rule.matches("params/dense_0/kernel_scale")  # fullmatch, not search
    assert not rule.matches("kernel")
    assert QuantRule(r"params/dense_0/kernel").spec == QuantSpec()  # default spec: int8 per channel
    assert QuantRule(r".*", None).spec is None


def test_invalid_regex_is_rejected_with_the_pattern():
    with pytest.raises(ValueError, match=re.escape("QuantRule pattern 'params/(kernel' is not a valid regex")):
        QuantRule("params/(kernel")
    with pytest.raises(ValueError, match=re.escape("QuantRule pattern '*kernel' is not a valid regex")):
        QuantRule("*kernel")


def test_rule_spec_must_be_a_quant_spec():
    with pytest.raises(TypeError, match=re.escape("QuantRule '.*': spec must be a QuantSpec or None, got str")):
        QuantRule(".*", "int8")
    with pytest.raises(TypeError, match="got dict"):
        QuantRule(".*", {"qtype": "int4"})


def test_default_rules():
    (rule,) = default_rules()
    assert rule.pattern == DEFAULT_PATTERN and rule.spec == QuantSpec()
    spec = QuantSpec(qtype="int4", granularity="group", group_size=32)
    assert default_rules(spec)[0].spec is spec
    for path, expected in [
        ("params/kernel", True),
        ("params/dense_0/kernel", True),
        ("params/layer_0/attention/query/kernel", True),
        ("params/dense_0/bias", False),
        ("params/word_embeddings/embedding", False),
        ("batch_stats/bn_0/kernel", False),
        ("params/dense_0/kernel/extra", False),
    ]:
        assert rule.matches(path) is expected, path


def test_path_str_joins_dict_attr_and_sequence_keys():
    Pair = namedtuple("Pair", ["left", "right"])
    tree = {"params": {"layers": [{"kernel": 1.0}, Pair(left=2.0, right=3.0)]}}
    paths = [path_str(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]
    assert paths == ["params/layers/0/kernel", "params/layers/1/left", "params/layers/1/right"]
    assert path_str(()) == ""


# --------------------------------------------------------------------------- default rules on the reference models


def test_mlp_default_rules_quantize_exactly_the_kernels(mlp_variables):
    result = quantize(mlp_variables)
    before, after = _check_only_kernels_quantized(mlp_variables, result)
    assert set(result.quantized) == MLP_KERNELS
    q = after["params/dense_0/kernel"]
    assert q.shape == (64, 64) and q.values.dtype == jnp.int8 and q.scale.shape == (1, 64)
    # int8 values plus one float32 scale per output channel.
    assert result.float_bytes == 4 * sum(MLP_KERNEL_SIZES)
    assert result.quantized_bytes == sum(MLP_KERNEL_SIZES) + 4 * (64 + 64 + 10)
    assert 3.5 < result.compression < 4.0
    # The input is not modified.
    assert all(not isinstance(leaf, QArray) for leaf in _paths(mlp_variables).values())


def test_cnn_default_rules_keep_batch_norm_float(cnn_variables):
    result = quantize(cnn_variables)
    before, after = _check_only_kernels_quantized(cnn_variables, result)
    assert set(result.quantized) == {
        "params/conv_0/kernel",
        "params/conv_1/kernel",
        "params/dense/kernel",
        "params/classifier/kernel",
    }
    assert set(result.variables) == {"params", "batch_stats"}
    for path in ("batch_stats/bn_0/mean", "batch_stats/bn_1/var", "params/bn_0/scale", "params/bn_1/bias"):
        assert after[path] is before[path]
    conv = after["params/conv_1/kernel"]
    assert conv.shape == (3, 3, 4, 8) and conv.scale.shape == (1, 1, 1, 8)  # per output channel


def test_transformer_default_rules_keep_embeddings_and_layer_norm_float(transformer_variables):
    result = quantize(transformer_variables)
    before, after = _check_only_kernels_quantized(transformer_variables, result)
    for name in ("query", "key", "value", "out"):
        assert f"params/layer_0/attention/{name}/kernel" in result.quantized
    for path in (
        "params/word_embeddings/embedding",
        "params/position_embeddings/embedding",
        "params/token_type_embeddings/embedding",
        "params/embedding_norm/scale",
        "params/layer_0/attention_norm/bias",
        "params/layer_0/output_norm/scale",
    ):
        assert after[path] is before[path]
    query = after["params/layer_0/attention/query/kernel"]  # (hidden, heads, head_dim)
    assert query.shape == (16, 2, 8) and query.scale.shape == (1, 1, 8)


def test_int4_group_rule_on_attention_kernels(transformer_variables):
    spec = QuantSpec(qtype="int4", granularity="group", group_size=8)
    pattern = r"params/layer_\d+/attention/(query|out)/kernel"
    result = quantize(transformer_variables, [QuantRule(pattern, spec)])
    assert set(result.quantized) == {"params/layer_0/attention/query/kernel", "params/layer_0/attention/out/kernel"}
    after = _paths(result.variables)
    query = after["params/layer_0/attention/query/kernel"]  # (hidden, heads, head_dim): groups along hidden
    assert query.axis == 0 and query.scale.shape == (2, 1, 2, 8)
    out = after["params/layer_0/attention/out/kernel"]  # (heads, head_dim, hidden): groups along head_dim
    assert out.axis == 1 and out.scale.shape == (2, 1, 1, 16)
    assert out.values.dtype == jnp.uint8 and out.values.shape == (2 * 8 * 16 // 2,)
    assert isinstance(after["params/layer_0/attention/key/kernel"], jax.Array)  # not selected
    # 4 bits per value plus a float32 scale per 8 values: 8 bits, 4x.
    assert result.compression == pytest.approx(4.0)
    _assert_dequantized_close(transformer_variables, result)


# --------------------------------------------------------------------------- rule order, spec=None, unused rules


def test_first_match_wins_and_none_keeps_float(mlp_variables):
    rules = [QuantRule(r".*classifier.*", None), *default_rules()]
    result = quantize(mlp_variables, rules)  # no warning: both rules are used (filterwarnings=error)
    after = _paths(result.variables)
    assert after["params/classifier/kernel"] is mlp_variables["params"]["classifier"]["kernel"]
    assert set(result.quantized) == {"params/dense_0/kernel", "params/dense_1/kernel"}
    assert isinstance(after["params/dense_1/kernel"], QArray)
    assert result.unused_rules == []
    # The classifier is excluded from the byte counts as well.
    assert result.float_bytes == 4 * (64 * 64 + 64 * 64)

    # In the other order the kernel rule comes first, and a None rule for the classifier kernel
    # alone never gets a leaf: it is reported as unused.
    with pytest.warns(
        UnusedRuleWarning, match=re.escape("quantization rule 'params/classifier/kernel' matched no parameter")
    ):
        reordered = quantize(mlp_variables, [*default_rules(), QuantRule(r"params/classifier/kernel", None)])
    assert isinstance(_paths(reordered.variables)["params/classifier/kernel"], QArray)
    assert reordered.unused_rules == ["params/classifier/kernel"]


def test_specific_rule_before_the_default(mlp_variables):
    rules = [QuantRule(r"params/dense_0/kernel", QuantSpec(qtype="int4")), *default_rules()]
    result = quantize(mlp_variables, rules)
    after = _paths(result.variables)
    assert after["params/dense_0/kernel"].qtype == "int4"
    assert after["params/dense_1/kernel"].qtype == "int8"
    assert result.quantized == {
        "params/dense_0/kernel": "params/dense_0/kernel",
        "params/dense_1/kernel": DEFAULT_PATTERN,
        "params/classifier/kernel": DEFAULT_PATTERN,
    }
    assert after["params/dense_0/kernel"].nbytes == 64 * 64 // 2 + 64 * 4


def test_unused_rule_is_reported_and_warned(mlp_variables):
    rules = [*default_rules(), QuantRule(r".*lstm.*", QuantSpec(qtype="int4"))]
    with pytest.warns(
        UnusedRuleWarning, match=re.escape("quantization rule '.*lstm.*' matched no parameter")
    ) as record:
        result = quantize(mlp_variables, rules)
    assert len(record) == 1 and issubclass(UnusedRuleWarning, UserWarning)
    assert record[0].filename == __file__  # stacklevel points at the caller
    assert result.unused_rules == [".*lstm.*"]
    assert len(result.quantized) == 3


def test_every_unused_rule_warns_once(mlp_variables):
    rules = [QuantRule(r"a/.*"), *default_rules(), QuantRule(r"b/.*", None)]
    with pytest.warns(UnusedRuleWarning) as record:
        result = quantize(mlp_variables, rules)
    assert result.unused_rules == ["a/.*", "b/.*"]
    assert sorted(str(w.message) for w in record) == [
        "quantization rule 'a/.*' matched no parameter",
        "quantization rule 'b/.*' matched no parameter",
    ]


def test_no_rules_quantize_nothing(mlp_variables):
    result = quantize(mlp_variables, [])
    assert result.quantized == {} and result.unused_rules == []
    assert result.float_bytes == result.quantized_bytes == 0
    assert all(a is b for a, b in zip(jax.tree.leaves(result.variables), jax.tree.leaves(mlp_variables)))


def test_none_rule_protects_a_leaf_that_could_not_be_quantized():
    variables = {"params": {"dense": {"kernel": jnp.ones((4, 4))}, "step": jnp.array(3, jnp.int32)}}
    result = quantize(variables, [QuantRule(r"params/step", None), QuantRule(r"params/.*")])
    assert result.variables["params"]["step"] is variables["params"]["step"]
    assert set(result.quantized) == {"params/dense/kernel"}


# --------------------------------------------------------------------------- errors name the path


def test_group_size_that_does_not_divide_names_the_path_and_shape(mlp_variables):
    rules = [QuantRule(r"params/dense_0/kernel", QuantSpec(qtype="int4", granularity="group", group_size=5))]
    with pytest.raises(
        ValueError, match=re.escape("params/dense_0/kernel: group_size 5 does not divide axis 0 of shape (64, 64)")
    ):
        quantize(mlp_variables, rules)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_name_the_path(mlp_variables, bad):
    kernel = np.array(mlp_variables["params"]["dense_1"]["kernel"])
    kernel[3, 5] = bad
    variables = {
        **mlp_variables,
        "params": {
            **mlp_variables["params"],
            "dense_1": {**mlp_variables["params"]["dense_1"], "kernel": jnp.asarray(kernel)},
        },
    }
    with pytest.raises(
        ValueError, match=re.escape("params/dense_1/kernel: cannot quantize an array holding NaN or inf")
    ):
        quantize(variables)


def test_integer_leaf_selected_by_a_rule_names_the_path():
    variables = {"params": {"dense": {"kernel": jnp.ones((4, 4))}, "step": jnp.array(3, jnp.int32)}}
    with pytest.raises(
        ValueError,
        match=re.escape("params/step: rule 'params/.*' selects a int32 leaf; only float arrays can be quantized"),
    ):
        quantize(variables, [QuantRule(r"params/.*")])
    # Unselected integer leaves are fine.
    result = quantize(variables)
    assert result.variables["params"]["step"] is variables["params"]["step"]


@pytest.mark.parametrize("leaf, type_name", [(0.5, "float"), ("weights", "str"), (3, "int")])
def test_non_array_leaf_selected_by_a_rule_names_the_path(leaf, type_name):
    variables = {"params": {"dense": {"kernel": leaf}}}
    with pytest.raises(
        ValueError,
        match=re.escape(f"params/dense/kernel: rule {DEFAULT_PATTERN!r} selects a non-array leaf of type {type_name}"),
    ):
        quantize(variables)


def test_quantizing_twice_is_an_error(mlp_variables):
    result = quantize(mlp_variables)
    with pytest.raises(ValueError, match=re.escape("params/classifier/kernel: already quantized (QArray(int8")):
        quantize(result.variables)
    # Keeping quantized leaves with a None rule is fine.
    again = quantize(result.variables, [QuantRule(DEFAULT_PATTERN, None)])
    assert _paths(again.variables)["params/dense_0/kernel"] is _paths(result.variables)["params/dense_0/kernel"]


def test_variables_must_be_a_mapping():
    with pytest.raises(TypeError, match="expected a variables dict \\(or nnx.State\\), got list"):
        quantize([jnp.ones((2, 2))])


# --------------------------------------------------------------------------- dequantize_tree, tree_nbytes


def test_dequantize_tree_is_close_and_the_model_still_predicts(mlp_variables):
    result = quantize(mlp_variables)
    deq = _assert_dequantized_close(mlp_variables, result)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8, 8, 1)), jnp.float32)
    predict = jax.jit(predict_fn(MLP))
    reference, approx = predict(mlp_variables, x), predict(deq, x)
    assert float(jnp.max(jnp.abs(approx - reference))) < 0.05 * float(jnp.max(jnp.abs(reference))) + 1e-3
    assert dequantize_tree(mlp_variables) == mlp_variables or jax.tree.all(
        jax.tree.map(lambda a, b: a is b, dequantize_tree(mlp_variables), mlp_variables)
    )


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(qtype="int4", granularity="group", group_size=8),
        QuantSpec(qtype="int8", granularity="tensor", symmetric=False),
    ],
)
def test_dequantize_tree_with_other_specs(cnn_variables, spec):
    rules = [QuantRule(r"params/conv_.*/kernel", QuantSpec(qtype="int8")), *default_rules(spec)]
    result = quantize(cnn_variables, rules)
    assert {path: result.quantized[path] for path in ("params/conv_0/kernel", "params/dense/kernel")} == {
        "params/conv_0/kernel": "params/conv_.*/kernel",
        "params/dense/kernel": DEFAULT_PATTERN,
    }
    _assert_dequantized_close(cnn_variables, result)


def test_tree_nbytes_counts_quantized_arrays_with_their_scales(cnn_variables):
    leaves = jax.tree.leaves(cnn_variables)
    total = sum(_nbytes(leaf) for leaf in leaves)
    assert tree_nbytes(cnn_variables) == total
    result = quantize(cnn_variables, default_rules(QuantSpec(qtype="int4")))
    assert tree_nbytes(result.variables) == total - result.float_bytes + result.quantized_bytes
    assert tree_nbytes(result.variables) < total
    q = _paths(result.variables)["params/dense/kernel"]
    assert tree_nbytes(q) == q.nbytes == q.values.size + 4 * q.scale.size
    assert tree_nbytes({"a": {"b": jnp.zeros((3,), jnp.bfloat16)}, "c": np.zeros((2, 2), np.int64)}) == 6 + 32


def test_compression_grows_with_fewer_bits(mlp_variables):
    compression = {
        qtype: quantize(mlp_variables, default_rules(QuantSpec(qtype=qtype))).compression
        for qtype in ("int8", "int4", "ternary", "binary")
    }
    assert compression["int8"] < compression["int4"] < compression["ternary"] < compression["binary"]
    assert compression["int8"] > 3.5 and compression["int4"] > 6.5
    assert compression["ternary"] > 11 and compression["binary"] > 18


# --------------------------------------------------------------------------- NNX


def test_nnx_variables_and_state():
    model = NNX_MLP.build(rngs=nnx.Rngs(0))
    variables = nnx_variables(model)
    result = quantize(variables)
    _check_only_kernels_quantized(variables, result)
    assert set(result.quantized) == MLP_KERNELS

    # An nnx.State of the params works too and gives the same quantized arrays.
    state = nnx.state(model, nnx.Param)
    assert isinstance(state, nnx.State)
    from_state = quantize(state)
    assert set(from_state.variables) == {"params"}
    assert from_state.quantized == result.quantized
    assert from_state.compression == pytest.approx(result.compression)
    for path, leaf in _paths(result.variables).items():
        other = _paths(from_state.variables)[path]
        assert type(other) is type(leaf)
        for a, b in zip(jax.tree.leaves(leaf), jax.tree.leaves(other)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # The dequantized variables rebuild a module that predicts like the original.
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8, 8, 1)), jnp.float32)
    rebuilt = nnx_module(NNX_MLP, dequantize_tree(from_state.variables))
    reference = model(x)
    assert float(jnp.max(jnp.abs(rebuilt(x) - reference))) < 0.05 * float(jnp.max(jnp.abs(reference))) + 1e-3
    with pytest.warns(UnusedRuleWarning, match="conv"):
        quantize(state, [*default_rules(), QuantRule(r".*conv.*")])
