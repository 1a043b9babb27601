"""Which products ``interpret(fuse_bias=True)`` hands a bias to, and which it leaves alone."""

import jax
import jax.numpy as jnp
import pytest

from jaxopt_serve.trace import _fusable_bias_adds

W = jnp.ones((4, 6))
B = jnp.arange(6.0)
X = jnp.ones((3, 4))


def _fused(fn):
    """``[(bias shape, ndim)]`` of the fusable bias additions in ``fn(w, b, x)``'s program."""
    jaxpr = jax.make_jaxpr(fn)(W, B, X).jaxpr
    return [(tuple(var.aval.shape), ndim) for _, var, ndim in _fusable_bias_adds(jaxpr).values()]


@pytest.mark.parametrize(
    ("name", "fn", "want"),
    [
        ("vector", lambda w, b, x: x @ w + b, [((6,), 1)]),
        ("bias first", lambda w, b, x: b + x @ w, [((6,), 1)]),
        (
            "per head",
            lambda w, b, x: jax.lax.dot_general(x, w.reshape(4, 2, 3), (((1,), (0,)), ((), ()))) + b.reshape(2, 3),
            [((6,), 2)],
        ),
        ("C-order reshape", lambda w, b, x: x @ w + b.reshape(2, 3).reshape(6), [((6,), 1)]),
    ],
)
def test_dense_style_biases_are_found(name, fn, want):
    assert _fused(fn) == want


@pytest.mark.parametrize(
    ("name", "fn"),
    [
        # column-major reshape: the values in another order than the bias var holds them
        ("Fortran-order reshape", lambda w, b, x: x @ w + jnp.reshape(b.reshape(2, 3), (6,), order="F")),
        ("computed from the product", lambda w, b, x: (lambda y: y + y.mean(0))(x @ w)),
        ("residual", lambda w, b, x: x @ w + jnp.tile(x, (1, 2))[:, :6]),
        ("per row", lambda w, b, x: x @ w + x[:, :1]),
        ("product used twice", lambda w, b, x: (lambda y: (y + b, y * 2))(x @ w)),
        ("product in a nested jit", lambda w, b, x: jax.jit(lambda x, w: x @ w)(x, w) + b),
        ("integer product", lambda w, b, x: (x.astype(jnp.int32) @ w.astype(jnp.int32)) + b.astype(jnp.int32)),
    ],
)
def test_other_additions_are_left_alone(name, fn):
    assert _fused(fn) == []
