"""Models jaxopt_serve does not define, for automatic structured pruning (tiny shapes, written as users write them).

The ResNet (projection and identity shortcuts) and the ViT (heads and MLP, a
dict input with a padding mask) are the foreign-model zoo's (``tests/foreign/models.py``);
the three below complete the set the structured-pruning tests need.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from foreign.models import ResNet, ViT

__all__ = ["DepthwiseSeparable", "FlattenNet", "GatedMLP", "ResNet", "ViT"]


class GatedMLP(nnx.Module):
    """NNX SwiGLU-style MLP: one projection split into a gate half and a value half."""

    def __init__(self, din: int = 16, hidden: int = 32, dout: int = 5, *, rngs: nnx.Rngs):
        self.norm = nnx.RMSNorm(din, rngs=rngs)
        self.up = nnx.Linear(din, 2 * hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, din, rngs=rngs)
        self.head = nnx.Linear(din, dout, rngs=rngs)

    def __call__(self, x):
        gate, value = jnp.split(self.up(self.norm(x)), 2, axis=-1)
        x = x + self.down(jax.nn.silu(gate) * value)
        return self.head(x)


class DepthwiseSeparable(nn.Module):
    """MobileNet-style: depthwise 3x3 (feature_group_count = channels) then pointwise 1x1, BatchNorm after each."""

    widths: tuple[int, ...] = (16, 32)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(
            nn.BatchNorm(use_running_average=not train, name="stem_bn")(
                nn.Conv(self.widths[0], (3, 3), use_bias=False, name="stem")(x)
            )
        )
        for i, width in enumerate(self.widths):
            channels = x.shape[-1]
            x = nn.Conv(channels, (3, 3), feature_group_count=channels, use_bias=False, name=f"dw{i}")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, name=f"dw{i}_bn")(x))
            x = nn.Conv(width, (1, 1), use_bias=False, name=f"pw{i}")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, name=f"pw{i}_bn")(x))
        return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))


class FlattenNet(nn.Module):
    """Two convs with literal widths, a 2x2 max pool, then the NHWC map flattened into a Dense.

    ``scale`` multiplies the literal widths (8, 16, 24) for the speed benchmark; no field holds a pruned size,
    so automatic pruning re-runs the program at any scale.
    """

    scale: int = 1

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8 * self.scale, (3, 3), name="conv0")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(16 * self.scale, (3, 3), name="conv1")(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(24 * self.scale, name="fc")(x))
        return nn.Dense(10, name="head")(x)
