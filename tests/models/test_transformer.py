import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_serve.models import TransformerConfig, init_variables

CONFIG = TransformerConfig(vocab_size=50, max_len=16, hidden_size=16, num_heads=4, mlp_dim=32, num_layers=2)


@pytest.fixture(scope="module")
def variables():
    return init_variables(CONFIG, 0)


def test_parameter_layout_has_separate_qkv_and_output_projections(variables):
    attention = variables["params"]["layer_0"]["attention"]
    assert set(attention) == {"query", "key", "value", "out"}
    heads, head_dim = CONFIG.num_heads, CONFIG.hidden_size // CONFIG.num_heads
    for name in ("query", "key", "value"):
        assert attention[name]["kernel"].shape == (CONFIG.hidden_size, heads, head_dim)
    assert attention["out"]["kernel"].shape == (heads, head_dim, CONFIG.hidden_size)
    layer = variables["params"]["layer_1"]
    assert layer["intermediate"]["kernel"].shape == (CONFIG.hidden_size, CONFIG.mlp_dim)
    assert {"attention_norm", "output_norm"} <= set(layer)
    assert {
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
        "embedding_norm",
        "pooler",
        "classifier",
    } <= set(variables["params"])


def test_padding_tokens_do_not_change_the_prediction(variables):
    """With the attention mask, appending padding must leave the CLS output unchanged."""
    model = CONFIG.build()
    tokens = jnp.array([[2, 7, 9, 4, 0, 0, 0, 0]], jnp.int32)
    mask = jnp.array([[1, 1, 1, 1, 0, 0, 0, 0]], jnp.int32)
    padded = model.apply(variables, tokens, attention_mask=mask)
    other_padding = model.apply(variables, tokens.at[0, 4:].set(11), attention_mask=mask)
    short = model.apply(variables, tokens[:, :4])
    np.testing.assert_allclose(padded, other_padding, atol=1e-5)
    np.testing.assert_allclose(padded, short, atol=1e-5)


def test_hidden_states_are_sown_per_layer(variables):
    model = CONFIG.build()
    tokens = jnp.ones((2, 6), jnp.int32)
    _, state = model.apply(variables, tokens, mutable=["intermediates"])
    hidden = state["intermediates"]["hidden_states"]
    assert len(hidden) == CONFIG.num_layers + 1
    assert all(h.shape == (2, 6, CONFIG.hidden_size) for h in hidden)
    np.testing.assert_allclose(hidden[-1], model.apply(variables, tokens, method="encode"), atol=1e-6)


def test_head_dim_can_differ_from_hidden_over_heads():
    config = CONFIG.replace(num_heads=3, head_dim=4)
    variables = init_variables(config, 0)
    assert variables["params"]["layer_0"]["attention"]["query"]["kernel"].shape == (16, 3, 4)
    assert config.build().apply(variables, jnp.ones((1, 5), jnp.int32)).shape == (1, 2)


def test_too_long_sequence_is_an_error(variables):
    with pytest.raises(ValueError, match="sequence length 17 exceeds TransformerConfig.max_len=16"):
        CONFIG.build().apply(variables, jnp.ones((1, 17), jnp.int32))


def test_mask_shape_mismatch_is_an_error(variables):
    with pytest.raises(ValueError, match=r"attention_mask shape \(1, 3\) must equal token shape \(1, 4\)"):
        CONFIG.build().apply(variables, jnp.ones((1, 4), jnp.int32), attention_mask=jnp.ones((1, 3)))


def test_dropout_is_active_only_in_training():
    config = CONFIG.replace(dropout_rate=0.5)
    variables = init_variables(config, 0)
    model = config.build()
    tokens = jnp.ones((2, 6), jnp.int32)
    a = model.apply(variables, tokens, train=True, rngs={"dropout": jax.random.key(1)})
    b = model.apply(variables, tokens, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(model.apply(variables, tokens), model.apply(variables, tokens))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_and_gelu_are_flaxs_functions(dtype):
    """The encoder's own LayerNorm and erf GELU (faster on XLA:CPU) compute Flax's LayerNorm and
    ``jax.nn.gelu(approximate=False)``: same parameters, values and dtypes."""
    from jaxopt_serve.models.transformer import LayerNorm, gelu

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(3.0, 2.0, (4, 5, 24)), dtype)
    ours, flax_ln = LayerNorm(epsilon=1e-6), nn.LayerNorm(epsilon=1e-6)
    params = flax_ln.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, params)
    want, got = flax_ln.apply(params, x), ours.apply(params, x)
    assert got.dtype == want.dtype
    tolerance = 1e-5 if dtype == jnp.float32 else 0.05
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tolerance)
    np.testing.assert_allclose(
        np.asarray(gelu(x * 2 - 6), np.float32),
        np.asarray(jax.nn.gelu(x * 2 - 6, approximate=False), np.float32),
        atol=2e-6 if dtype == jnp.float32 else 0.05,
    )
    assert gelu(x).dtype == dtype
