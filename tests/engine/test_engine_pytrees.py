"""The engine on any model: pytree inputs and outputs, length buckets, meshes, predict= without a model."""

import re

import jax
import numpy as np
import pytest

from jaxopt_serve.engine import InferenceEngine, make_mesh
from jaxopt_serve.timing import CompileCounter
from tiny_pytree_models import dict_inputs, dict_model, pooled_model, token_inputs, two_input_model

SIZES = (1, 3, 5, 8, 13)


@pytest.fixture(scope="module")
def model():
    return dict_model()


@pytest.fixture(scope="module")
def engine(model):
    return InferenceEngine(model, max_batch=8).warmup()


def _assert_outputs_equal(out, expected):
    assert jax.tree.structure(out) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
        assert got.dtype == want.dtype and got.shape == want.shape
        if np.issubdtype(want.dtype, np.floating):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(got, want)


def test_dict_inputs_tuple_outputs_equal_the_jitted_model_for_every_size(model, engine):
    assert engine.compile_count == len(engine.buckets) == 4
    reference = jax.jit(model)
    with CompileCounter() as compiles:
        outs = {n: engine(dict_inputs(n, seed=n)) for n in SIZES}  # 13 is split into 8 + 5
    assert compiles.count == 0 and engine.compile_count == 4
    for n, out in outs.items():
        expected = jax.tree.map(np.asarray, reference(model.variables, dict_inputs(n, seed=n)))
        _assert_outputs_equal(out, expected)
        assert out[1].dtype == np.int32 and out[0].dtype == np.float32 and len(out[1]) == n


@pytest.mark.parametrize(
    "inputs, message",
    [
        (
            {"x": np.zeros((3, 6), np.float32), "mask": np.zeros((3, 5), bool)},
            re.escape("inputs[0]['mask']: expected shape (batch, 4), got (3, 5)"),
        ),
        (
            {"x": np.zeros((3, 6), np.float32), "mask": np.zeros((3, 4), np.float32)},
            re.escape("inputs[0]['mask']: expected bool values, got float32"),
        ),
        (
            {"x": np.zeros((3, 6), np.float32), "mask": np.zeros((2, 4), bool)},
            re.escape("inputs[0]['x']: batch size 3 differs"),
        ),
        ({"x": np.zeros((3, 6), np.float32)}, "do not have the example's structure"),
    ],
)
def test_bad_inputs_name_the_leaf_before_dispatch(model, inputs, message):
    engine = InferenceEngine(model, max_batch=4)
    with pytest.raises(ValueError, match=message):
        engine(inputs)
    assert engine.compile_count == 0


def test_nan_policy_names_the_leaf_and_rows(model):
    x = dict_inputs(3)
    x["x"][2, 1] = np.inf
    with pytest.raises(ValueError, match=re.escape("non-finite inputs (NaN or inf) in rows [2] of inputs[0]['x']")):
        InferenceEngine(model, max_batch=4, nan_policy="error")(x)


def test_data_parallel_mesh_equals_one_device(model, engine):
    sharded = InferenceEngine(model, max_batch=16, mesh=make_mesh(data=8))
    assert sharded.buckets == (8, 16)
    two_d = InferenceEngine(model, buckets=(16,), mesh=make_mesh(data=2, model=4))
    for n in (5, 13):
        x = dict_inputs(n, seed=10 + n)
        _assert_outputs_equal(sharded(x), engine(x))
        _assert_outputs_equal(two_d(x), engine(x))


def test_several_positional_inputs_and_bfloat16_keep_integer_outputs():
    model = two_input_model()
    a, b = np.random.default_rng(0).normal(size=(3, 3)).astype(np.float32), np.arange(3, dtype=np.int32)
    expected = jax.tree.map(np.asarray, jax.jit(model)(model.variables, a, b))
    engine = InferenceEngine(model, buckets=(4,))
    _assert_outputs_equal(engine(a, b), expected)
    _assert_outputs_equal(engine((a, b)), expected)
    with pytest.raises(ValueError, match="takes 2 positional input"):
        engine(a)
    y, doubled = InferenceEngine(model, buckets=(4,), dtype="bfloat16")(a, b)
    assert y.dtype == np.float32 and doubled.dtype == np.int32
    np.testing.assert_array_equal(doubled, b * 2)


@pytest.fixture(scope="module")
def length_engine():
    engine = InferenceEngine(
        pooled_model(),
        max_batch=4,
        length_buckets=(4, 8, 16),
        length_axes={"input_ids": 1, "attention_mask": 1},
        output_length_axes=(None, 1),
    )
    return engine.warmup()


def test_length_buckets_pad_without_changing_outputs(length_engine):
    model = length_engine.model
    assert length_engine.compile_count == len(length_engine.buckets) * len(length_engine.length_buckets) == 9
    cases = [(3, 5), (1, 16), (6, 3)]
    with CompileCounter() as compiles:
        outs = [length_engine(token_inputs(n, length, seed=n)) for n, length in cases]
    assert compiles.count == 0 and length_engine.compile_count == 9
    for (n, length), (pooled, scores) in zip(cases, outs):
        want_pooled, want_scores = jax.jit(model)(model.variables, token_inputs(n, length, seed=n))  # unpadded
        assert pooled.shape == (n, 3) and scores.shape == (n, length)  # token outputs cut back to the length
        np.testing.assert_allclose(pooled, want_pooled, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)


def test_length_errors_name_the_leaf(length_engine):
    x = token_inputs(2, 17)
    with pytest.raises(ValueError, match=re.escape("length 17 exceeds the largest length bucket 16")):
        length_engine(x)
    x = token_inputs(2, 6)
    x["attention_mask"] = x["attention_mask"][:, :5]
    with pytest.raises(
        ValueError,
        match=re.escape(
            "inputs[0]['input_ids']: length 6 (axis 1) differs from inputs[0]['attention_mask']'s length 5"
        ),
    ):
        length_engine(x)
    with pytest.raises(ValueError, match="not a pytree prefix"):
        InferenceEngine(pooled_model(), length_buckets=(8,), length_axes={"ids": 1})
    with pytest.raises(ValueError, match="go together"):
        InferenceEngine(pooled_model(), length_buckets=(8,))


def test_predict_without_a_model_needs_example_inputs():
    predict = lambda v, x: x * v["params"]["scale"]  # noqa: E731
    variables = {"params": {"scale": np.float32(2)}}
    engine = InferenceEngine(None, variables, predict=predict, input_shape=(3,), buckets=(2,))
    np.testing.assert_array_equal(engine(np.ones((1, 3), np.float32)), [[2, 2, 2]])
    assert engine.input_shape == (3,) and engine.input_dtype == np.float32
    assert engine(np.ones((1, 3), np.int64).astype(np.float64)).dtype == np.float32  # float widths are cast
    with pytest.raises(ValueError, match=r"predict= pass example inputs \(example=batch"):
        InferenceEngine(None, variables, predict=predict)
    with pytest.raises(ValueError, match="InferenceEngine needs a model"):
        InferenceEngine(None, variables)
    engine = InferenceEngine(
        None,
        variables,
        predict=lambda v, x: {"y": x["a"] * 2},
        example={"a": np.zeros((1, 2), np.float32)},
        buckets=(2,),
    )
    assert engine({"a": np.ones((1, 2), np.float32)})["y"].tolist() == [[2.0, 2.0]]
