"""Automatic coupling (prune.coupling): the groups found in traced programs, and the axes left whole."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_variables
from jaxopt_serve.model import Model
from jaxopt_serve.models import CNNConfig, MLPConfig, NNXMLPConfig, TransformerConfig
from jaxopt_serve.prune import Group, Slice, model_groups
from jaxopt_serve.prune.coupling import analyze

from .zoo_cases import ZOO, zoo_model

REFERENCE = {
    "mlp": MLPConfig(features=(24, 16), num_classes=5),
    "nnx_mlp": NNXMLPConfig(features=(24, 16), num_classes=5),
    "cnn": CNNConfig(channels=(8, 12), convs_per_stage=2, hidden=10),
    "transformer": TransformerConfig(vocab_size=30, max_len=16, hidden_size=16, num_heads=4, mlp_dim=24, num_layers=2),
}


def _slices(groups):
    return {frozenset(g.slices) for g in groups}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_automatic_groups_equal_the_hand_written_ones(name):
    config = REFERENCE[name]
    model = Model.from_config(config, random_variables(config), batch_size=2)
    found = _slices(analyze(model).groups)
    manual = _slices(model_groups(config))
    if name == "transformer":
        # one more group the hand-written description leaves out (TransformerConfig cannot size it): the pooler
        pooler = frozenset(
            {Slice("params/pooler/kernel", 1), Slice("params/pooler/bias", 0), Slice("params/classifier/kernel", 0)}
        )
        assert found == manual | {pooler}
    else:
        assert found == manual


def _by_first_path(groups, path, axis):
    return next(
        g for g in groups if Slice(path, axis) in g.slices or any(s.path == path and s.axis == axis for s in g.slices)
    )


def test_resnet_identity_and_projection_shortcuts():
    analysis = analyze(zoo_model("resnet"))
    names = sorted(g.name for g in analysis.groups)
    assert names == ["block1/conv1", "block1/conv2", "block2/conv1", "block2/conv2"]
    # identity shortcut: the stem's channels are block1's output channels, and block2 reads them (conv1, proj)
    stream = _by_first_path(analysis.groups, "params/stem/kernel", 3)
    paths = {(s.path, s.axis) for s in stream.slices}
    assert {
        ("params/block1/conv2/kernel", 3),
        ("params/block2/conv1/kernel", 2),
        ("params/block2/proj/kernel", 2),
        ("batch_stats/stem_bn/mean", 0),
        ("batch_stats/block1/bn2/var", 0),
    } <= paths
    # projection shortcut: conv2 and proj write the same channels, which the head reads
    out = _by_first_path(analysis.groups, "params/block2/proj/kernel", 3)
    assert {("params/block2/conv2/kernel", 3), ("params/head/kernel", 0), ("params/block2/proj_bn/scale", 0)} <= {
        (s.path, s.axis) for s in out.slices
    }


def test_vit_heads_and_mlp_are_groups_and_the_residual_width_is_refused():
    analysis = analyze(zoo_model("vit"))
    heads = next(g for g in analysis.groups if g.name.endswith("MultiHeadDotProductAttention_0"))
    assert heads.size == 4 and {(s.path.rsplit("/", 2)[-2], s.axis) for s in heads.slices} == {
        ("query", 1),
        ("key", 1),
        ("value", 1),
        ("query", 0),
        ("key", 0),
        ("value", 0),
        ("out", 0),
    }
    mlp = next(g for g in analysis.groups if g.name.endswith("Dense_1"))
    assert mlp.size == 32
    refusal = next(r for r in analysis.refused if "params/patch_embed/kernel[3]" in r.axes)
    assert refusal.primitive == "reduce_sum" and "params/LayerNorm_0/scale[0]" in refusal.axes
    head_dim = next(r for r in analysis.refused if any("query/kernel[2]" in a for a in r.axes))
    assert head_dim.primitive == "dot_general" and "head_dims=True" in head_dim.reason
    assert any(
        g.size == 4 and "query" in g.slices[0].path or "key" in g.slices[0].path
        for g in analyze(zoo_model("vit"), head_dims=True).groups
        if g.size == 4
    )


def test_gated_mlp_split_halves_are_one_unit():
    analysis = analyze(zoo_model("gated"))
    (group,) = analysis.groups
    assert group.size == 32
    assert {s for s in group.slices if s.path == "params/up/kernel"} == {
        Slice("params/up/kernel", 1, offset=0),
        Slice("params/up/kernel", 1, offset=32),
    }
    assert Slice("params/down/kernel", 0) in group.slices
    # the residual width is the model's input width (x + down(...)): left whole, and said so
    assert any("params/norm/scale[0]" in r.axes and r.kind == "input" for r in analysis.refused)


def test_depthwise_conv_shares_the_channels_it_filters():
    analysis = analyze(zoo_model("dw"))
    stem = _by_first_path(analysis.groups, "params/stem/kernel", 3)
    assert {("params/dw0/kernel", 3), ("params/dw0_bn/scale", 0), ("params/pw0/kernel", 2)} <= {
        (s.path, s.axis) for s in stem.slices
    }


def test_flatten_repeats_the_channel_block():
    analysis = analyze(zoo_model("flat"))
    conv1 = _by_first_path(analysis.groups, "params/conv1/kernel", 3)
    # 4x4 positions after the pool: channel c of 16 feeds fc rows s * 16 + c
    assert Slice("params/fc/kernel", 0, repeat=16) in conv1.slices


def test_fused_qkv_projection_reshaped_into_heads():
    """One (D, 3 * H * d) kernel reshaped to (3, H, d): a head is a block of d columns, repeated 3 times."""

    def attention(p, x):
        b, t, _ = x.shape
        qkv = (x @ p["qkv"]).reshape(b, t, 3, 2, 4)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, t, 8) @ p["out"]

    params = {"qkv": jnp.ones((6, 24)), "out": jnp.ones((8, 6))}
    analysis = analyze(Model.function(attention, params, jnp.ones((1, 5, 6))))
    (heads,) = analysis.groups
    assert heads.size == 2
    assert set(heads.slices) == {Slice("params/qkv", 1, repeat=3, block=4), Slice("params/out", 0, block=4)}


def test_concatenated_branches_feed_offset_rows():
    def two_branch(p, x):
        h = jnp.concatenate([jax.nn.relu(x @ p["a"]), jnp.tanh(x @ p["b"])], axis=-1)
        return h @ p["c"]

    params = {"a": jnp.ones((4, 3)), "b": jnp.ones((4, 5)), "c": jnp.ones((8, 2))}
    groups = analyze(Model.function(two_branch, params, jnp.ones((2, 4)))).groups
    assert {frozenset(g.slices) for g in groups} == {
        frozenset({Slice("params/a", 1), Slice("params/c", 0)}),
        frozenset({Slice("params/b", 1), Slice("params/c", 0, offset=3)}),
    }


def test_inputs_outputs_and_unknown_operations_are_left_whole():
    def model(p, x):
        h = jnp.cumsum(x @ p["w1"], axis=-1)  # mixes the hidden units: not prunable
        return h @ p["w2"]

    params = {"w1": jnp.ones((4, 8)), "w2": jnp.ones((8, 3))}
    analysis = analyze(Model.function(model, params, jnp.ones((2, 4))))
    assert analysis.groups == []
    kinds = {r.axes: (r.kind, r.primitive) for r in analysis.refused}
    assert kinds[("params/w1[0]",)] == ("input", "input")
    assert kinds[("params/w2[1]",)] == ("output", "output")
    assert kinds[("params/w1[1]", "params/w2[0]")] == ("unsafe", "cumsum")


def test_a_bitcast_is_followed_between_types_of_one_width_and_refused_between_others():
    def model(p, x, to):
        h = jax.lax.bitcast_convert_type(x @ p["w1"], to)
        h = h.reshape(*h.shape[:-2], -1) if h.ndim == 3 else h  # f32 -> f16 gives a trailing axis of two
        return h.astype(jnp.float32) @ p["w2"]

    params = {"w1": jnp.ones((4, 8)), "w2": jnp.ones((8, 3))}
    same = analyze(Model.function(lambda p, x: model(p, x, jnp.int32), params, jnp.ones((2, 4))))
    assert _slices(same.groups) == {frozenset({Slice("params/w1", 1), Slice("params/w2", 0)})}
    params16 = {"w1": jnp.ones((4, 8)), "w2": jnp.ones((16, 3))}
    other = analyze(Model.function(lambda p, x: model(p, x, jnp.float16), params16, jnp.ones((2, 4))))
    assert other.groups == []
    assert any(r.primitive == "bitcast_convert_type" and "params/w1[1]" in r.axes for r in other.refused)


def test_variables_that_are_not_arrays_fail_before_tracing():
    model = Model.function(lambda p, x: x @ p["w"], {"w": jnp.ones((4, 2))}, jnp.ones((1, 4)))
    bad = model.with_variables({"params": {"w": jnp.ones((4, 2)), "n": "three"}})
    with pytest.raises(ValueError, match=re.escape("variable params/n: expected an array, got str")):
        analyze(bad)


def test_groups_are_valid_for_the_old_api():
    analysis = analyze(zoo_model("resnet"))
    assert all(isinstance(g, Group) and g.size for g in analysis.groups)
    assert np.all([len(g.slices) > 1 for g in analysis.groups])


def test_zoo_is_complete():
    assert sorted(ZOO) == ["dw", "flat", "gated", "resnet", "vit"]
