"""A convolutional classifier: conv -> batch norm -> relu blocks, pooling, dense head (Flax Linen, NHWC)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxopt_serve.models.config import ModelConfig, check_positive, check_rate, register_config


@register_config
@dataclasses.dataclass(frozen=True, kw_only=True)
class CNNConfig(ModelConfig):
    """Hyper-parameters of ``CNN``.

    Attributes:
        channels: output channels of each stage; every stage ends with a 2x2 pool.
        convs_per_stage: conv -> batch norm -> relu blocks in each stage.
        kernel_size: square convolution window.
        hidden: width of the Dense layer before the classifier (0: none).
        num_classes: width of the classifier.
        pool: ``"max"`` or ``"avg"`` for the 2x2 pooling between stages.
        dropout_rate: dropout before the classifier while training.
        in_channels: channels of the input images (NHWC).
        example_size: height and width used when an example input is needed
            (initialization); the model itself accepts any height and width.
    """

    name = "cnn"
    channels: tuple[int, ...] = (32, 64)
    convs_per_stage: int = 1
    kernel_size: int = 3
    hidden: int = 64
    num_classes: int = 10
    pool: Literal["max", "avg"] = "max"
    dropout_rate: float = 0.0
    in_channels: int = 1
    example_size: int = 8

    def __post_init__(self) -> None:
        check_positive(
            self,
            channels=self.channels,
            convs_per_stage=self.convs_per_stage,
            kernel_size=self.kernel_size,
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            example_size=self.example_size,
        )
        if not isinstance(self.hidden, int) or self.hidden < 0:
            raise ValueError(f"CNNConfig.hidden must be an int >= 0, got {self.hidden!r}")
        if self.pool not in ("max", "avg"):
            raise ValueError(f"CNNConfig.pool must be 'max' or 'avg', got {self.pool!r}")
        check_rate(self, dropout_rate=self.dropout_rate)

    def build(self) -> CNN:
        return CNN(config=self)

    def example_shape(self) -> tuple[int, ...]:
        return (self.example_size, self.example_size, self.in_channels)


class CNN(nn.Module):
    """Stages of ``conv -> batch norm -> relu`` with 2x2 pooling, global average pooling, dense head.

    Global average pooling makes the parameters independent of the image size,
    so the same variables run on 8x8 digits and on 224x224 images. Layer names:
    ``conv_{i}`` / ``bn_{i}`` (numbered across stages), ``dense`` and ``classifier``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> model = CNNConfig(channels=(4, 8), hidden=8).build()
        >>> variables = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
        >>> sorted(variables)
        ['batch_stats', 'params']
        >>> model.apply(variables, jnp.ones((3, 28, 28, 1))).shape
        (3, 10)
    """

    config: CNNConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"CNN expects NHWC input with {cfg.in_channels} channels, got shape {x.shape}")
        pool = nn.max_pool if cfg.pool == "max" else nn.avg_pool
        layer = 0
        for width in cfg.channels:
            for _ in range(cfg.convs_per_stage):
                k = cfg.kernel_size
                x = nn.Conv(width, (k, k), padding="SAME", use_bias=False, name=f"conv_{layer}")(x)
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn_{layer}")(x)
                x = nn.relu(x)
                layer += 1
            x = pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = jnp.mean(x, axis=(1, 2))
        if cfg.hidden:
            x = nn.relu(nn.Dense(cfg.hidden, name="dense")(x))
        if cfg.dropout_rate:
            x = nn.Dropout(cfg.dropout_rate, deterministic=not train)(x)
        return nn.Dense(cfg.num_classes, name="classifier")(x).astype(jnp.float32)
