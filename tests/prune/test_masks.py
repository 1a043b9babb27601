import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_serve.models import MLPConfig, init_variables
from jaxopt_serve.prune import (
    PruneRule,
    UnusedPruneRuleWarning,
    apply_masks,
    classification_grad_fn,
    compute_masks,
    importance_scores,
    is_nm_sparse,
    nm_mask,
    prune,
    random_scores,
)

CONFIG = MLPConfig(features=(48, 32), num_classes=5)


@pytest.fixture(scope="module")
def params():
    return jax.tree.map(np.asarray, init_variables(CONFIG, 0)["params"])


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_layer_scope_removes_exactly_the_requested_share_of_each_leaf(params, sparsity):
    result = prune(params, [PruneRule(r"params/.*/kernel", sparsity)])
    for name in ("dense_0", "dense_1", "classifier"):
        kernel = np.asarray(result.params[name]["kernel"])
        assert (kernel == 0).sum() == round(sparsity * kernel.size)
        # the survivors are the largest magnitudes
        kept = np.abs(np.asarray(params[name]["kernel"]))[kernel != 0]
        dropped = np.abs(np.asarray(params[name]["kernel"]))[kernel == 0]
        if kept.size and dropped.size:
            assert kept.min() >= dropped.max()
        assert result.masks[name]["bias"] is None
        np.testing.assert_array_equal(result.params[name]["bias"], params[name]["bias"])


def test_global_scope_hits_the_total_and_spares_small_sensitive_layers(params):
    big = np.sign(params["classifier"]["kernel"]) * (np.abs(params["classifier"]["kernel"]) + 10.0)
    scaled = {**params, "classifier": {**params["classifier"], "kernel": big}}
    result = prune(scaled, [PruneRule(r"params/.*/kernel", 0.8)], scope="global")
    kernels = [np.asarray(result.params[n]["kernel"]) for n in ("dense_0", "dense_1", "classifier")]
    total = sum(k.size for k in kernels)
    assert sum(int((k == 0).sum()) for k in kernels) == round(0.8 * total)
    assert result.sparsity["params/classifier/kernel"] == 0.0  # its weights are all larger
    assert result.overall == pytest.approx(0.8, abs=1 / total)


def test_ties_are_broken_by_position_so_the_count_stays_exact():
    params = {"d": {"kernel": np.ones((10, 10), np.float32)}}
    result = prune(params, [PruneRule(r".*kernel", 0.37)])
    assert int((np.asarray(result.params["d"]["kernel"]) == 0).sum()) == 37


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_keeps_exactly_n_of_every_m_along_the_contraction_axis(params, n, m):
    result = prune(params, [PruneRule(r"params/dense_.*/kernel", n_m=(n, m))])
    for name in ("dense_0", "dense_1"):
        kernel = np.asarray(result.params[name]["kernel"])
        groups = kernel.reshape(kernel.shape[0] // m, m, kernel.shape[1])  # axis 0 = inputs
        np.testing.assert_array_equal((groups != 0).sum(axis=1), n)
        assert is_nm_sparse(kernel, n, m, axis=0)
        # the kept entries are the largest of their group
        w = np.abs(np.asarray(params[name]["kernel"])).reshape(groups.shape)
        kept_min = np.where(groups != 0, w, np.inf).min(axis=1)
        dropped_max = np.where(groups == 0, w, -np.inf).max(axis=1)
        assert (kept_min >= dropped_max).all()


def test_nm_on_a_conv_kernel_groups_input_channels():
    kernel = np.random.default_rng(0).normal(size=(3, 3, 8, 4)).astype(np.float32)
    mask = np.asarray(nm_mask(jnp.abs(kernel), 2, 4, axis=2))
    assert is_nm_sparse(kernel * mask, 2, 4, axis=2)
    assert not is_nm_sparse(kernel, 2, 4, axis=2)


def test_importance_is_weight_times_mean_gradient(params, digits):
    grad_fn = classification_grad_fn(CONFIG.replace(input_shape=digits.input_shape))
    batches = [(digits.x_train[:64], digits.y_train[:64]), (digits.x_train[64:128], digits.y_train[64:128])]
    scores = importance_scores(grad_fn, params, batches)
    g0, g1 = (grad_fn(params, b) for b in batches)
    w = params["dense_0"]["kernel"]
    expected = (np.abs(w * g0["dense_0"]["kernel"]) + np.abs(w * g1["dense_0"]["kernel"])) / 2
    np.testing.assert_allclose(scores["dense_0"]["kernel"], expected, rtol=1e-5, atol=1e-9)
    magnitude = prune(params, [PruneRule(r"params/dense_0/kernel", 0.5)]).masks["dense_0"]["kernel"]
    important = prune(params, [PruneRule(r"params/dense_0/kernel", 0.5)], scores=scores).masks["dense_0"]["kernel"]
    assert not np.array_equal(magnitude, important)  # a different criterion keeps different weights


def test_random_scores_are_seeded(params):
    a = compute_masks(params, [PruneRule(r".*kernel", 0.5)], random_scores(params, seed=1))
    b = compute_masks(params, [PruneRule(r".*kernel", 0.5)], random_scores(params, seed=1))
    c = compute_masks(params, [PruneRule(r".*kernel", 0.5)], random_scores(params, seed=2))
    np.testing.assert_array_equal(a["dense_0"]["kernel"], b["dense_0"]["kernel"])
    assert not np.array_equal(a["dense_0"]["kernel"], c["dense_0"]["kernel"])


def test_first_rule_wins_and_unused_rules_are_reported(params):
    rules = [
        PruneRule(r"params/classifier/kernel", None),
        PruneRule(r"params/.*/kernel", 0.5),
        PruneRule(r"params/nothing/.*", 0.5),
    ]
    with pytest.warns(UnusedPruneRuleWarning, match="params/nothing"):
        result = prune(params, rules)
    assert result.masks["classifier"]["kernel"] is None
    assert set(result.sparsity) == {"params/dense_0/kernel", "params/dense_1/kernel"}


def test_apply_masks_zeroes_exactly_and_jit_agrees(params):
    masks = compute_masks(params, [PruneRule(r".*kernel", 0.6)])
    eager = apply_masks(params, masks)
    jitted = jax.jit(apply_masks)(params, masks)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, "half"])
def test_sparsity_outside_unit_interval_is_an_error(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        PruneRule(r".*kernel", sparsity)


def test_n_greater_than_m_is_an_error():
    with pytest.raises(ValueError, match="N <= M, got N=4 > M=2"):
        PruneRule(r".*", n_m=(4, 2))


def test_nm_axis_not_divisible_names_the_path():
    params = {"odd": {"kernel": np.ones((6, 3), np.float32)}}
    with pytest.raises(ValueError, match=re.escape("params/odd/kernel: N:M sparsity 2:4 needs axis 0 (length 6)")):
        prune(params, [PruneRule(r".*kernel", n_m=(2, 4))])


def test_integer_and_non_finite_leaves_name_the_path():
    with pytest.raises(ValueError, match="params/d/kernel: rule .* selects a int32 leaf"):
        prune({"d": {"kernel": np.ones((4, 4), np.int32)}}, [PruneRule(r".*kernel", 0.5)])
    bad = np.ones((4, 4), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="params/d/kernel: holds NaN or inf"):
        prune({"d": {"kernel": bad}}, [PruneRule(r".*kernel", 0.5)])
