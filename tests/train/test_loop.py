import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_serve.models import CNNConfig, NNXMLPConfig, init_variables, make_apply, predict_fn
from jaxopt_serve.train import (
    accuracy,
    batch_indices,
    classification_loss,
    default_optimizer,
    fit,
    init_state,
    make_train_step,
)


def test_training_lowers_loss_and_passes_90_percent(trained_cnn, digits):
    artifact, result = trained_cnn
    losses = [entry["loss"] for entry in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert artifact.metadata["test_accuracy"] > 0.90
    # the recorded accuracy is the accuracy of the returned variables
    assert accuracy(predict_fn(artifact.config), artifact.variables, digits.x_test, digits.y_test) == pytest.approx(
        artifact.metadata["test_accuracy"]
    )


def test_training_updates_batch_norm_statistics(trained_cnn):
    artifact, _ = trained_cnn
    fresh = init_variables(artifact.config, 0)
    assert not np.allclose(artifact.variables["batch_stats"]["bn_0"]["var"], fresh["batch_stats"]["bn_0"]["var"])


def test_batch_indices_cover_each_epoch_once():
    per_epoch = [batch_indices(10, 3, step, seed=4) for step in range(3)]
    seen = np.concatenate(per_epoch)
    assert len(set(seen.tolist())) == 9  # one example is dropped, none repeated
    assert not np.array_equal(batch_indices(10, 3, 0, seed=4), batch_indices(10, 3, 3, seed=4))


def test_batch_size_larger_than_data_is_an_error():
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, 10\]"):
        batch_indices(10, 11, 0, seed=0)


def _small_fit(digits, steps, state=None, seed=0):
    config = CNNConfig(channels=(4,), hidden=0, dropout_rate=0.2)
    loss_fn = classification_loss(make_apply(config))
    return fit(
        loss_fn,
        init_variables(config, 0),
        (digits.x_train[:256], digits.y_train[:256]),
        optimizer=default_optimizer(10),
        steps=steps,
        batch_size=32,
        seed=seed,
        state=state,
        progress=False,
        log_every=5,
    )


def test_resumed_run_equals_uninterrupted_run(digits):
    """Stop after 4 steps, resume to 10: same parameters, batch stats and optimizer state as 10 straight."""
    straight = _small_fit(digits, 10)
    first = _small_fit(digits, 4)
    resumed = _small_fit(digits, 10, state=first.state)
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(a, b)


def test_same_seed_same_result_other_seed_other_result(digits):
    a, b, c = _small_fit(digits, 3), _small_fit(digits, 3), _small_fit(digits, 3, seed=1)
    np.testing.assert_array_equal(a.variables["params"]["conv_0"]["kernel"], b.variables["params"]["conv_0"]["kernel"])
    assert not np.array_equal(a.variables["params"]["conv_0"]["kernel"], c.variables["params"]["conv_0"]["kernel"])


def test_train_step_compiles_once(digits):
    config = CNNConfig(channels=(4,), hidden=0)
    optimizer = optax.sgd(0.1)
    step = make_train_step(classification_loss(make_apply(config)), optimizer)
    state = init_state(init_variables(config, 0), optimizer)
    for i in range(3):
        state, _ = step(state, (digits.x_train[i * 8 : (i + 1) * 8], digits.y_train[i * 8 : (i + 1) * 8]))
    assert step._cache_size() == 1


def test_nnx_model_trains_with_the_same_loop(digits):
    config = NNXMLPConfig(features=(32,))
    loss_fn = classification_loss(make_apply(config))
    result = fit(
        loss_fn,
        init_variables(config, 0),
        (digits.x_train, digits.y_train),
        optimizer=optax.adam(3e-3),
        steps=150,
        batch_size=64,
        progress=False,
        log_every=50,
    )
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert accuracy(predict_fn(config), result.variables, digits.x_test, digits.y_test) > 0.85


def test_eval_fn_and_on_log_are_called(digits):
    config = CNNConfig(channels=(4,), hidden=0)
    logged = []
    fit(
        classification_loss(make_apply(config)),
        init_variables(config, 0),
        (digits.x_train, digits.y_train),
        optimizer=optax.adam(1e-3),
        steps=6,
        batch_size=16,
        progress=False,
        log_every=3,
        eval_fn=lambda v: {"val": 0.5},
        on_log=lambda state, entry: logged.append((int(state.step), entry["val"])),
    )
    assert logged == [(3, 0.5), (6, 0.5)]


def test_mismatched_data_lengths_are_an_error(digits):
    config = CNNConfig(channels=(4,), hidden=0)
    with pytest.raises(ValueError, match=r"same number of examples, got sizes \[10, 9\]"):
        fit(
            classification_loss(make_apply(config)),
            init_variables(config, 0),
            (digits.x_train[:10], digits.y_train[:9]),
            optimizer=optax.sgd(0.1),
            steps=1,
            batch_size=2,
            progress=False,
        )


def test_accuracy_compiles_once_for_ragged_last_batch(digits):
    config = CNNConfig(channels=(4,), hidden=0)
    variables = init_variables(config, 0)
    predict = predict_fn(config)
    acc = accuracy(predict, variables, digits.x_test[:100], digits.y_test[:100], batch_size=32)
    logits = np.asarray(predict(variables, digits.x_test[:100]))
    assert acc == pytest.approx(float((logits.argmax(-1) == digits.y_test[:100]).mean()))
