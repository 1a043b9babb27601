"""Artifacts of models the library never registered: Linen, NNX (with RNG state) and plain functions.

Float, int8-quantized (with calibrated ``quant_act`` scales) and 80%-sparse
variables round-trip through a file and give the same outputs; loading needs the
model back, and a model of other shapes is refused with the path named.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxopt_serve.artifact import MODEL_FORMAT_VERSION, Artifact, ArtifactError, load_artifact, save_artifact
from jaxopt_serve.model import Model
from jaxopt_serve.models import MLPConfig
from jaxopt_serve.prune import model_prune_rules, prune, sparse_artifact
from jaxopt_serve.quant import (
    QArray,
    calibrate,
    mark_asymmetric,
    model_rules,
    quantize,
    quantized_artifact,
    quantized_predict_fn,
)

IN, HIDDEN, OUT = 16, 32, 4
X = np.random.default_rng(0).normal(size=(8, IN)).astype(np.float32)


class LinenNet(nn.Module):
    out: int = OUT

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.BatchNorm(use_running_average=not train)(nn.Dense(HIDDEN)(x))
        return nn.Dense(self.out)(nn.relu(h))


class NNXNet(nnx.Module):
    def __init__(self, out: int, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(IN, HIDDEN, rngs=rngs)
        self.bn = nnx.BatchNorm(HIDDEN, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.l2 = nnx.Linear(HIDDEN, out, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))


def mlp(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def make_model(kind, out=OUT):
    x = X[:2]
    if kind == "linen":
        net = LinenNet(out)
        # Random values of init's shapes (nothing compiled), running statistics included: a lost collection shows.
        rng = np.random.default_rng(0)
        variables = jax.tree_util.tree_map_with_path(
            lambda p, s: (
                np.abs(rng.normal(size=s.shape)) + 0.5 if p[-1].key == "var" else rng.normal(size=s.shape) / 4
            ).astype(s.dtype),
            jax.eval_shape(net.init, jax.random.key(0), x),
        )
        return Model.linen(net, variables, x, eval_kwargs={"train": False}, train_kwargs={"train": True})
    if kind == "nnx":
        return Model.nnx(NNXNet(out, nnx.Rngs(0, dropout=1)), x)
    rng = np.random.default_rng(1)
    params = {
        "w1": rng.normal(size=(IN, HIDDEN)).astype(np.float32) / 4,
        "b1": np.full(HIDDEN, 0.1, np.float32),
        "w2": rng.normal(size=(HIDDEN, out)).astype(np.float32) / 4,
    }
    return Model.function(mlp, params, x)


KINDS = ["linen", "nnx", "function"]
LAYOUTS = ["float", "int8", "sparse"]
# The first leaf (in the model's tree order) that differs when the model has 5 outputs instead of 4.
WRONG = {"linen": "params/Dense_1/bias", "nnx": "params/l2/bias", "function": "params/w2"}


@pytest.fixture(scope="module")
def models():
    return {kind: make_model(kind) for kind in KINDS}


@pytest.fixture(scope="module")
def wrong_models():
    return {kind: make_model(kind, out=OUT + 1) for kind in KINDS}


@pytest.fixture(scope="module")
def saved(models, tmp_path_factory):
    """``{(kind, layout): (path, the variables saved)}``, each file written once."""
    folder = tmp_path_factory.mktemp("artifacts")
    out = {}
    for kind, model in models.items():
        for layout in LAYOUTS:
            if layout == "float":
                variables = model.variables
                artifact = Artifact.for_model(model, metadata={"layout": layout})
            elif layout == "int8":
                variables = calibrate(
                    model, quantize(model.variables, model_rules(model)).variables, X, method="absmax"
                )
                artifact = quantized_artifact(model, variables, metadata={"layout": layout})
            else:
                pruned = prune(model.variables["params"], model_prune_rules(model, 0.8)).params
                variables = {**model.variables, "params": jax.tree.map(np.asarray, pruned)}
                artifact = sparse_artifact(model, variables, metadata={"layout": layout})
            path = folder / f"{kind}-{layout}.jxs"
            save_artifact(path, artifact)
            out[kind, layout] = path, variables
    return out


def _leaves(tree):
    def view(x):
        if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return ("key", str(jax.random.key_impl(x)), np.asarray(jax.random.key_data(x)))
        return np.asarray(x)

    return [view(x) for x in jax.tree.leaves(tree)]


def _assert_same_variables(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)  # QArray metadata is in the treedef
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        if isinstance(x, tuple):
            assert x[:2] == y[:2] and np.array_equal(x[2], y[2])
        else:
            assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_gives_the_same_outputs(models, saved, kind, layout):
    model = models[kind]
    path, variables = saved[kind, layout]
    loaded = load_artifact(path, model=model)
    assert loaded.config is None and loaded.layout == {"float": "dense", "int8": "quantized"}.get(layout, layout)
    assert loaded.metadata["layout"] == layout and loaded.input_shape == (IN,)
    assert loaded.model.kind == kind and loaded.model.variables.keys() == loaded.variables.keys()
    _assert_same_variables(loaded.variables, variables)
    if layout == "int8":
        weights = [
            leaf
            for leaf in jax.tree.leaves(loaded.variables, is_leaf=lambda x: isinstance(x, QArray))
            if isinstance(leaf, QArray)
        ]
        assert len(weights) == 2 and len(loaded.variables["quant_act"]) == 2
        before = jax.jit(quantized_predict_fn(model, mode="dynamic"))(variables, X)
        after = jax.jit(quantized_predict_fn(loaded.model, mode="dynamic"))(loaded.variables, X)
        np.testing.assert_array_equal(after, before)
    else:
        if layout == "sparse":
            kernels = [np.asarray(leaf) for leaf in jax.tree.leaves(loaded.variables["params"]) if np.ndim(leaf) == 2]
            assert kernels and all((k == 0).mean() >= 0.79 for k in kernels)  # 80% of 128, rounded
        before = jax.jit(model.apply_fn)(variables, X)
        after = jax.jit(loaded.model.apply_fn)(loaded.model.variables, X)
        np.testing.assert_array_equal(after, before)


def test_nnx_rng_state_round_trips_so_dropout_draws_the_same_masks(models, saved):
    model = models["nnx"]
    path, variables = saved["nnx", "float"]
    loaded = load_artifact(path, model=model)
    key = loaded.variables["state"]["drop"]["rngs"]["key"]
    assert str(key.dtype) == "key<fry>"
    step = jax.jit(lambda v, x: loaded.model.train_step_apply(v, x)[0])  # dropout masks from the stored RNG state
    before, after = step(variables, X), step(loaded.variables, X)
    np.testing.assert_array_equal(after, before)
    assert not np.array_equal(after, jax.jit(model.apply_fn)(variables, X))  # dropout was on


def test_header_describes_the_model_instead_of_a_config(saved):
    data = saved["nnx", "int8"][0].read_bytes()
    header = json.loads(data[16 : 16 + int.from_bytes(data[8:16], "little")])
    assert header["format_version"] == MODEL_FORMAT_VERSION
    assert header["model"] == {"name": "NNXNet", "kind": "nnx"}
    assert header["input_spec"] == [{"path": "0", "shape": [IN], "dtype": "float32"}]
    spec = {entry["path"]: entry for entry in header["variables_spec"]}
    assert spec["params/l1/kernel"] == {
        "path": "params/l1/kernel",
        "shape": [IN, HIDDEN],
        "dtype": "float32",
        "qtype": "int8",
    }
    assert spec["state/drop/rngs/key"] == {
        "path": "state/drop/rngs/key",
        "shape": [],
        "dtype": "key<fry>",
        "impl": "threefry2x32",
    }
    assert spec["quant_act/l1"]["shape"] == [] and "input_shape" not in header
    assert b"\x80\x04\x95" not in data and b"\x80\x05\x95" not in data  # no pickle


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_loading_with_a_model_of_other_shapes_names_the_path(saved, wrong_models, kind, layout):
    path, _ = saved[kind, layout]
    wrong = wrong_models[kind]
    shape, want = ("32, 4", "32, 5") if kind == "function" else ("4", "5")
    quantized = layout == "int8" and kind == "function"
    what = rf"quantized variable {WRONG[kind]} \(int8\)" if quantized else rf"variable {WRONG[kind]}"
    with pytest.raises(
        ArtifactError,
        match=rf"{path.name} was saved from the {kind} model .*: {what} is "
        rf"float32\[{shape}\], the model expects float32\[{want}\]",
    ):
        load_artifact(path, model=wrong)


@pytest.mark.parametrize("kind", KINDS)
def test_loading_without_the_model_says_to_pass_it(saved, kind):
    path, _ = saved[kind, "float"]
    with pytest.raises(
        ArtifactError,
        match=rf"{path.name} was saved from the {kind} model .*which has no config: "
        r"pass that model",
    ):
        load_artifact(path)


def test_saving_checks_the_variables_against_the_model(models):
    model = models["function"]
    bad = {"params": {**model.variables["params"], "w1": np.zeros((IN, HIDDEN + 1), np.float32)}}
    with pytest.raises(
        ArtifactError, match=r"variable params/w1 is float32\[16, 33\], the model expects float32\[16, 32"
    ):
        Artifact.for_model(model, bad)
    with pytest.raises(ArtifactError, match=r"missing \['params/b1'\]"):
        Artifact.for_model(model, {"params": {k: v for k, v in model.variables["params"].items() if k != "b1"}})
    with pytest.raises(ValueError, match="needs a reference ModelConfig or a Model"):
        Artifact(None, model.variables, None)


def test_quantized_variables_pick_the_quantized_layout_and_multiple_inputs_have_no_input_shape(tmp_path):
    def f(params, a, b):
        return a @ params["w"] + b @ params["v"]

    params = {"w": np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6), "v": np.ones((3, 6), np.float32)}
    model = Model.function(f, params, np.ones((1, 4), np.float32), np.ones((1, 3), np.float32), name="two")
    q = quantize(model.variables, model_rules(model)).variables
    artifact = Artifact.for_model(model, q)
    assert artifact.layout == "quantized" and artifact.input_shape is None
    save_artifact(tmp_path / "two.jxs", artifact)
    loaded = load_artifact(tmp_path / "two.jxs", model=model)
    assert loaded.input_shape is None
    _assert_same_variables(loaded.variables, q)


def test_layer_collections_of_a_plain_function_round_trip(saved, models, tmp_path):
    """``quant_asym`` / ``quant_act`` keys of a plain function's weights are ``"w1"``, not ``"w1/kernel"``."""
    model = models["function"]
    q = mark_asymmetric(saved["function", "int8"][1], "w1")
    save_artifact(tmp_path / "asym.jxs", quantized_artifact(model, q))
    loaded = load_artifact(tmp_path / "asym.jxs", model=model)
    assert sorted(loaded.variables["quant_asym"]) == ["w1"] and sorted(loaded.variables["quant_act"]) == ["w1", "w2"]


def test_config_artifacts_are_unchanged_and_take_a_model_too(tmp_path):
    from conftest import random_variables

    config = MLPConfig(features=(8,), num_classes=3)
    variables = random_variables(config)
    model = Model.from_config(config, variables)
    artifact = Artifact.for_model(model)
    assert artifact.config == config and artifact.input_shape == (8, 8, 1)
    save_artifact(tmp_path / "cfg.jxs", artifact)
    data = (tmp_path / "cfg.jxs").read_bytes()
    assert json.loads(data[16 : 16 + int.from_bytes(data[8:16], "little")])["format_version"] == 1
    assert load_artifact(tmp_path / "cfg.jxs").model is None
    loaded = load_artifact(tmp_path / "cfg.jxs", model=model)
    assert loaded.config == config and loaded.model.config == config
    _assert_same_variables(loaded.variables, variables)
