import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

from jaxopt_serve.models import MLPConfig, init_variables, make_apply
from jaxopt_serve.prune import PruneRule, gradual_pruning, keep_masks, polynomial_sparsity
from jaxopt_serve.train import classification_loss
from jaxopt_serve.train.loop import init_state, make_train_step

CONFIG = MLPConfig(features=(32,), num_classes=4, input_shape=(16,))
RULES = [PruneRule(r"params/dense_0/kernel", 0.75), PruneRule(r"params/classifier/kernel", 0.5)]


def test_polynomial_schedule_matches_zhu_gupta_on_the_update_grid():
    schedule = polynomial_sparsity(0.9, initial=0.1, begin_step=10, end_step=50, frequency=10)
    for step in range(0, 70):
        value = float(schedule(step))
        if step < 10:
            assert value == 0.0
            continue
        last = min(50, 10 + (step - 10) // 10 * 10)
        expected = 0.9 + (0.1 - 0.9) * (1 - (last - 10) / 40) ** 3
        assert value == pytest.approx(expected, abs=1e-6)
    assert float(schedule(50)) == pytest.approx(0.9)


def test_schedule_with_end_off_the_grid_still_reaches_the_target_at_the_end_step():
    schedule = polynomial_sparsity(0.6, begin_step=0, end_step=7, frequency=3)
    assert float(schedule(6)) < 0.6
    assert float(schedule(7)) == pytest.approx(0.6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(final=1.0, end_step=5), r"sparsity must be a number in \[0, 1\)"),
        (dict(final=0.5, begin_step=5, end_step=5), "begin_step < end_step"),
        (dict(final=0.5, end_step=5, frequency=0), "frequency must be > 0"),
        (dict(final=0.3, initial=0.5, end_step=5), "initial sparsity 0.5 exceeds final 0.3"),
    ],
)
def test_schedule_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        polynomial_sparsity(**kwargs)


def _data(n=64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 16)).astype(np.float32)
    return x, (x[:, :4].argmax(1)).astype(np.int32)


def test_gradual_pruning_hits_the_schedule_exactly_and_masked_weights_stay_zero():
    begin, end, freq = 2, 14, 4
    optimizer = gradual_pruning(optax.adam(1e-2), RULES, begin_step=begin, end_step=end, frequency=freq)
    state = init_state(init_variables(CONFIG, 0), optimizer)
    step = make_train_step(classification_loss(make_apply(CONFIG)), optimizer)
    x, y = _data()
    schedule = {
        r.pattern.split("/")[1]: polynomial_sparsity(r.sparsity, begin_step=begin, end_step=end, frequency=freq)
        for r in RULES
    }
    for t in range(20):
        state, _ = step(state, (x, y))
        masks = state.opt_state.masks
        for name, target in schedule.items():
            kernel = np.asarray(state.params[name]["kernel"])
            mask = np.asarray(masks[name]["kernel"])
            assert (kernel[~mask] == 0).all(), f"masked weights of {name} moved at step {t}"
            # sparsity after update t follows the schedule at t (masks are set on update steps)
            assert (~mask).sum() == round(float(target(t)) * kernel.size)
        assert masks["dense_0"]["bias"] is None
    assert (np.asarray(state.params["dense_0"]["kernel"]) == 0).mean() == 0.75  # exactly the final sparsity
    assert (np.asarray(state.params["classifier"]["kernel"]) == 0).mean() == 0.5


def test_gradual_pruning_state_checkpoints_and_resumes_identically():
    optimizer = gradual_pruning(optax.adam(1e-2), RULES, begin_step=0, end_step=6, frequency=2)
    step = make_train_step(classification_loss(make_apply(CONFIG)), optimizer)
    x, y = _data()
    state = init_state(init_variables(CONFIG, 0), optimizer)
    for _ in range(3):
        state, _ = step(state, (x, y))
    blob = serialization.to_bytes(state.opt_state)  # msgpack, no pickle
    restored = serialization.from_bytes(init_state(init_variables(CONFIG, 0), optimizer).opt_state, blob)
    resumed = state._replace(opt_state=jax.tree.map(jnp.asarray, restored))
    for _ in range(4):
        state, _ = step(state, (x, y))
        resumed, _ = step(resumed, (x, y))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)


def test_keep_masks_holds_pruned_weights_at_zero_under_adamw():
    from jaxopt_serve.prune import prune

    variables = init_variables(CONFIG, 0)
    result = prune(variables["params"], [PruneRule(r".*kernel", 0.6)])
    optimizer = optax.chain(optax.adamw(1e-2, weight_decay=0.1), keep_masks(result.masks))
    state = init_state({"params": result.params}, optimizer)
    step = make_train_step(classification_loss(make_apply(CONFIG)), optimizer)
    x, y = _data()
    for _ in range(5):
        state, _ = step(state, (x, y))
    kernel = np.asarray(state.params["dense_0"]["kernel"])
    assert ((kernel == 0) == ~np.asarray(result.masks["dense_0"]["kernel"])).all()
    assert not np.array_equal(kernel, result.params["dense_0"]["kernel"])  # the rest did train
