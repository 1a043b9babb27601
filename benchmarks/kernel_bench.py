"""Kernel benchmark: jaxopt_serve's native int8 / int4 CPU matmuls against XLA and PyTorch, in one run.

    cd /work/main && .venv/bin/python benchmarks/kernel_bench.py --json results/kernel.json

(``--size 1024 --rounds 3`` for a quick run.) Measures the median ms per call of one ``size x size`` layer,
``y = x @ W`` with ``W ~ 0.02 * N(0, 1)`` (fixed seed), and of a 3-layer MLP of that width,
``relu(relu(x @ W1) @ W2) @ W3``, at each batch of ``--batches``, for these variants on the same weights:

  xla_f32             ``jax.jit(x @ w)``, AOT-compiled, weights as device arrays
  xla_w8a8            XLA's own int8 path: per-channel symmetric int8 W (absmax over the input axis / 127),
                      dynamic per-row int8 x (absmax / 127, round half-even, clip +-127),
                      ``lax.dot_general(..., preferred_element_type=int32)``, then ``acc * sx * sw``
  ours_w8a8_sym8      ``jaxopt_serve.native.w8a8_matmul`` on ``native.pack_int8`` weights (same int8 weights),
                      activations as XLA's row above (symmetric, 255 steps): the same int32 sums
  ours_w8a8           the same weights, activations per row over ``[min, max]`` in 127 steps, codes 0..127
                      (``symmetric=False, act_bits=7``): the activation range of torch's ``quantize_dynamic`` on
                      x86 (``reduce_range``), which the AVX2 kernel multiplies with ``vpmaddubsw`` and no sign
                      fix-up. The ``speedup_w8a8_*`` and ``speedup_vs_torch_*`` checks use this row.
  ours_int4           ``jaxopt_serve.native.int4_matmul``: weight-only int4, asymmetric, groups of 32 along the
                      input axis per output column
  torch_f32           ``torch.nn.Linear`` (no bias), ``inference_mode``, one thread per usable core
  torch_dynamic_int8  ``torch.ao.quantization.quantize_dynamic(model, {Linear}, dtype=torch.qint8)``

All variants of one (model, batch) are timed in alternating rounds in this process (the starting variant rotates
each round; every round starts after a 50 ms pause and one untimed call, so one library's spinning idle threads
and cache contents do not land on the next variant's clock), so machine drift hits them alike; speed-ups are
baseline median / ours median. The ``ours_*`` rows are null, with a note, when ``jaxopt_serve.native`` is missing
or ``native.available()`` is False; the torch rows likewise when torch is not importable.
``kernel_int32_mismatches`` counts int32 entries where ``native.int8_matmul`` differs from ``lax.dot_general`` over
ragged shapes. ``--json PATH`` writes (atomically)
``{"device", "cpu", "native", "torch", "config", "checks": [{"name", "value", "target", "op", "passed"}], "tables"}``;
a skipped check has value and passed null, ``"skipped": true`` and a note. ``cpu.other_processes_cpu_share`` (the
share of all cores' time that other processes used while timing) flags runs that shared the CPU: on a 2-core
machine a busy neighbour stalls multi-threaded calls (torch's OpenMP barriers most of all) by whole scheduler
time slices, so trust only runs where it is near 0.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import Report, _print_rows, add_allocator_flag, apply_allocator, device_description  # noqa: E402

from jaxopt_serve.fileio import atomic_write  # noqa: E402

Timed = Callable[[], Any]
Matmul = Callable[..., jax.Array]
Layers = list[tuple[Any, ...]]

QMAX = 127.0
GROUP = 32
DEPTH = 3
DIMS = (((1,), (0,)), ((), ()))
ROUND_MS = 100.0  # calls per round are chosen so one round of a variant lasts about this long
MAX_CALLS = 200
SETTLE_S = 0.05  # pause before each timed round: other runtimes' spinning threads go idle (see interleaved_times)
CPU_FLAGS = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8")
JAX_VARIANTS = ("xla_f32", "xla_w8a8", "ours_w8a8_sym8", "ours_w8a8", "ours_int4")
TORCH_VARIANTS = ("torch_f32", "torch_dynamic_int8")
MISMATCH_SHAPES = {"M": (1, 3, 17), "K": (1, 31, 33, 100), "N": (1, 7, 33)}


# ---------------------------------------------------------------------------- environment


def cpu_info() -> dict[str, Any]:
    """CPU model name, usable cores and the int8-relevant ISA flags, from /proc/cpuinfo."""
    path = Path("/proc/cpuinfo")
    lines = path.read_text().splitlines() if path.exists() else []

    def field(key: str) -> str:
        return next((ln.split(":", 1)[1].strip() for ln in lines if ln.split(":", 1)[0].strip() == key), "")

    flags = set(field("flags").split())
    return {
        "model_name": field("model name") or None,
        "usable_cores": usable_cores(),
        "flags": {f: f in flags for f in CPU_FLAGS},
    }


def cpu_busy_seconds() -> tuple[float, float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process, wall seconds), or None off Linux."""
    path = Path("/proc/stat")
    if not path.exists():
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in path.read_text().split()[1:9])
    own = os.times()
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return busy, own.user + own.system, time.perf_counter()


def other_cpu_share(start: tuple[float, float, float] | None) -> float | None:
    """Share of the usable cores' time since ``start`` that other processes used (0 on a quiet machine)."""
    end = cpu_busy_seconds()
    if start is None or end is None:
        return None
    machine, own, wall = (e - s for e, s in zip(end, start))
    return round(max(0.0, machine - own) / (wall * (os.cpu_count() or 1)), 4)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_native() -> tuple[ModuleType | None, dict[str, Any]]:
    """``jaxopt_serve.native`` if it imports and says it is available here, and what to record about it."""
    try:
        from jaxopt_serve import native
    except Exception as e:  # missing, or half-written while its author works on it
        return None, {"available": False, "kernel_isa": None, "note": f"jaxopt_serve.native not importable: {e!r}"}
    try:
        ok, isa = bool(native.available()), native.kernel_isa()
    except Exception as e:
        return None, {"available": False, "kernel_isa": None, "note": f"jaxopt_serve.native failed: {e!r}"}
    note = "" if ok else "native.available() is False: library not built or not loadable on this CPU"
    return (native if ok else None), {"available": ok, "kernel_isa": isa, "note": note}


def load_torch() -> tuple[ModuleType | None, dict[str, Any]]:
    """torch with one intra-op thread per usable core, or None and a note."""
    try:
        import torch
    except ImportError as e:
        return None, {"version": None, "threads": None, "note": f"torch not importable: {e!r}"}
    torch.set_num_threads(usable_cores())
    return torch, {"version": torch.__version__, "threads": torch.get_num_threads(), "note": ""}


# ---------------------------------------------------------------------------- weights and quantization


def make_weights(size: int, seed: int) -> list[np.ndarray]:
    """``DEPTH`` f32 (size, size) weights, 0.02 * N(0, 1); the single layer uses the first."""
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(size, size)) * 0.02).astype(np.float32) for _ in range(DEPTH)]


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric int8: ``(wq int8 (K, N), scale f32 (N,))``."""
    scale = np.max(np.abs(w), axis=0) / QMAX
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.round(w / scale), -QMAX, QMAX).astype(np.int8), scale


def quantize_int4(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric int4 in groups of ``group`` along the input axis: ``(q uint8 (K, N) in 0..15, zero uint8
    (K//group, N), scale f32 (K//group, N))``, with ``w ~ (q - zero) * scale``."""
    k, n = w.shape
    if k % group:
        raise ValueError(f"--size {k} is not a multiple of the int4 group {group}")
    g = w.reshape(k // group, group, n)
    lo, hi = np.minimum(g.min(axis=1), 0.0), np.maximum(g.max(axis=1), 0.0)
    scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(np.float32)
    zero = np.clip(np.round(-lo / scale), 0, 15)
    q = np.clip(np.round(g / scale[:, None]) + zero[:, None], 0, 15)
    return q.reshape(k, n).astype(np.uint8), zero.astype(np.uint8), scale


# ---------------------------------------------------------------------------- JAX variants


def xla_f32_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return x @ w


def xla_w8a8_matmul(x: jax.Array, wq: jax.Array, sw: jax.Array) -> jax.Array:
    """Dynamic per-row int8 activations x per-channel int8 weights through XLA's int32 dot_general."""
    absmax = jnp.max(jnp.abs(x), axis=1, keepdims=True)
    sx = jnp.where(absmax > 0, absmax / QMAX, 1.0)
    xq = jnp.clip(jnp.round(x / sx), -QMAX, QMAX).astype(jnp.int8)
    acc = jax.lax.dot_general(xq, wq, DIMS, preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * sx * sw


def native_matmuls(native: ModuleType) -> dict[str, Matmul]:
    return {
        "ours_w8a8_sym8": lambda x, packed, sw: native.w8a8_matmul(x, packed, sw),
        "ours_w8a8": lambda x, packed, sw: native.w8a8_matmul(x, packed, sw, symmetric=False, act_bits=7),
        "ours_int4": lambda x, p4: native.int4_matmul(x, p4),
    }


def jax_variants(
    weights: list[np.ndarray], native: ModuleType | None, native_note: str
) -> dict[str, tuple[Matmul, Layers] | str]:
    """``{variant: (matmul, per-layer args)}`` on the given weights, or ``{variant: why skipped}``."""
    int8 = [quantize_int8(w) for w in weights]
    out: dict[str, tuple[Matmul, Layers] | str] = {
        "xla_f32": (xla_f32_matmul, [(jnp.asarray(w),) for w in weights]),
        "xla_w8a8": (xla_w8a8_matmul, [(jnp.asarray(q), jnp.asarray(s)) for q, s in int8]),
    }
    if native is None:
        return out | {name: native_note for name in ("ours_w8a8_sym8", "ours_w8a8", "ours_int4")}
    packers = {
        "ours_w8a8_sym8": lambda w, q8: (native.pack_int8(q8[0]), jnp.asarray(q8[1])),
        "ours_w8a8": lambda w, q8: (native.pack_int8(q8[0]), jnp.asarray(q8[1])),
        "ours_int4": lambda w, q8: (native.pack_int4(*quantize_int4(w, GROUP), GROUP),),
    }
    for name, matmul in native_matmuls(native).items():
        try:
            out[name] = (matmul, [packers[name](w, q8) for w, q8 in zip(weights, int8)])
        except Exception as e:  # the kernels are being written alongside this script: report, do not stop
            out[name] = f"packing failed: {e!r}"
    return out


def chain(matmul: Matmul) -> Callable[[jax.Array, Layers], jax.Array]:
    """``x -> matmul(x, *layer_0) -> relu -> ... -> matmul(x, *layer_last)``."""

    def run(x: jax.Array, layers: Layers) -> jax.Array:
        for i, args in enumerate(layers):
            x = matmul(x, *args)
            if i < len(layers) - 1:
                x = jax.nn.relu(x)
        return x

    return run


def compiled_call(matmul: Matmul, layers: Layers, x: jax.Array) -> Timed:
    """AOT-compiled ``chain(matmul)(x, layers)`` as a no-argument call."""
    run = chain(matmul)
    try:
        exe = jax.jit(run).lower(x, layers).compile()
        return lambda: exe(x, layers)
    except TypeError:  # packed weights that are not pytrees of arrays: close over them instead
        exe1 = jax.jit(lambda x: run(x, layers)).lower(x).compile()
        return lambda: exe1(x)


# ---------------------------------------------------------------------------- torch variants


def torch_variants(
    torch: ModuleType | None, weights: list[np.ndarray], torch_note: str
) -> dict[str, dict[int, Any] | str]:
    """``{variant: {depth: module}}`` for depth 1 (first weight) and ``DEPTH``, or ``{variant: why skipped}``."""
    if torch is None:
        return {name: torch_note for name in TORCH_VARIANTS}
    f32 = {d: torch_mlp(torch, weights[:d]) for d in (1, DEPTH)}
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice
        warnings.simplefilter("ignore")
        int8 = {
            d: torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8) for d, m in f32.items()
        }
    return {"torch_f32": f32, "torch_dynamic_int8": int8}


def torch_mlp(torch: ModuleType, weights: list[np.ndarray]) -> Any:
    """Bias-free ``Linear`` layers with ReLU between them, holding ``weights`` (stored (K, N); torch wants (N, K))."""
    layers: list[Any] = []
    for w in weights:
        lin = torch.nn.Linear(w.shape[0], w.shape[1], bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
        layers += [lin, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1]).eval()


# ---------------------------------------------------------------------------- timing


def interleaved_times(fns: dict[str, Timed], *, rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median ms per call of each fn, measured in alternating rounds (``common.paired_times`` for N variants).

    Each variant runs enough calls per round to last about ``ROUND_MS``; the first variant of a round rotates.
    Before each round: a ``SETTLE_S`` pause, then one untimed call. Without it one library's idle threads,
    still spinning after its own round (torch's OpenMP workers, the native kernels' pool), compete for the
    2 cores with the next variant, and the first call finds the other variant's weights in the caches.
    """
    calls = {name: calls_per_round(fn, warmup) for name, fn in fns.items()}
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            time.sleep(SETTLE_S)
            jax.block_until_ready(fns[name]())
            start = time.perf_counter()
            for _ in range(calls[name]):
                jax.block_until_ready(fns[name]())
            samples[name].append((time.perf_counter() - start) * 1e3 / calls[name])
    return {name: float(np.median(s)) for name, s in samples.items()}


def calls_per_round(fn: Timed, warmup: int) -> int:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    start = time.perf_counter()
    jax.block_until_ready(fn())
    ms = (time.perf_counter() - start) * 1e3
    return max(1, min(MAX_CALLS, math.ceil(ROUND_MS / max(ms, 1e-3))))


def case_calls(
    jax_vs: dict[str, tuple[Matmul, Layers] | str],
    torch_vs: dict[str, dict[int, Any] | str],
    depth: int,
    x_np: np.ndarray,
    torch: ModuleType | None,
) -> dict[str, Timed]:
    """No-argument calls of every runnable variant on input ``x_np`` through ``depth`` layers."""
    x = jnp.asarray(x_np)
    calls: dict[str, Timed] = {}
    for name, v in jax_vs.items():
        if not isinstance(v, str):
            calls[name] = compiled_call(v[0], v[1][:depth], x)
    for name, v in torch_vs.items():
        if not isinstance(v, str):
            calls[name] = (lambda m, xt: lambda: m(xt))(v[depth], torch.from_numpy(x_np))
    return calls


def rel_error(y: Any, ref: np.ndarray) -> float:
    y = y.numpy() if hasattr(y, "numpy") else np.asarray(y)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


# ---------------------------------------------------------------------------- exactness of the int8 kernel


def int32_mismatches(native: ModuleType, seed: int) -> tuple[int, list[dict[str, Any]]]:
    """Entries where ``native.int8_matmul(xq, pack_int8(wq))`` differs from XLA's int32 ``dot_general``,
    over every (M, K, N) of ``MISMATCH_SHAPES`` with uniform and all-+-127 operands; rows for bad shapes."""
    rng = np.random.default_rng(seed + 1)
    total, entries, rows = 0, 0, []
    for (m, k, n), fill in itertools.product(itertools.product(*MISMATCH_SHAPES.values()), ("uniform", "pm127")):
        xq, wq = int8_operand(rng, (m, k), fill), int8_operand(rng, (k, n), fill)
        want = np.asarray(jax.lax.dot_general(jnp.asarray(xq), jnp.asarray(wq), DIMS, preferred_element_type=jnp.int32))
        got = np.asarray(native.int8_matmul(jnp.asarray(xq), native.pack_int8(wq)))
        bad = int(np.sum(got != want)) if got.shape == want.shape else want.size
        entries += want.size
        total += bad
        if bad or got.dtype != np.int32:
            rows.append({"M": m, "K": k, "N": n, "fill": fill, "dtype": str(got.dtype), "mismatches": bad})
    rows.append({"M": "all", "K": "", "N": "", "fill": "", "dtype": f"{entries} entries", "mismatches": total})
    return total, rows


def int8_operand(rng: np.random.Generator, shape: tuple[int, int], fill: str) -> np.ndarray:
    if fill == "pm127":
        return (rng.choice([-127, 127], size=shape)).astype(np.int8)
    return rng.integers(-127, 128, size=shape).astype(np.int8)


# ---------------------------------------------------------------------------- report


class KernelReport(Report):
    """``Report`` with skipped (null) checks, informational checks and run metadata in the JSON."""

    def __init__(self, title: str, meta: dict[str, Any]) -> None:
        super().__init__(title)
        self.meta = meta

    def ratio(
        self,
        name: str,
        base_ms: float | None,
        ours_ms: float | None,
        target: float,
        *,
        note: str = "",
        informational: bool = False,
    ) -> None:
        """Check ``base_ms / ours_ms >= target``, or record it as skipped when either time is missing."""
        if base_ms is None or ours_ms is None:
            self.checks.append(
                {
                    "name": name,
                    "value": None,
                    "target": target,
                    "op": ">=",
                    "passed": None,
                    "skipped": True,
                    "note": note or "a variant was not run",
                }
            )
        else:
            self.check(name, base_ms / ours_ms, target, ">=")
        if informational:
            self.checks[-1]["informational"] = True

    def print(self) -> None:
        print(f"\n== {self.title} on {device_description()} ==")
        print(json.dumps({k: self.meta[k] for k in ("cpu", "native", "torch")}))
        for name, rows in self.tables.items():
            print(f"\n-- {name} --")
            _print_rows(rows)
        print("\n-- acceptance checks --")
        _print_rows(
            [
                {
                    "check": c["name"] + (" (info)" if c.get("informational") else ""),
                    "value": "null" if c["value"] is None else round(c["value"], 4),
                    "target": f"{c['op']} {c['target']}",
                    "result": "SKIP" if c["passed"] is None else "PASS" if c["passed"] else "MISS",
                    "note": c.get("note", ""),
                }
                for c in self.checks
            ]
        )

    def write(self, path: str | None) -> None:
        if path:
            payload = {
                "device": device_description(),
                **self.meta,
                "settings": self.settings,
                "checks": self.checks,
                "tables": self.tables,
            }
            atomic_write(path, (json.dumps(payload, indent=2) + "\n").encode())
            print(f"wrote {path}")


def pivot(
    times: dict[tuple[str, int], float | None],
    variants: Sequence[str],
    batches: Sequence[int],
    notes: dict[str, str],
    unit: str,
) -> list[dict[str, Any]]:
    """Rows of ``variant`` x ``b<batch> <unit>`` (null where the variant did not run), with its skip note."""
    return [
        {"variant": v, **{f"b{b} {unit}": times.get((v, b)) for b in batches}, "note": notes.get(v, "")}
        for v in variants
    ]


def add_checks(
    report: KernelReport,
    ms: dict[str, dict[tuple[str, int], float | None]],
    batches: Sequence[int],
    notes: dict[str, str],
) -> None:
    layer, mlp = ms["layer"], ms["mlp"]
    for b in batches:
        report.ratio(
            f"speedup_w8a8_vs_f32_b{b}",
            layer.get(("xla_f32", b)),
            layer.get(("ours_w8a8", b)),
            4.0 if b <= 16 else 3.0,
            note=notes.get("ours_w8a8", ""),
        )
    if 1 in batches:
        report.ratio(
            "speedup_int4_weight_only_vs_f32_b1",
            layer.get(("xla_f32", 1)),
            layer.get(("ours_int4", 1)),
            4.0,
            note=notes.get("ours_int4", ""),
        )
    for b in batches:
        report.ratio(
            f"speedup_vs_torch_dynamic_int8_b{b}",
            layer.get(("torch_dynamic_int8", b)),
            layer.get(("ours_w8a8", b)),
            1.0,
            note=notes.get("ours_w8a8") or notes.get("torch_dynamic_int8", ""),
        )
    for b in batches:
        report.ratio(
            f"speedup_w8a8_vs_f32_mlp_b{b}",
            mlp.get(("xla_f32", b)),
            mlp.get(("ours_w8a8", b)),
            1.0,
            note=notes.get("ours_w8a8", ""),
            informational=True,
        )
    if 1 in batches:
        report.ratio(
            "speedup_int4_weight_only_vs_f32_mlp_b1",
            mlp.get(("xla_f32", 1)),
            mlp.get(("ours_int4", 1)),
            1.0,
            note=notes.get("ours_int4", ""),
            informational=True,
        )
    for b in batches:
        report.ratio(
            f"speedup_vs_torch_dynamic_int8_mlp_b{b}",
            mlp.get(("torch_dynamic_int8", b)),
            mlp.get(("ours_w8a8", b)),
            1.0,
            note=notes.get("ours_w8a8") or notes.get("torch_dynamic_int8", ""),
            informational=True,
        )


def mismatch_check(report: KernelReport, native: ModuleType | None, native_note: str, seed: int) -> None:
    if native is None:
        report.checks.append(
            {
                "name": "kernel_int32_mismatches",
                "value": None,
                "target": 0,
                "op": "<=",
                "passed": None,
                "skipped": True,
                "note": native_note,
            }
        )
        return
    try:
        total, rows = int32_mismatches(native, seed)
    except Exception as e:
        report.checks.append(
            {
                "name": "kernel_int32_mismatches",
                "value": None,
                "target": 0,
                "op": "<=",
                "passed": None,
                "skipped": True,
                "note": f"native.int8_matmul failed: {e!r}",
            }
        )
        return
    report.table("native.int8_matmul vs lax.dot_general int32 (shapes with mismatches, then the total)", rows)
    report.check("kernel_int32_mismatches", total, 0, "<=")


# ---------------------------------------------------------------------------- main


def run_cases(
    args: argparse.Namespace,
    report: KernelReport,
    native: ModuleType | None,
    native_note: str,
    torch: ModuleType | None,
    torch_note: str,
) -> tuple[dict[str, dict[tuple[str, int], float | None]], dict[str, str]]:
    """Time every variant on the layer and on the MLP at every batch; add the time and error tables."""
    weights = make_weights(args.size, args.seed)
    jax_vs = jax_variants(weights, native, native_note)
    torch_vs = torch_variants(torch, weights, torch_note)
    notes = {k: v for k, v in (jax_vs | torch_vs).items() if isinstance(v, str)}
    variants = [*JAX_VARIANTS, *TORCH_VARIANTS]
    rng = np.random.default_rng(args.seed + 2)
    ms: dict[str, dict[tuple[str, int], float | None]] = {"layer": {}, "mlp": {}}
    errors: dict[tuple[str, int], float | None] = {}
    for model, depth in (("layer", 1), ("mlp", DEPTH)):
        for b in args.batches:
            x_np = rng.normal(size=(b, args.size)).astype(np.float32)
            calls = case_calls(jax_vs, torch_vs, depth, x_np, torch)
            print(f"timing {model} b{b}: {', '.join(calls)}", flush=True)
            ms[model] |= {(v, b): t for v, t in interleaved_times(calls, rounds=args.rounds).items()}
            if model == "layer":
                ref = np.asarray(calls["xla_f32"]())
                errors |= {(v, b): rel_error(fn(), ref) for v, fn in calls.items()}
    size = f"{args.size}x{args.size}"
    report.table(f"single {size} layer, median ms per call", pivot(ms["layer"], variants, args.batches, notes, "ms"))
    report.table(
        f"{DEPTH}-layer MLP of {size} layers with ReLU, median ms per call",
        pivot(ms["mlp"], variants, args.batches, notes, "ms"),
    )
    report.table(
        f"single {size} layer, relative L2 error vs xla_f32", pivot(errors, variants, args.batches, notes, "rel err")
    )
    return ms, notes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="write the checks, tables and CPU/kernel info as JSON")
    parser.add_argument("--size", type=int, default=4096, help="layer width (a multiple of 32)")
    parser.add_argument(
        "--batches",
        type=lambda s: [int(b) for b in s.split(",")],
        default=[1, 16, 256],
        help="comma-separated batch sizes (default 1,16,256)",
    )
    parser.add_argument("--rounds", type=int, default=7, help="alternating timing rounds per (model, batch)")
    parser.add_argument("--seed", type=int, default=0)
    add_allocator_flag(parser)
    args = parser.parse_args(argv)
    if args.size % GROUP:
        parser.error(f"--size must be a multiple of {GROUP} (the int4 group)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    native, native_meta = load_native()
    torch, torch_meta = load_torch()
    cpu = cpu_info()
    report = KernelReport(
        "native kernel benchmark",
        {
            "cpu": cpu,
            "native": native_meta,
            "torch": torch_meta,
            "config": {
                "size": args.size,
                "batches": args.batches,
                "rounds": args.rounds,
                "seed": args.seed,
                "int4_group": GROUP,
            },
        },
    )
    apply_allocator(args, report)
    start = cpu_busy_seconds()
    with torch.inference_mode() if torch is not None else contextlib.nullcontext():
        ms, notes = run_cases(args, report, native, native_meta["note"], torch, torch_meta["note"])
    cpu["other_processes_cpu_share"] = other_cpu_share(start)
    add_checks(report, ms, args.batches, notes)
    mismatch_check(report, native, native_meta["note"], args.seed)
    report.print()
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
