"""Helpers shared by the benchmark scripts: paired timing, checks, table printing, JSON output."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxopt_serve.fileio import atomic_write
from jaxopt_serve.timing import device_description


def paired_times(
    fn_a: Callable[[], Any], fn_b: Callable[[], Any], *, rounds: int = 7, calls: int = 5, warmup: int = 2
) -> tuple[float, float]:
    """Median ms per call of ``fn_a`` and ``fn_b``, measured in alternating rounds so drift hits both."""
    for _ in range(warmup):
        jax.block_until_ready(fn_a())
        jax.block_until_ready(fn_b())
    a, b = [], []
    for _ in range(rounds):
        for fn, out in ((fn_a, a), (fn_b, b)):
            start = time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(fn())
            out.append((time.perf_counter() - start) * 1e3 / calls)
    return float(np.median(a)), float(np.median(b))


def accuracy_pct(config: Any, variables: Any, data: Any, *, mode: str = "weight_only") -> float:
    """Test accuracy in percent; quantized variables run quantized in ``mode``, float ones as they are."""
    from jaxopt_serve.quant.runtime import inference_fn
    from jaxopt_serve.train import accuracy

    return 100.0 * accuracy(inference_fn(config, variables, mode=mode), variables, data.x_test, data.y_test)


def add_allocator_flag(parser: Any) -> None:
    """``--allocator retain|default``: whether the process keeps freed host memory (``retain_host_memory``)."""
    parser.add_argument(
        "--allocator",
        choices=["retain", "default"],
        default="retain",
        help="retain: glibc keeps freed memory for reuse, as the serving commands do (default); "
        "default: glibc's own policy (large buffers mapped and unmapped on every call)",
    )


def apply_allocator(args: Any, report: Report) -> None:
    """Applies ``args.allocator`` before anything is compiled, and records it in the report's settings."""
    from jaxopt_serve.engine import retain_host_memory

    applied = args.allocator == "retain" and retain_host_memory()
    report.settings["allocator"] = "retain freed memory (glibc mallopt)" if applied else "glibc default"


class Report:
    """Acceptance checks plus free-form tables, printed and written as JSON."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.checks: list[dict[str, Any]] = []
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.settings: dict[str, Any] = {}  # process-wide conditions the figures depend on (allocator, ...)

    def check(self, name: str, value: float, target: float, op: str) -> None:
        assert op in (">=", "<=")
        passed = value >= target if op == ">=" else value <= target
        self.checks.append({"name": name, "value": float(value), "target": target, "op": op, "passed": bool(passed)})

    def table(self, name: str, rows: list[dict[str, Any]]) -> None:
        self.tables[name] = rows

    def print(self) -> None:
        print(f"\n== {self.title} on {device_description()} ==")
        for key, value in self.settings.items():
            print(f"{key}: {value}")
        for name, rows in self.tables.items():
            print(f"\n-- {name} --")
            _print_rows(rows)
        print("\n-- acceptance checks --")
        _print_rows(
            [
                {
                    "check": c["name"],
                    "value": round(c["value"], 4),
                    "target": f"{c['op']} {c['target']}",
                    "result": "PASS" if c["passed"] else "MISS",
                }
                for c in self.checks
            ]
        )

    def write(self, path: str | None) -> None:
        if path:
            payload = {
                "device": device_description(),
                "settings": self.settings,
                "checks": self.checks,
                "tables": self.tables,
            }
            atomic_write(path, (json.dumps(payload, indent=2) + "\n").encode())
            print(f"wrote {path}")


def _print_rows(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    headers = list(rows[0])
    cells = [[_fmt(r.get(h)) for h in headers] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
