"""Six models jaxopt_serve does not define, written the way users write them.

Nothing here imports jaxopt_serve: these are plain Flax Linen, Flax NNX and
JAX definitions, sized to train on the 8x8 digits in a few seconds on two CPU
cores. Widths are multiples of 8 so 2-, 4- and 8-way model-parallel sharding
divides them. ``conftest.py`` wraps each in a ``jaxopt_serve.model.Model``
and trains it.

* ``ResNet`` (Linen): residual blocks with BatchNorm, a strided block with a
  1x1 projection shortcut, global average pooling; ``__call__(x, train)``.
* ``ViT`` (Linen): a dict input ``{"pixels", "mask"}``; 2x2 patches embedded
  by a strided conv, learned position embedding, ``MultiHeadDotProductAttention``
  with a key/query padding mask, masked mean pooling.
* ``NNXAttention`` (NNX): image rows as tokens, ``nnx.MultiHeadAttention``,
  ``nnx.LinearGeneral`` (a multi-axis MLP), ``nnx.BatchNorm``, ``nnx.Dropout``
  before the classifier, blocks held in an ``nnx.List``.
* ``RawParams`` (Linen): ``self.param`` weights used with ``@`` and
  ``jnp.einsum`` (one of them a 3-D ``(in, heads, head_dim)`` weight), no Dense.
* ``plain_mlp`` (JAX): ``f(params, x)`` over a dict of arrays.
* ``MultiOut`` (Linen): a small CNN returning ``{"logits", "embedding"}``,
  with dropout switched by ``deterministic=``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

NUM_CLASSES = 10
PATCH = 2
NUM_PATCHES = (8 // PATCH) ** 2  # 16 patches of 2x2 pixels


# -- 1. Linen ResNet ---------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)  # noqa: E731
        y = nn.Conv(self.features, (3, 3), strides=self.strides, use_bias=False, name="conv1")(x)
        y = nn.relu(norm("bn1")(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False, name="conv2")(y)
        y = norm("bn2")(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), strides=self.strides, use_bias=False, name="proj")(x)
            x = norm("proj_bn")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    widths: tuple[int, ...] = (16, 32)
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(self.widths[0], (3, 3), use_bias=False, name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_bn")(x))
        x = ResidualBlock(self.widths[0], name="block1")(x, train)
        for i, width in enumerate(self.widths[1:], start=2):
            x = ResidualBlock(width, strides=2, name=f"block{i}")(x, train)
        x = jnp.mean(x, axis=(1, 2))  # global average pooling
        return nn.Dense(self.num_classes, name="head")(x)


# -- 2. Linen ViT with a dict input and a padding mask ---------------------------------------------------


class EncoderBlock(nn.Module):
    dim: int
    heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x, attention_mask):
        y = nn.LayerNorm()(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.dim)(y, y, mask=attention_mask)
        x = x + y
        y = nn.LayerNorm()(x)
        y = nn.Dense(self.dim)(nn.gelu(nn.Dense(self.mlp_dim)(y)))
        return x + y


class ViT(nn.Module):
    dim: int = 64
    heads: int = 4
    mlp_dim: int = 128
    depth: int = 1
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, inputs):
        pixels, mask = inputs["pixels"], inputs["mask"].astype(bool)
        x = nn.Conv(self.dim, (PATCH, PATCH), strides=PATCH, padding="VALID", name="patch_embed")(pixels)
        x = x.reshape(x.shape[0], -1, self.dim)
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], self.dim))
        x = x + pos
        attention_mask = nn.make_attention_mask(mask, mask)
        for _ in range(self.depth):
            x = EncoderBlock(self.dim, self.heads, self.mlp_dim)(x, attention_mask)
        x = nn.LayerNorm()(x)
        weights = mask.astype(x.dtype)[..., None]
        pooled = (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
        return nn.Dense(self.num_classes, name="head")(pooled)


# -- 3. NNX attention model ------------------------------------------------------------------------------


class NNXBlock(nnx.Module):
    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=dim, qkv_features=dim, decode=False, rngs=rngs)
        self.norm = nnx.BatchNorm(dim, momentum=0.9, rngs=rngs)
        self.up = nnx.LinearGeneral(dim, (4, dim // 2), rngs=rngs)
        self.down = nnx.LinearGeneral((4, dim // 2), dim, axis=(-2, -1), rngs=rngs)

    def __call__(self, x):
        x = self.norm(x + self.attn(x))
        return x + self.down(nnx.gelu(self.up(x)))


class NNXAttention(nnx.Module):
    """Rows of the image are the tokens: ``(B, 8, 8, 1)`` -> 8 tokens of 8 pixels."""

    def __init__(self, *, dim: int = 64, heads: int = 4, depth: int = 2, dropout: float = 0.2, rngs: nnx.Rngs):
        self.embed = nnx.LinearGeneral(8, dim, rngs=rngs)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (1, 8, dim)) * 0.02)
        self.blocks = nnx.List([NNXBlock(dim, heads, rngs=rngs) for _ in range(depth)])
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(dim, NUM_CLASSES, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x.reshape(x.shape[0], 8, 8)) + self.pos[...]
        for block in self.blocks:
            x = block(x)
        return self.head(self.dropout(x.mean(axis=1)))


# -- 4. raw self.param weights with @ and einsum ---------------------------------------------------------


class RawParams(nn.Module):
    hidden: int = 128
    heads: int = 4
    head_dim: int = 16
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        init = nn.initializers.lecun_normal()
        w1 = self.param("w1", init, (x.shape[-1], self.hidden))
        b1 = self.param("b1", nn.initializers.zeros, (self.hidden,))
        w2_init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
        w2 = self.param("w2", w2_init, (self.hidden, self.heads, self.head_dim))
        b2 = self.param("b2", nn.initializers.zeros, (self.heads, self.head_dim))
        w3 = self.param("w3", init, (self.heads * self.head_dim, self.num_classes))
        b3 = self.param("b3", nn.initializers.zeros, (self.num_classes,))
        h = jax.nn.relu(x @ w1 + b1)
        h = jax.nn.relu(jnp.einsum("bi,ihd->bhd", h, w2) + b2).reshape(x.shape[0], -1)
        return jnp.einsum("bi,io->bo", h, w3) + b3


# -- 5. a plain JAX function -----------------------------------------------------------------------------


def init_plain_mlp(key: jax.Array, sizes: tuple[int, ...] = (64, 128, 64, NUM_CLASSES)) -> dict[str, jax.Array]:
    """``{"w1", "b1", "w2", "b2", ...}`` with He-normal weights."""
    params = {}
    keys = jax.random.split(key, len(sizes) - 1)
    for i, (k, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:]), start=1):
        params[f"w{i}"] = jax.random.normal(k, (fan_in, fan_out)) * jnp.sqrt(2.0 / fan_in)
        params[f"b{i}"] = jnp.zeros((fan_out,))
    return params


def plain_mlp(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """Logits of a ReLU MLP: ``x @ w1 + b1``, ..., the last layer without activation."""
    h = x.reshape(x.shape[0], -1)
    depth = len(params) // 2
    for i in range(1, depth + 1):
        h = jnp.dot(h, params[f"w{i}"]) + params[f"b{i}"]
        if i < depth:
            h = jax.nn.relu(h)
    return h


# -- 6. several outputs ----------------------------------------------------------------------------------


class MultiOut(nn.Module):
    embed_dim: int = 64
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = x.reshape(x.shape[0], -1)
        embedding = nn.Dense(self.embed_dim, name="embed")(x)
        h = nn.Dropout(0.1, deterministic=deterministic)(nn.relu(embedding))
        return {"logits": nn.Dense(self.num_classes, name="head")(h), "embedding": embedding}
