"""Exported artifacts of any model: pytree inputs and outputs, a symbolic length, variable paths, version 1."""

import hashlib
import io
import json
import re

import jax
import numpy as np
import pytest

from jaxopt_serve.engine import export_model
from jaxopt_serve.exported import MAGIC, PREFIX, load_exported, pack_exported, read_exported
from standalone import run_standalone as _run_standalone
from tiny_pytree_models import dict_inputs, dict_model, pooled_model, token_inputs, two_input_model


def test_pytree_artifacts_run_standalone_and_match_the_model(tmp_path):
    dict_net, two, pooled = dict_model(), two_input_model(), pooled_model()
    export_model(tmp_path / "dict.jxe", dict_net)
    export_model(tmp_path / "two.jxe", two)
    export_model(tmp_path / "pooled.jxe", pooled, length_axes={"input_ids": 1, "attention_mask": 1})
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3)).astype(np.float32), np.arange(5, dtype=np.int32)
    jobs = [
        (tmp_path / "dict.jxe", dict_inputs(1), "dict"),
        (tmp_path / "dict.jxe", dict_inputs(13, seed=1), "dict"),
        (tmp_path / "two.jxe", (a, b), "positional"),
        (tmp_path / "pooled.jxe", token_inputs(3, 5), "dict"),
        (tmp_path / "pooled.jxe", token_inputs(2, 11), "dict"),
    ]
    models = {"dict.jxe": dict_net, "two.jxe": two, "pooled.jxe": pooled}
    for (artifact, inputs, call), got in zip(jobs, _run_standalone(tmp_path, jobs)):
        model = models[artifact.name]
        args = (inputs,) if call == "dict" else inputs
        expected = jax.tree.leaves(jax.jit(model)(model.variables, *args))
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.dtype == e.dtype and g.shape == e.shape
            np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)


def test_loader_checks_structure_shapes_and_lengths(tmp_path):
    export_model(tmp_path / "dict.jxe", dict_model())
    model = load_exported(tmp_path / "dict.jxe")
    logits, ids = model(dict_inputs(2))
    assert logits.dtype == np.float32 and ids.dtype == np.int32 and isinstance(ids, np.ndarray)
    assert model.input_shape is None and [s["name"] for s in model.inputs] == ["inputs[0]['mask']", "inputs[0]['x']"]
    bad = {**dict_inputs(2), "mask": np.zeros((2, 3), bool)}
    with pytest.raises(
        ValueError, match=re.escape("inputs[0]['mask']: expected a batch of shape (batch, 4), got (2, 3)")
    ):
        model(bad)
    with pytest.raises(ValueError, match=re.escape("expected leaves [\"inputs[0]['mask']\", \"inputs[0]['x']\"]")):
        model({"x": dict_inputs(2)["x"]})
    with pytest.raises(ValueError, match=re.escape("inputs[0]['mask']: expected bool inputs, got float32")):
        model({**dict_inputs(2), "mask": np.zeros((2, 4), np.float32)})

    export_model(tmp_path / "pooled.jxe", pooled_model(), length_axes={"input_ids": 1, "attention_mask": 1})
    pooled = load_exported(tmp_path / "pooled.jxe")
    x = token_inputs(2, 6)
    with pytest.raises(ValueError, match=re.escape("inputs[0]['input_ids']: length 5 (axis 1) differs")):
        pooled({**x, "input_ids": x["input_ids"][:, :5]})


def test_variables_are_bound_by_path_and_checked(tmp_path):
    path = tmp_path / "dict.jxe"
    export_model(path, dict_model())
    header, function, leaves = read_exported(path.read_bytes())
    paths = [v["path"] for v in header["variables"]]
    assert paths == ["params/Dense_0/bias", "params/Dense_0/kernel", "params/Dense_1/bias", "params/Dense_1/kernel"]
    model = load_exported(path)

    # the same function on variables given by path; a missing or misshapen leaf is refused by name
    renamed = model.with_variables(dict(reversed(list(zip(paths, leaves)))))  # the order of the mapping does not matter
    np.testing.assert_array_equal(renamed(dict_inputs(3))[0], model(dict_inputs(3))[0])
    with pytest.raises(ValueError, match=re.escape("missing ['params/Dense_1/kernel']")):
        model.with_variables(dict(zip(paths[:3], leaves[:3])))
    swapped = dict(zip(paths, leaves))
    swapped["params/Dense_0/kernel"], swapped["params/Dense_1/kernel"] = leaves[3], leaves[1]
    with pytest.raises(ValueError, match=re.escape("variable params/Dense_0/kernel: (8, 5) float32 does not match")):
        model.with_variables(swapped)

    # an artifact whose header lists the leaves in another order than the function takes them
    header["variables"][1], header["variables"][3] = header["variables"][3], header["variables"][1]
    relisted = tmp_path / "relisted.jxe"
    relisted.write_bytes(pack_exported(header, function, [leaves[0], leaves[3], leaves[2], leaves[1]]))
    with pytest.raises(
        ValueError,
        match=re.escape("variable params/Dense_1/kernel: (8, 5) float32 does not match the function's (6, 8) float32"),
    ):
        load_exported(relisted)


def test_version_1_artifacts_still_load(tmp_path):
    """A single-array artifact as the previous release wrote it: variables "0", "1", ..., no input list."""
    from jax import export

    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    exported = export.export(jax.jit(lambda flat, x: x @ flat[0]))(
        [jax.ShapeDtypeStruct(w.shape, w.dtype)], jax.ShapeDtypeStruct((export.symbolic_shape("b")[0], 3), np.float32)
    )
    function = exported.serialize()
    buffer = io.BytesIO()
    np.savez(buffer, **{"0": w})
    blob = buffer.getvalue()
    header = {
        "model": "old",
        "input_shape": [3],
        "input_dtype": "float32",
        "platforms": ["cpu"],
        "quantized": False,
        "format_version": 1,
        "function_bytes": len(function),
        "variables_bytes": len(blob),
        "num_leaves": 1,
    }
    header_bytes = json.dumps(header, sort_keys=True).encode()
    body = PREFIX.pack(MAGIC, len(header_bytes)) + header_bytes + bytes(function) + blob
    (tmp_path / "old.jxe").write_bytes(body + hashlib.sha256(body).digest())
    model = load_exported(tmp_path / "old.jxe")
    assert model.input_shape == (3,)
    np.testing.assert_array_equal(model(np.ones((2, 3), np.float32)), np.ones((2, 3)) @ w)
    with pytest.raises(ValueError, match=re.escape("expected a batch of shape (batch, 3), got (2, 4)")):
        model(np.ones((2, 4), np.float32))


def test_float64_numpy_variables_are_stored_as_the_float32_the_function_runs_on(tmp_path):
    """A model holding float64 numpy arrays (jax computes them in float32) exports and loads."""
    from jaxopt_serve.model import Model

    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(4, 3)), "step": np.arange(3)}  # float64 and int64
    model = Model.function(lambda p, x: x @ p["w"] + p["step"], params, np.ones((2, 4), np.float32))
    path = tmp_path / "f64.jxe"
    export_model(path, model)
    header, _, leaves = read_exported(path.read_bytes())
    assert [np.asarray(v).dtype for v in leaves] == [np.int32, np.float32]
    x = rng.normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(load_exported(path)(x), x @ params["w"].astype(np.float32) + params["step"], rtol=1e-6)
