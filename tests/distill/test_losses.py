import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxopt_serve.distill import distillation_loss, hidden_cosine, hidden_mse, soft_kl


def _reference_kl(s, t, temperature):
    def log_softmax(z):
        z = z / temperature
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lt, ls = log_softmax(t.astype(np.float64)), log_softmax(s.astype(np.float64))
    return temperature**2 * (np.exp(lt) * (lt - ls)).sum(-1).mean()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), temperature=st.sampled_from([0.5, 1.0, 2.0, 4.0, 8.0]))
def test_soft_kl_is_t_squared_times_the_kl_of_softened_distributions(seed, temperature):
    rng = np.random.default_rng(seed)
    s, t = rng.normal(size=(2, 6, 10)).astype(np.float32) * 3
    assert float(soft_kl(jnp.asarray(s), jnp.asarray(t), temperature)) == pytest.approx(
        _reference_kl(s, t, temperature), rel=1e-4, abs=1e-5
    )
    assert float(soft_kl(jnp.asarray(t), jnp.asarray(t), temperature)) == pytest.approx(0.0, abs=1e-6)


def test_t_squared_keeps_the_soft_gradient_scale_at_high_temperature():
    """Hinton et al.: for large T the gradient of KL/T^2... times T^2 tends to (z_s - z_t) / (N T^0): it stays O(1)."""
    rng = np.random.default_rng(0)
    s, t = (jnp.asarray(rng.normal(size=(4, 10)), jnp.float32) for _ in range(2))
    norms = [float(jnp.linalg.norm(jax.grad(soft_kl)(s, t, temp))) for temp in (4.0, 16.0, 64.0)]
    assert max(norms) / min(norms) < 1.2  # without the T^2 factor they would shrink 256x


def test_distillation_loss_mixes_soft_and_hard_terms():
    rng = np.random.default_rng(1)
    s, t = (jnp.asarray(rng.normal(size=(5, 4)), jnp.float32) for _ in range(2))
    labels = jnp.array([0, 1, 2, 3, 0])
    loss, parts = distillation_loss(s, t, labels, temperature=3.0, alpha=0.25)
    hard = -jnp.take_along_axis(jax.nn.log_softmax(s), labels[:, None], axis=1).mean()
    assert float(parts["hard"]) == pytest.approx(float(hard), rel=1e-5)
    assert float(parts["soft"]) == pytest.approx(float(soft_kl(s, t, 3.0)), rel=1e-6)
    assert float(loss) == pytest.approx(0.25 * float(parts["soft"]) + 0.75 * float(hard), rel=1e-5)


@pytest.mark.parametrize("temperature", [0.0, -1.0, "2"])
def test_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        soft_kl(jnp.zeros((1, 3)), jnp.zeros((1, 3)), temperature)


def test_different_output_sizes_are_an_error():
    with pytest.raises(ValueError, match=r"teacher logits \(2, 5\) differ: teacher and student need the same number"):
        soft_kl(jnp.zeros((2, 4)), jnp.zeros((2, 5)), 2.0)


def test_hidden_losses_on_known_values():
    a = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    b = jnp.array([[1.0, 0.0], [0.0, -2.0]])
    assert float(hidden_mse(a, b)) == pytest.approx(4.0)  # (0 + 0 + 0 + 16) / 4
    assert float(hidden_cosine(a, b)) == pytest.approx(1.0)  # rows: cos 1 and cos -1 -> mean(0, 2)
    assert float(hidden_cosine(a, 3 * a)) == pytest.approx(0.0, abs=1e-6)
