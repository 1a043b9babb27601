"""The model handle: construction from Linen, NNX and plain functions, flags, input checks, NNX state."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxopt_serve.model import Model, as_model
from jaxopt_serve.models import MLPConfig, init_variables


class FlagNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
        return nn.Dropout(0.5, deterministic=not train)(x)


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(4, 8, rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.linear(x))


X = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)


def test_a_module_that_needs_flags_fails_at_construction_with_its_own_error_and_a_hint():
    net = FlagNet()
    variables = net.init(jax.random.key(0), X, train=False)
    with pytest.raises(TypeError, match="train") as info:
        Model.linen(net, variables, X)
    assert "eval_kwargs" in "".join(getattr(info.value, "__notes__", []))
    model = Model.linen(net, variables, X, eval_kwargs={"train": False}, train_kwargs={"train": True})
    out, updates = model.train_step_apply(model.variables, X, rng=jax.random.key(1))
    assert set(updates) == {"batch_stats"}
    assert not np.allclose(updates["batch_stats"]["BatchNorm_0"]["mean"], 0.0)
    np.testing.assert_allclose(model(model.variables, X), net.apply(variables, X, train=False), rtol=1e-6)


def test_inputs_are_checked_against_the_example_and_errors_name_the_leaf():
    def f(params, inputs):
        return inputs["x"] @ params["w"] + inputs["mask"][:, :1]

    example = {"x": X, "mask": np.ones((6, 3), np.float32)}
    model = Model.function(f, {"w": np.ones((4, 2), np.float32)}, example)
    assert model.input_spec()[0]["mask"].shape == (3,)
    with pytest.raises(ValueError, match=r"inputs\[0\]\['mask'\]: expected shape \(batch, 3\), got \(6, 5\)"):
        model.check_inputs([{"x": X, "mask": np.ones((6, 5), np.float32)}])
    with pytest.raises(ValueError, match="structure"):
        model.check_inputs([{"x": X}])
    with pytest.raises(ValueError, match=r"inputs\[0\]\['x'\]: expected float32 values, got int32"):
        model.check_inputs([{"x": X.astype(np.int32), "mask": example["mask"]}])
    cast = model.check_inputs([{"x": X.astype(np.float64), "mask": example["mask"]}])
    assert cast[0]["x"].dtype == np.float32


def test_a_plain_function_gets_its_params_unwrapped():
    seen = []

    def f(params, x):
        seen.append(sorted(params))
        return x @ params["w"]

    model = Model.function(f, {"w": np.ones((4, 2), np.float32)}, X)
    assert list(model.variables) == ["params"] and seen[-1] == ["w"]
    assert model(model.variables, X).shape == (6, 2)


def test_nnx_training_never_writes_into_the_callers_arrays():
    model = Model.nnx(NNXNet(nnx.Rngs(0)), X)
    variables = jax.tree.map(np.array, model.variables)
    variables["state"]["norm"]["mean"].setflags(write=False)
    before = variables["state"]["norm"]["mean"].copy()
    _, updates = model.train_step_apply(variables, X)
    np.testing.assert_array_equal(variables["state"]["norm"]["mean"], before)
    assert not np.allclose(updates["state"]["norm"]["mean"], before)
    eval_out = model(variables, X)  # eval mode: running statistics, so two calls agree
    np.testing.assert_array_equal(eval_out, model(variables, X))


def test_reference_configs_become_models():
    config = MLPConfig(features=(8,), num_classes=3, input_shape=(4,))
    variables = init_variables(config, 0)
    model = as_model(config, variables)
    assert model.kind == "config" and model.config == config
    assert model(model.variables, jnp.ones((2, 4))).shape == (2, 3)
    with pytest.raises(TypeError, match="expected a jaxopt_serve Model"):
        as_model(object())


def test_flax_models_record_their_module_and_options_and_keep_them_with_new_variables():
    net = FlagNet()
    variables = net.init(jax.random.key(0), X, train=False)
    options = {"train": False}
    model = Model.linen(net, variables, X, eval_kwargs=options, train_kwargs={"train": True}, rng_names=("a",))
    options["train"] = True  # the caller's dict changes later; the recorded options do not
    source = model.with_variables(jax.tree.map(np.zeros_like, model.variables)).source
    assert source.module is net and source.method is None and source.rebuild is None
    assert (dict(source.eval_kwargs), dict(source.train_kwargs), source.rng_names) == (
        {"train": False},
        {"train": True},
        ("a",),
    )

    nnx_model = Model.nnx(NNXNet(nnx.Rngs(0)), X)
    zeros = jax.tree.map(np.zeros_like, nnx_model.variables)
    rebuilt = nnx_model.with_variables(zeros).nnx_module()  # the rebuild travels with the model
    np.testing.assert_array_equal(rebuilt.linear.kernel[...], 0.0)
    assert isinstance(nnx_model.source.module, NNXNet)
    plain = Model.function(lambda p, x: x @ p, np.ones((4, 2), np.float32), X)
    assert plain.source is None
    with pytest.raises(ValueError, match="not an NNX module"):
        plain.nnx_module()
    with pytest.raises(TypeError):
        source.eval_kwargs["train"] = True  # read-only
    unrecorded = dataclasses.replace(nnx_model, source=None)
    with pytest.raises(ValueError, match="does not record how to rebuild its NNX module"):
        unrecorded.nnx_module()
