"""A multi-layer perceptron classifier written in Flax NNX.

Its parameter paths match the Linen ``MLP`` (``dense_{i}/kernel``,
``classifier/bias``, ...), so rules written for one apply to the other.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxopt_serve.models.config import ModelConfig, check_positive, register_config


@register_config
@dataclasses.dataclass(frozen=True, kw_only=True)
class NNXMLPConfig(ModelConfig):
    """Hyper-parameters of ``NNXMLP``.

    Attributes:
        features: widths of the hidden Linear layers.
        num_classes: width of the output layer.
        input_shape: shape of one example; it is flattened first.
    """

    name = "nnx_mlp"
    framework = "nnx"
    features: tuple[int, ...] = (128, 128)
    num_classes: int = 10
    input_shape: tuple[int, ...] = (8, 8, 1)

    def __post_init__(self) -> None:
        check_positive(self, features=self.features, num_classes=self.num_classes, input_shape=self.input_shape)

    def build(self, *, rngs: nnx.Rngs | None = None) -> NNXMLP:
        return NNXMLP(self, rngs=rngs if rngs is not None else nnx.Rngs(0))

    def example_shape(self) -> tuple[int, ...]:
        return self.input_shape


class NNXMLP(nnx.Module):
    """Flatten, ``Linear -> relu`` per hidden width, then a Linear classifier.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> model = NNXMLPConfig(features=(16,), num_classes=3).build(rngs=nnx.Rngs(0))
        >>> model(jnp.ones((2, 8, 8, 1))).shape
        (2, 3)
    """

    def __init__(self, config: NNXMLPConfig, *, rngs: nnx.Rngs) -> None:
        self.config = config
        self.num_hidden = len(config.features)
        width_in = 1
        for dim in config.input_shape:
            width_in *= dim
        for i, width in enumerate(config.features):
            setattr(self, f"dense_{i}", nnx.Linear(width_in, width, rngs=rngs))
            width_in = width
        self.classifier = nnx.Linear(width_in, config.num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no dropout or batch norm: train and eval are the same
        x = x.reshape((x.shape[0], -1))
        for i in range(self.num_hidden):
            x = jax.nn.relu(getattr(self, f"dense_{i}")(x))
        return self.classifier(x).astype(jnp.float32)
