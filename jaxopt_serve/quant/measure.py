"""``mode="auto"``'s choice by measurement: time a layer's float and int8 forms once per shape, keep the faster.

On CPU with the native kernels, whether a quantized dot or convolution is
faster as an int8 product or as a float product on the dequantized kernel
depends on the CPU (AVX2, AVX-512 VNNI, AMX), on the layer's shape and on the
batch: a 3-channel first convolution is slower in int8 on an AVX2 CPU and
faster on an AVX-512 one. So for every large enough layer (``MIN_MACS``
multiply-adds or more at the traced shape), ``auto`` compiles the layer alone
in both forms on random inputs of its exact shapes, times them alternately,
and runs the faster one (the rule's form stays unless the other is more than
``MARGIN`` faster). A choice is made once per process for each layer
signature (shapes, dtypes, operation parameters, kernel path) and reused by
every later trace: another batch size is another shape, so it is measured
again. Smaller layers, symbolic shapes (``jax.export``) and other backends
keep the rule in ``jaxopt_serve.quant.runtime``.

``JAXOPT_SERVE_AUTO=rules`` turns measuring off (the rules alone, the same
choice on every machine); ``measure`` (or unset) is the default.

Example:
    >>> import jax.numpy as jnp
    >>> from jaxopt_serve.quant import measure
    >>> choice = measure.choose(
    ...     ("example", 64),
    ...     "params/w",
    ...     lambda mode: (lambda x: x @ x.T) if mode == "dynamic" else (lambda x: x @ x.T + 0),
    ...     (jnp.ones((64, 64)),),
    ... )
    >>> choice.mode in ("dynamic", "weight_only") and choice.int8_ms > 0 and choice.float_ms > 0
    True
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax

__all__ = ["MARGIN", "MEASURE_ENV", "MIN_MACS", "Choice", "cached", "choose", "clear", "enabled", "measured"]

MEASURE_ENV = "JAXOPT_SERVE_AUTO"
# Layers with fewer multiply-adds than this keep the rule: they take well under a millisecond either way, and
# measuring them would cost more compile time than it could save.
MIN_MACS = 1 << 22
# The form the rule would pick keeps the layer unless the other is faster by more than this share of its time:
# near-ties would otherwise flip from process to process.
MARGIN = 0.1
# Time each form for about this long after its warm-up call (at least 3 and at most 15 calls).
_BUDGET_S = 0.05

_lock = threading.Lock()
_choices: dict[Hashable, Choice] = {}


@dataclasses.dataclass(frozen=True)
class Choice:
    """One measured choice: the mode ``auto`` runs, and the median times it was based on.

    Attributes:
        mode: ``"dynamic"`` (the int8 product) or ``"weight_only"`` (the float product).
        int8_ms: median milliseconds of the int8 form.
        float_ms: median milliseconds of the float form.
        layer: the path of the layer it was first measured for.
        shape: the layer input's shape at that trace.
    """

    mode: str
    int8_ms: float
    float_ms: float
    layer: str
    shape: tuple[int, ...]


def enabled() -> bool:
    """Whether ``auto`` measures (``JAXOPT_SERVE_AUTO`` unset or ``measure``) or keeps its rules (``rules``)."""
    value = os.environ.get(MEASURE_ENV, "measure").strip().lower() or "measure"
    if value not in ("measure", "rules"):
        raise ValueError(f"{MEASURE_ENV} must be 'measure' or 'rules', got {os.environ[MEASURE_ENV]!r}")
    return value == "measure"


def _median_ms(calls: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """Median milliseconds of each call, timed in alternating rounds after one warm-up call each."""
    first = {}
    for name, call in calls.items():
        start = time.perf_counter()
        jax.block_until_ready(call())
        first[name] = time.perf_counter() - start
    rounds = int(min(15, max(3, _BUDGET_S / max(max(first.values()), 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    for i in range(rounds):
        for name in order[i % 2 :] + order[: i % 2]:  # alternate which form goes first
            start = time.perf_counter()
            jax.block_until_ready(calls[name]())
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def choose(
    key: Hashable,
    layer: str,
    build: Callable[[str], Callable[..., Any]],
    args: Sequence[Any],
    prefer: str = "dynamic",
) -> Choice:
    """The faster of ``build("dynamic")`` and ``build("weight_only")`` on ``args``, measured once per ``key``.

    Args:
        key: the layer's signature; a later call with an equal key returns the stored choice.
        layer: the layer's path (kept in the choice for reports).
        build: a mode -> a function of ``args`` computing the layer in that mode.
        args: concrete example arguments (only their shapes and dtypes matter for the time).
        prefer: the mode kept unless the other is more than ``MARGIN`` faster (the rule's choice).
    """
    with _lock:
        if key in _choices:
            return _choices[key]
        shape = tuple(getattr(args[0], "shape", ()))
        with jax.ensure_compile_time_eval():  # (called while tracing a model: put them there now, not staged)
            args = jax.device_put(tuple(args))  # on the device once: the timed calls copy nothing
        compiled = {mode: jax.jit(build(mode)).lower(*args).compile() for mode in ("dynamic", "weight_only")}
        ms = _median_ms({mode: (lambda f=f: f(*args)) for mode, f in compiled.items()})
        other = "weight_only" if prefer == "dynamic" else "dynamic"
        mode = other if ms[other] < (1 - MARGIN) * ms[prefer] else prefer
        choice = Choice(mode, ms["dynamic"], ms["weight_only"], layer, shape)
        _choices[key] = choice
        return choice


def cached(key: Hashable) -> Choice | None:
    """The stored choice for ``key``, or ``None`` if it was not measured yet."""
    with _lock:
        return _choices.get(key)


def measured() -> list[Choice]:
    """Every choice made so far in this process, in the order they were measured."""
    with _lock:
        return list(_choices.values())


def clear() -> None:
    """Forget every choice (the next trace of each layer measures again)."""
    with _lock:
        _choices.clear()
