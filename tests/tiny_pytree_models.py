"""Tiny models with pytree inputs and outputs, shared by the engine, export and serving tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_serve.model import Model


class DictNet(nn.Module):
    """{"x": float (B, 6), "mask": bool (B, 4)} -> (float logits (B, 5), int32 argmax (B,))."""

    @nn.compact
    def __call__(self, inputs):
        h = nn.Dense(8)(inputs["x"]) * jnp.where(inputs["mask"], 1.0, 0.5).sum(-1, keepdims=True)
        logits = nn.Dense(5)(jnp.tanh(h))
        return logits, jnp.argmax(logits, -1).astype(jnp.int32)


def dict_model():
    example = {"x": np.zeros((2, 6), np.float32), "mask": np.zeros((2, 4), bool)}
    net = DictNet()
    return Model.linen(net, net.init(jax.random.key(0), example), example, name="dict_net")


def dict_inputs(n, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 6)).astype(np.float32), "mask": rng.random((n, 4)) > 0.5}


def two_input_model():
    """A plain function of two positional inputs: (float (B, 3), int32 (B,)) -> (float (B, 3), int32 (B,))."""

    def f(params, a, b):
        y = a @ params["w"] + b[:, None].astype(jnp.float32)
        return y, b * 2

    params = {"w": np.arange(9, dtype=np.float32).reshape(3, 3) / 9}
    return Model.function(f, params, np.zeros((1, 3), np.float32), np.zeros((1,), np.int32), name="two_inputs")


VOCAB, DIM = 11, 4


def pooled_model():
    """Masked mean pooling over tokens: output does not depend on zero padding.

    {"input_ids": int32 (B, L), "attention_mask": int32 (B, L)} -> (float logits (B, 3), float token scores (B, L)).
    """

    def f(params, inputs):
        emb = params["emb"][inputs["input_ids"]]  # (B, L, D)
        mask = inputs["attention_mask"].astype(jnp.float32)[..., None]
        pooled = (emb * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
        return pooled @ params["w"], (emb @ params["v"])[..., 0] * mask[..., 0]

    rng = np.random.default_rng(5)
    params = {
        "emb": rng.normal(size=(VOCAB, DIM)).astype(np.float32),
        "w": rng.normal(size=(DIM, 3)).astype(np.float32),
        "v": rng.normal(size=(DIM, 1)).astype(np.float32),
    }
    example = {"input_ids": np.zeros((1, 8), np.int32), "attention_mask": np.ones((1, 8), np.int32)}
    return Model.function(f, params, example, name="pooled")


def token_inputs(n, length, seed=0):
    """Token ids with a random number of real tokens per row (at least one), padded with zeros up to ``length``."""
    rng = np.random.default_rng(seed)
    real = rng.integers(1, length + 1, size=n)
    mask = (np.arange(length)[None, :] < real[:, None]).astype(np.int32)
    ids = rng.integers(1, VOCAB, size=(n, length)).astype(np.int32) * mask
    return {"input_ids": ids, "attention_mask": mask}
