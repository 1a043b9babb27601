"""prune_model: automatic structured pruning of models the package does not define, smaller models out."""

import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxopt_serve.artifact import Artifact, load_artifact, save_artifact
from jaxopt_serve.engine.export import export_model
from jaxopt_serve.exported import load_exported
from jaxopt_serve.model import Model
from jaxopt_serve.prune import prune_model
from jaxopt_serve.prune.auto import replace_sizes, size_map

from .zoo_cases import ZOO, zoo_model

# How each zoo model is made smaller: ResNet and the depthwise net keep their sizes in fields (widths);
# the gated MLP is NNX (shrunk in place); the ViT's heads cannot be stated by MultiHeadDotProductAttention's
# fields at a fixed qkv_features, and FlattenNet writes its widths as literals: both re-run the program.
HOW = {"resnet": "linen", "vit": "program", "gated": "nnx", "dw": "linen", "flat": "program"}


def _close(a, b):
    # float32 sums over fewer (all-zero-free) terms in another order: equal up to rounding
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ZOO)
def test_half_the_units_give_a_smaller_model_equal_to_the_masked_original(name):
    model = zoo_model(name)
    result = prune_model(model, 0.5)
    assert result.how == HOW[name], result.note
    assert result.groups and all(after == before // 2 for before, after in result.sizes.values())
    full_count = sum(np.size(x) for x in jax.tree.leaves(model.variables["params"]))
    small_count = sum(np.size(x) for x in jax.tree.leaves(result.variables["params"]))
    assert small_count < 0.8 * full_count
    x = model.example
    _close(jax.jit(result.model.apply_fn)(result.variables, *x), jax.jit(model.apply_fn)(result.masked_variables(), *x))


def test_the_rebuilt_resnet_is_an_ordinary_smaller_module():
    result = prune_model(zoo_model("resnet"), 0.5)
    assert result.module.widths == (8, 16)
    batch = np.zeros((5, 8, 8, 1), np.float32)
    out, updates = result.model.train_step_apply(result.variables, batch)  # BatchNorm in training mode
    assert out.shape == (5, 10) and updates["batch_stats"]["stem_bn"]["mean"].shape == (8,)


def test_the_gated_mlp_is_shrunk_in_place():
    result = prune_model(zoo_model("gated"), 0.5)
    assert (result.module.up.out_features, result.module.down.in_features) == (32, 16)
    assert result.module.up.kernel.shape == (16, 32)


def test_the_program_model_runs_any_batch_saves_loads_and_exports(tmp_path):
    model = zoo_model("vit")
    result = prune_model(model, 0.5)
    inputs = {"pixels": np.ones((3, 8, 8, 1), np.float32), "mask": np.ones((3, 16), bool)}
    assert result.model(result.variables, inputs).shape == (3, 10)
    path = tmp_path / "vit_half.jxs"
    save_artifact(path, Artifact.for_model(result.model))
    loaded = load_artifact(path, model=result.model)
    _close(loaded.model(loaded.variables, inputs), result.model(result.variables, inputs))
    export_model(tmp_path / "vit_half.jxe", result.model)  # the re-run program exports like any model
    _close(load_exported(tmp_path / "vit_half.jxe")(inputs), result.model(result.variables, inputs))


def test_asking_for_a_refused_axis_names_the_path_and_the_operation():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "cannot prune 'params/LayerNorm_0/scale': params/LayerNorm_0/"
            "scale[0]: reduce_sum mixes the entries of this axis (operation: "
            "reduce_sum)"
        ),
    ):
        prune_model(zoo_model("vit"), {"params/LayerNorm_0/scale": 0.5})


def test_protect_ratio_per_layer_multiple_and_global_scope():
    model = zoo_model("resnet")
    result = prune_model(model, {"params/block2/.*": 0.5}, protect=[r"params/block2/conv1/kernel"])
    assert "block2/conv1" not in result.sizes  # protected
    assert {k: v for k, v in result.sizes.items() if v[0] != v[1]} == {"block2/conv2": (32, 16)}
    rounded = prune_model(model, 0.4, multiple=8, rebuild=False)
    assert all(after % 8 == 0 for _, after in rounded.sizes.values())
    ranked = prune_model(model, 0.5, scope="global", rebuild=False, analysis=rounded.analysis)
    kept = sum(a for _, a in ranked.sizes.values())
    assert kept == sum(b for b, _ in ranked.sizes.values()) // 2


def test_size_fields_are_replaced_only_where_unambiguous():
    assert size_map({"a": (16, 8), "b": (16, 8), "c": (32, 16), "d": (10, 5), "e": (10, 6)}) == {16: 8, 32: 16}
    assert replace_sizes((16, (32, True), "16"), {16: 8, 32: 16}) == (8, (16, True), "16")


def test_group_lasso_reads_split_halves_and_the_cut_follows():
    """Pruning-aware fine-tuning works on the found groups: unit i of the gated MLP is two columns of ``up``."""
    from jaxopt_serve.prune import group_norms

    model = zoo_model("gated")
    (group,) = prune_model(model, 0.5, rebuild=False).analysis.groups
    params = model.variables["params"]
    up, bias, down = (np.asarray(params[a][b]) for a, b in (("up", "kernel"), ("up", "bias"), ("down", "kernel")))
    expected = np.sqrt(
        (up[:, :32] ** 2).sum(0) + (up[:, 32:] ** 2).sum(0) + bias[:32] ** 2 + bias[32:] ** 2 + (down**2).sum(1)
    )
    np.testing.assert_allclose(group_norms(params, [group])[group.name], expected, rtol=1e-5)


class _LiteralBNDropout(nn.Module):
    """Widths written as literals (no field to rebuild), BatchNorm and dropout: the program path, trained."""

    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.BatchNorm(use_running_average=not train)(nn.Dense(16)(x))
        h = nn.Dropout(0.5, deterministic=not train)(nn.relu(h))
        return nn.Dense(3)(h)


@pytest.fixture(scope="module")
def bn_dropout():
    """``(x, model, prune_model(model, 0.5))`` for the literal-width BatchNorm + dropout net, traced at batch 8."""
    x = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
    net = _LiteralBNDropout()
    model = Model.linen(
        net, net.init(jax.random.key(0), x, train=False), x, eval_kwargs={"train": False}, train_kwargs={"train": True}
    )
    return x, model, prune_model(model, 0.5)


def test_a_re_run_program_trains_in_training_mode_at_the_smaller_shapes(bn_dropout):
    x, model, result = bn_dropout
    assert result.how == "program" and "training steps" not in result.note, result.note
    kept = result.kept["Dense_0"]
    out, updates = result.model.train_step_apply(result.variables, x, rng=jax.random.key(1))
    _, full = model.train_step_apply(result.masked_variables(), x, rng=jax.random.key(1))
    # the statistics of the kept units are the full model's; removed ones are gone
    assert updates["batch_stats"]["BatchNorm_0"]["mean"].shape == (8,)
    _close(updates["batch_stats"], jax.tree.map(lambda a: np.asarray(a)[kept], full["batch_stats"]))
    # dropout is on: other keys give other outputs, and neither is the inference output
    again, _ = result.model.train_step_apply(result.variables, x, rng=jax.random.key(2))
    inference = result.model(result.variables, x)
    assert out.shape == (8, 3) and not np.allclose(out, again) and not np.allclose(out, inference)


class _ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(16)(nn.relu(nn.Dense(32)(x))), None


class _ScannedStack(nn.Module):
    """Three residual blocks stacked by nn.scan (parameters with a leading layer axis), as deep models write them."""

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(_ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        x, _ = stack(name="blocks")(nn.Dense(16)(x), None)
        return nn.Dense(4)(x)


def test_a_scanned_stack_keeps_the_same_units_in_every_layer_and_equals_the_masked_original():
    x = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    net = _ScannedStack()
    model = Model.linen(net, net.init(jax.random.key(0), x), x)
    result = prune_model(model, 0.5)
    # one group for the hidden units of all three layers, one for the residual width (carried between layers)
    assert sorted(result.sizes.values()) == [(16, 8), (32, 16)]
    # blocks/Dense_0 is the Dense(16) (constructed first): (layers, hidden, residual)
    assert result.variables["params"]["blocks"]["Dense_0"]["kernel"].shape == (3, 16, 8)
    assert any("params/blocks/Dense_0/kernel[0]" in r.axes and r.primitive == "scan" for r in result.refused)
    _close(jax.jit(result.model.apply_fn)(result.variables, x), jax.jit(model.apply_fn)(result.masked_variables(), x))


def _rnn(params, x, pool):
    """A plain-JAX recurrent net: lax.scan (backwards) over the time axis of x (batch, time, features)."""

    def step(h, x_t):
        h = jax.numpy.tanh(h @ params["wh"] + x_t @ params["wx"])
        return h, h @ params["wo"]

    h0 = jax.numpy.zeros((x.shape[0], params["wh"].shape[0]), x.dtype)
    h, ys = jax.lax.scan(step, h0, jax.numpy.swapaxes(x, 0, 1), reverse=True)
    return h @ params["wo"] + pool(ys, axis=0)


@pytest.mark.parametrize("pool", ["sum", "mean"])
def test_a_scan_over_time_reruns_at_other_sequence_lengths_and_exports(pool, tmp_path):
    rng = np.random.default_rng(0)
    shapes = {"wh": (12, 12), "wx": (5, 12), "wo": (12, 3)}
    params = {k: rng.normal(size=s).astype(np.float32) * 0.3 for k, s in shapes.items()}
    fn = lambda p, x: _rnn(p, x, getattr(jax.numpy, pool))  # noqa: E731
    model = Model.function(fn, params, rng.normal(size=(2, 4, 5)).astype(np.float32))
    result = prune_model(model, 0.5)
    # the hidden state is one group (carried between steps); the time axis is the scan's and stays whole
    assert result.how == "program" and list(result.sizes.values()) == [(12, 6)]
    assert result.variables["params"]["wh"].shape == (6, 6)
    longer = rng.normal(size=(3, 7, 5)).astype(np.float32)  # another batch and sequence length than the example
    expected = model(result.masked_variables(), longer)
    # the mean divides by the traced length (a constant 1/4 in the program): the program is analysed again at 7
    _close(result.model(result.variables, longer), expected)
    if pool == "sum":
        export_model(tmp_path / "rnn.jxe", result.model, length_axes=1)  # symbolic batch and length
        _close(load_exported(tmp_path / "rnn.jxe")(longer), expected)
    else:
        with pytest.raises(ValueError, match="computes with the size of input 0 axis 1 \\(traced at 4\\)"):
            export_model(tmp_path / "rnn.jxe", result.model, length_axes=1)
        assert not (tmp_path / "rnn.jxe").exists()
        export_model(tmp_path / "rnn.jxe", result.model)  # the batch alone stays free
        _close(load_exported(tmp_path / "rnn.jxe")(longer[:, :4]), model(result.masked_variables(), longer[:, :4]))


def test_a_re_run_training_step_at_another_batch_size_takes_that_batch_s_statistics(bn_dropout):
    """BatchNorm's training statistics divide by the batch size: a program traced at 8 is analysed again at 5."""
    x, model, result = bn_dropout
    smaller = x[:5] * 2.0
    kept = result.kept["Dense_0"]
    _, updates = result.model.train_step_apply(result.variables, smaller, rng=jax.random.key(1))
    _, full = model.train_step_apply(result.masked_variables(), smaller, rng=jax.random.key(1))
    _close(updates["batch_stats"], jax.tree.map(lambda a: np.asarray(a)[kept], full["batch_stats"]))


def test_a_training_step_that_does_not_trace_leaves_training_on_the_inference_program_and_says_why():
    def refuses(params, x, rng=None):
        raise NotImplementedError("this model has no training mode")

    rng = np.random.default_rng(0)
    params = {"w1": rng.normal(size=(4, 8)).astype(np.float32), "w2": rng.normal(size=(8, 3)).astype(np.float32)}
    model = Model.function(
        lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"], params, np.ones((2, 4), np.float32), train_fn=refuses
    )
    result = prune_model(model, 0.5)
    assert result.how == "program"
    assert "training steps run the inference program: tracing the training step failed" in result.note
    assert "this model has no training mode" in result.note
    out, updates = result.model.train_step_apply(result.variables, np.ones((2, 4), np.float32))
    _close(out, result.model(result.variables, np.ones((2, 4), np.float32)))
    assert updates == {}
