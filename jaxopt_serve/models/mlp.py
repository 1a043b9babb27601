"""A multi-layer perceptron classifier (Flax Linen)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxopt_serve.models.config import ModelConfig, check_positive, check_rate, register_config


@register_config
@dataclasses.dataclass(frozen=True, kw_only=True)
class MLPConfig(ModelConfig):
    """Hyper-parameters of ``MLP``.

    Attributes:
        features: widths of the hidden Dense layers, in order.
        num_classes: width of the output layer.
        dropout_rate: dropout after each hidden layer while training.
        input_shape: shape of one example; it is flattened before the first layer.
    """

    name = "mlp"
    features: tuple[int, ...] = (128, 128)
    num_classes: int = 10
    dropout_rate: float = 0.0
    input_shape: tuple[int, ...] = (8, 8, 1)

    def __post_init__(self) -> None:
        check_positive(self, features=self.features, num_classes=self.num_classes, input_shape=self.input_shape)
        check_rate(self, dropout_rate=self.dropout_rate)

    def build(self) -> MLP:
        return MLP(config=self)

    def example_shape(self) -> tuple[int, ...]:
        return self.input_shape


class MLP(nn.Module):
    """Flatten, then ``Dense -> relu (-> dropout)`` per hidden width, then a Dense classifier.

    Parameters live under ``dense_{i}`` and ``classifier``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> model = MLPConfig(features=(16,), num_classes=3).build()
        >>> x = jnp.ones((2, 8, 8, 1))
        >>> variables = model.init(jax.random.key(0), x)
        >>> model.apply(variables, x).shape
        (2, 3)
    """

    config: MLPConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        cfg = self.config
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(cfg.features):
            x = nn.relu(nn.Dense(width, name=f"dense_{i}")(x))
            if cfg.dropout_rate:
                x = nn.Dropout(cfg.dropout_rate, deterministic=not train)(x)
        return nn.Dense(cfg.num_classes, name="classifier")(x).astype(jnp.float32)
