"""Measurement of compiled functions: latency percentiles, throughput, and compile counts.

Only benchmarks and the demo use these; tests never assert on wall-clock time.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Timings:
    """Per-call wall-clock times in milliseconds, with the usual percentiles."""

    ms: np.ndarray

    @property
    def p50(self) -> float:
        return float(np.percentile(self.ms, 50))

    @property
    def p95(self) -> float:
        return float(np.percentile(self.ms, 95))

    @property
    def p99(self) -> float:
        return float(np.percentile(self.ms, 99))


def time_calls(fn: Callable[..., Any], *args: Any, repeats: int = 100, warmup: int = 3) -> Timings:
    """Call ``fn(*args)`` ``warmup`` times untimed, then ``repeats`` times, each to completion.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> t = time_calls(jax.jit(lambda x: x * 2), jnp.ones(4), repeats=5)
        >>> t.ms.shape, t.p50 > 0
        ((5,), True)
    """
    if repeats <= 0:
        raise ValueError(f"repeats must be > 0, got {repeats}")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    out = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out[i] = (time.perf_counter() - start) * 1e3
    return Timings(out)


def throughput(fn: Callable[..., Any], *args: Any, batch_size: int, repeats: int = 20, warmup: int = 2) -> float:
    """Examples per second of ``fn(*args)`` on a batch of ``batch_size``, from the median call time."""
    return batch_size / (time_calls(fn, *args, repeats=repeats, warmup=warmup).p50 / 1e3)


def device_description() -> str:
    """The default backend's first device, e.g. ``"cpu (TFRT_CPU_0), 8 devices"``."""
    devices = jax.devices()
    first = devices[0]
    return f"{first.platform} ({first.device_kind}), {len(devices)} device{'s' if len(devices) > 1 else ''}"


class CompileCounter:
    """Counts XLA backend compiles (jit, AOT or eager ops) while active, via ``jax.monitoring``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> f = jax.jit(lambda x: x + 1)
        >>> with CompileCounter() as compiles:
        ...     _ = f(jnp.ones(3)), f(jnp.ones(3))
        >>> compiles.count
        1
    """

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, event: str, duration: float, **kwargs: Any) -> None:
        if event == self.EVENT:
            self.count += 1

    def __enter__(self) -> CompileCounter:
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc: object) -> None:
        jax.monitoring.unregister_event_duration_listener(self)
