"""Robustness report: run the hostile-user matrices and count what slipped through.

    python benchmarks/robustness_report.py --json results/robustness.json

Each entry of ``CHECKS`` is a function ``(work directory) -> dict of counts``;
the counts of all of them are merged into one JSON object (top-level keys,
e.g. ``artifact_cases_tracebacks``), and ``TARGETS`` states the acceptance
bound of each. The matrices themselves live in ``tests/robustness/`` (the
test suite runs the same cases one by one):

* ``artifact_cases.run_matrix``: every artifact kind (dense, quantized,
  sparse, format-2, exported, distillation checkpoint) damaged in every
  generated way; counts tracebacks, hangs and files that loaded silently.
* ``cli_cases.run_matrix``: bad values and paths for every CLI command, run
  in-process with the work stubbed out; counts tracebacks, bad values that
  reached the work, and unclear messages.
* ``nonfinite_cases.nonfinite_batch_dependence_cases``: a row (finite, NaN,
  inf) in every bucket of the float and int8 CNN and MLP among varied
  batch-mates; counts rows whose output depended on them.
* ``resume_cases.infer_tamper_cases_undetected``: ``infer`` interrupted, its
  input, partial output, state or chunk records damaged, then resumed; counts
  runs neither refused (naming the file) nor repaired byte-identical.

To add a check: ``CHECKS["name"] = function`` and its bounds in ``TARGETS``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "robustness"))

from common import Report  # noqa: E402

from jaxopt_serve.fileio import atomic_write  # noqa: E402


def artifact_matrix(workdir: Path) -> dict[str, Any]:
    import artifact_cases

    return artifact_cases.run_matrix(workdir / "artifacts")


def cli_matrix(workdir: Path) -> dict[str, Any]:
    import cli_cases

    return cli_cases.run_matrix(workdir / "cli")


def nonfinite_matrix(workdir: Path) -> dict[str, Any]:
    import nonfinite_cases

    failures: list[str] = []
    count = nonfinite_cases.nonfinite_batch_dependence_cases(failures=failures)
    return {"nonfinite_batch_dependence_cases": count, "nonfinite_failures": [{"case": f} for f in failures]}


def resume_matrix(workdir: Path) -> dict[str, Any]:
    import resume_cases

    failures: list[str] = []
    count = resume_cases.infer_tamper_cases_undetected(failures=failures)
    return {
        "infer_tamper_cases_undetected": count,
        "infer_tamper_cases_total": 2 * len(resume_cases.CASES),
        "infer_failures": [{"case": f} for f in failures],
    }


CHECKS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "artifacts": artifact_matrix,
    "cli": cli_matrix,
    "nonfinite": nonfinite_matrix,
    "resume": resume_matrix,
}

# count -> (op, bound): the acceptance criteria
TARGETS: dict[str, tuple[str, float]] = {
    "artifact_cases_tracebacks": ("<=", 0),
    "artifact_cases_hangs": ("<=", 0),
    "artifact_cases_silent_wrong": ("<=", 0),
    "artifact_cases_total": (">=", 200),
    "cli_cases_tracebacks": ("<=", 0),
    "cli_cases_total": (">=", 80),
    "cli_cases_unclear": ("<=", 0),
    "bad_values_accepted": ("<=", 0),
    "nonfinite_batch_dependence_cases": ("<=", 0),
    "infer_tamper_cases_undetected": ("<=", 0),
}


def run(names: list[str] | None = None) -> tuple[dict[str, Any], dict[str, float]]:
    """Run the checks named (default: all); ``(merged results, seconds per check)``."""
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="robustness-") as tmp:
        for name, check in CHECKS.items():
            if names and name not in names:
                continue
            start = time.perf_counter()
            results.update(check(Path(tmp) / name))
            seconds[name] = time.perf_counter() - start
    return results, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write the counts as JSON to PATH (atomically)")
    parser.add_argument("--only", nargs="+", choices=sorted(CHECKS), help="run only these checks")
    args = parser.parse_args(argv)

    results, seconds = run(args.only)
    report = Report("robustness")
    report.table("checks run", [{"check": name, "seconds": round(s, 1)} for name, s in seconds.items()])
    failures = [
        {"matrix": key.split("_")[0], **failure}
        for key, value in results.items()
        if key.endswith("_failures")
        for failure in value
    ]
    if failures:
        report.table("failures", [{k: (str(v)[:140]) for k, v in f.items()} for f in failures])
    for name, (op, bound) in TARGETS.items():
        if name in results:
            report.check(name, results[name], bound, op)
    report.print()

    counts = {k: v for k, v in results.items() if isinstance(v, int)}
    payload = {
        **counts,
        "details": {k: v for k, v in results.items() if not isinstance(v, int)},
        "checks": report.checks,
        "seconds": seconds,
    }
    if args.json:
        atomic_write(args.json, (json.dumps(payload, indent=2, default=str) + "\n").encode())
        print(f"wrote {args.json}")
    return 0 if all(c["passed"] for c in report.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
