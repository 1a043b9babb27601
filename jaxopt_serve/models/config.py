"""Model configs: small frozen dataclasses that build a module and round-trip through JSON.

Every reference model has one config class. A config knows which framework its
module belongs to (Flax Linen or Flax NNX), how to build the module, and what a
single input example looks like. Configs are registered by name so that an
artifact can store ``{"name": ..., "fields": {...}}`` and rebuild the exact
module later without pickling anything.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

_REGISTRY: dict[str, type[ModelConfig]] = {}

Framework = Literal["linen", "nnx"]


def register_config(cls: type[ModelConfig]) -> type[ModelConfig]:
    """Class decorator: make ``cls`` loadable by ``config_from_dict`` under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a model config named {cls.name!r} is already registered: {_REGISTRY[cls.name]!r}")
    _REGISTRY[cls.name] = cls
    return cls


def registered_configs() -> dict[str, type[ModelConfig]]:
    """The registered config classes by name (a copy)."""
    return dict(_REGISTRY)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Base class of the reference model configs.

    Subclasses set the class variables ``name`` and ``framework``, declare
    their hyper-parameters as fields, validate them in ``__post_init__`` and
    implement ``build`` and ``example_shape``.
    """

    name: ClassVar[str] = "base"
    framework: ClassVar[Framework] = "linen"
    input_dtype: ClassVar[str] = "float32"

    def build(self, **kwargs: Any) -> Any:
        """Build the module this config describes."""
        raise NotImplementedError

    def example_shape(self) -> tuple[int, ...]:
        """Shape of one input example (no batch axis) used when none is given."""
        raise NotImplementedError

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"name": ..., "fields": {...}}``; tuples become lists."""
        fields = {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"name": self.name, "fields": fields}


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Rebuild a config from ``ModelConfig.to_dict`` output.

    Example:
        >>> from jaxopt_serve.models import MLPConfig, config_from_dict
        >>> cfg = MLPConfig(features=(32,), num_classes=3)
        >>> config_from_dict(cfg.to_dict()) == cfg
        True
    """
    if not isinstance(data, dict) or "name" not in data or "fields" not in data:
        raise ValueError(f"expected a dict with keys 'name' and 'fields', got {data!r}")
    name = data["name"]
    if name not in _REGISTRY:
        raise ValueError(f"unknown model config {name!r}; known: {sorted(_REGISTRY)}")
    cls = _REGISTRY[name]
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data["fields"]) - set(known))
    if unknown:
        raise ValueError(f"model config {name!r} has no fields {unknown}; known: {sorted(known)}")
    kwargs = {}
    for key, value in data["fields"].items():
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def _to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


def check_positive(config: ModelConfig, **values: Any) -> None:
    """Raise ``ValueError`` naming the field if any value is not a positive int."""
    for field, value in values.items():
        items = value if isinstance(value, tuple) else (value,)
        if not items and isinstance(value, tuple):
            raise ValueError(f"{type(config).__name__}.{field} must not be empty")
        for item in items:
            if not isinstance(item, int) or isinstance(item, bool) or item <= 0:
                raise ValueError(f"{type(config).__name__}.{field} must hold positive ints, got {value!r}")


def check_rate(config: ModelConfig, **values: float) -> None:
    """Raise ``ValueError`` naming the field if a rate is outside [0, 1)."""
    for field, value in values.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{type(config).__name__}.{field} must be in [0, 1), got {value!r}")
