import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_variables
from jaxopt_serve.models import CNNConfig, MLPConfig, NNXMLPConfig, TransformerConfig, init_variables, make_apply
from jaxopt_serve.prune import Group, Slice, mask_plan, model_groups, plan, structured_prune
from jaxopt_serve.prune.structured import group_scores

CASES = {
    "mlp": (MLPConfig(features=(24, 16), num_classes=5), (3, 8, 8, 1), "float32"),
    "nnx_mlp": (NNXMLPConfig(features=(24, 16), num_classes=5), (3, 8, 8, 1), "float32"),
    "cnn": (CNNConfig(channels=(8, 12), convs_per_stage=2, hidden=10), (2, 12, 12, 1), "float32"),
    "cnn_no_hidden": (CNNConfig(channels=(6,), hidden=0), (2, 8, 8, 1), "float32"),
    "transformer": (
        TransformerConfig(vocab_size=30, max_len=16, hidden_size=16, num_heads=4, mlp_dim=24, num_layers=2),
        (3, 10),
        "int32",
    ),
}


def _input(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == "int32":
        return jnp.asarray(rng.integers(0, 30, size=shape), jnp.int32)
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_pruned_model_equals_the_masked_full_model(name, criterion):
    """The surgery is right iff the smaller model computes what the full model computes with those units zeroed."""
    config, shape, dtype = CASES[name]
    variables = random_variables(config, seed=1)
    result = structured_prune(config, variables, 0.5, criterion=criterion)
    masked = mask_plan(variables, model_groups(config), result.kept)
    x = _input(shape, dtype)
    full, _ = make_apply(config)(masked, x)
    small, _ = make_apply(result.config)(result.variables, x)
    np.testing.assert_allclose(small, full, rtol=1e-4, atol=1e-4)  # float32 sums in another order
    for _group, (before, after) in result.sizes.items():
        assert after == before - round(0.5 * before)
    # the smaller model is an ordinary model: fresh init has exactly these shapes
    fresh = jax.eval_shape(lambda: init_variables(result.config, 0))
    assert jax.tree.map(lambda a: a.shape, fresh) == jax.tree.map(jnp.shape, result.variables)


def test_transformer_half_heads_and_half_ffn_rewrites_the_config():
    config = CASES["transformer"][0]
    result = structured_prune(config, random_variables(config), {r".*/heads": 0.5, r".*/ffn": 0.5})
    assert result.config.num_heads == (2, 2) and result.config.head_dim == 4 and result.config.mlp_dim == (12, 12)
    assert result.variables["params"]["layer_0"]["attention"]["query"]["kernel"].shape == (16, 2, 4)
    assert result.variables["params"]["layer_1"]["attention"]["out"]["kernel"].shape == (2, 4, 16)


def test_the_least_important_units_go():
    config = MLPConfig(features=(4,), num_classes=3, input_shape=(5,))
    variables = random_variables(config)
    kernel = np.ones((5, 4), np.float32) * np.array([3.0, 0.1, 2.0, 0.2], np.float32)
    variables["params"]["dense_0"]["kernel"] = kernel
    variables["params"]["dense_0"]["bias"] = np.zeros(4, np.float32)
    variables["params"]["classifier"]["kernel"] = np.ones((4, 3), np.float32)
    assert plan(variables, model_groups(config), 0.5)["dense_0"].tolist() == [0, 2]


def test_taylor_criterion_uses_gradient_times_weight():
    config = MLPConfig(features=(4,), num_classes=3, input_shape=(5,))
    variables = random_variables(config)
    grads = jax.tree.map(np.zeros_like, variables["params"])
    grads["dense_0"]["bias"] = np.array([0.0, 5.0, 0.0, 1.0], np.float32)
    scores = group_scores(variables, model_groups(config), criterion="taylor", grads=grads)["dense_0"]
    expected = np.abs(variables["params"]["dense_0"]["bias"] * grads["dense_0"]["bias"])
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="needs grads"):
        group_scores(variables, model_groups(config), criterion="taylor")


def test_a_layer_without_coupling_information_is_an_error():
    config = CASES["mlp"][0]
    with pytest.raises(ValueError, match="'conv_9': no coupling description matches this layer"):
        structured_prune(config, random_variables(config), {"conv_9": 0.5})


def test_a_model_without_builtin_coupling_needs_groups():
    class Custom:
        name = "custom"

    with pytest.raises(ValueError, match="has no built-in coupling description; pass groups="):
        structured_prune(Custom(), {"params": {}}, 0.5)


def test_user_groups_prune_a_custom_model():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, width=8):
            h = nn.relu(nn.Dense(width, name="up")(x))
            return nn.Dense(3, name="down")(h)

    x = jnp.ones((2, 5))
    variables = Net().init(jax.random.key(0), x)
    variables = {"params": jax.tree.map(np.asarray, variables["params"])}
    groups = [Group("up", (Slice("params/up/kernel", 1), Slice("params/up/bias", 0), Slice("params/down/kernel", 0)))]
    result = structured_prune(None, variables, 0.5, groups=groups)
    assert result.config is None and result.variables["params"]["up"]["kernel"].shape == (5, 4)
    masked = mask_plan(variables, groups, result.kept)
    np.testing.assert_allclose(Net().apply(result.variables, x, width=4), Net().apply(masked, x), rtol=1e-5, atol=1e-6)


def test_slices_that_disagree_name_the_path():
    variables = {"params": {"a": {"kernel": np.ones((5, 8), np.float32)}, "b": {"kernel": np.ones((6, 3), np.float32)}}}
    groups = [Group("a", (Slice("params/a/kernel", 1), Slice("params/b/kernel", 0)))]
    with pytest.raises(ValueError, match=re.escape("params/b/kernel axis 0 holds 6 units")):
        structured_prune(None, variables, 0.5, groups=groups)
    with pytest.raises(ValueError, match=re.escape("no variable at params/c/kernel")):
        structured_prune(None, variables, 0.5, groups=[Group("c", (Slice("params/c/kernel", 0),))])


def test_an_incomplete_coupling_is_caught_against_the_rewritten_config():
    config = MLPConfig(features=(8, 6), num_classes=3)
    # dense_0's consumer (dense_1 rows) is left out: the result would not fit the smaller model
    groups = [Group("dense_0", (Slice("params/dense_0/kernel", 1), Slice("params/dense_0/bias", 0)))]
    with pytest.raises(
        ValueError, match="params/dense_1/kernel with shape .* a layer coupled to a pruned one is missing"
    ):
        structured_prune(
            config,
            random_variables(config),
            {"dense_0": 0.5},
            groups=groups,
            rewrite=lambda c, kept: c.replace(features=(kept["dense_0"], 6)),
        )


def test_cnn_stage_with_unequal_conv_widths_is_an_error():
    config = CASES["cnn"][0]
    with pytest.raises(ValueError, match="CNN stage 0 would get different widths"):
        structured_prune(config, random_variables(config), {"conv_0": 0.5, "conv_1": 0.25})


def test_conv_channels_feeding_a_flatten_remove_their_dense_rows():
    """NHWC flatten: channel c of a 3x3 map feeds Dense rows s * C + c for the 9 positions s (Slice.repeat)."""
    import flax.linen as nn

    class FlatNet(nn.Module):
        channels: int = 6

        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Conv(self.channels, (3, 3), padding="SAME", name="conv")(x))
            return nn.Dense(4, name="head")(h.reshape(h.shape[0], -1))

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 2)), jnp.float32)
    variables = {"params": jax.tree.map(np.asarray, FlatNet().init(jax.random.key(0), x)["params"])}
    groups = [
        Group(
            "conv",
            (Slice("params/conv/kernel", 3), Slice("params/conv/bias", 0), Slice("params/head/kernel", 0, repeat=9)),
        )
    ]
    result = structured_prune(None, variables, 0.5, groups=groups)
    assert result.variables["params"]["head"]["kernel"].shape == (27, 4)
    masked = mask_plan(variables, groups, result.kept)
    np.testing.assert_allclose(
        FlatNet(channels=3).apply(result.variables, x), FlatNet().apply(masked, x), rtol=1e-5, atol=1e-5
    )
