"""The CLI bad-argument matrix: every command, given nonsense, must exit 2 with one line and no traceback.

Shared by ``test_cli_matrix.py`` and ``benchmarks/robustness_report.py``.
Cases run ``jaxopt_serve.cli.main`` in this process with the work itself
(training, loading an engine, exporting, serving, ...) replaced by a stub
that raises ``WorkStarted``: a case that reaches the work accepted its bad
value (the checks must come first), and the matrix stays fast.

``run_case`` classifies the outcome: ``"ok"`` (exit status 2, one line on
stderr that says ``error`` and names the offending value), ``"traceback"``
(an exception escaped ``main``, or ``Traceback`` was printed), ``"accepted"``
(exit 0, or the work started) or ``"unclear"`` (exit 2, but several lines, or
a message that does not name the flag or path).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class WorkStarted(Exception):
    """Raised by the stubs standing in for the commands' work."""


# (module, attribute) of every expensive step a command reaches after its checks
_WORK = [
    ("jaxopt_serve.train", "train_classifier"),
    ("jaxopt_serve.train", "accuracy"),
    ("jaxopt_serve.demo", "run_demo"),
    ("jaxopt_serve.quant", "quantize"),
    ("jaxopt_serve.prune.pipeline", "unstructured"),
    ("jaxopt_serve.prune.pipeline", "structured"),
    ("jaxopt_serve.prune.pipeline", "gradual"),
    ("jaxopt_serve.distill", "distill"),
    ("jaxopt_serve.engine", "export_model"),
    ("jaxopt_serve.engine", "InferenceEngine"),
    ("jaxopt_serve.serve", "InferenceServer"),
    ("jaxopt_serve.serve", "run_batch_inference"),
    ("jaxopt_serve.hf", "SentenceEncoder"),
]


@contextlib.contextmanager
def stubbed_work() -> Iterator[None]:
    """Replace every step in ``_WORK`` by a function raising ``WorkStarted`` (restored on exit)."""
    import importlib

    saved = []
    for module_name, attr in _WORK:
        module = importlib.import_module(module_name)
        saved.append((module, attr, getattr(module, attr)))

        def stub(*args: Any, _name: str = f"{module_name}.{attr}", **kwargs: Any) -> Any:
            raise WorkStarted(_name)

        setattr(module, attr, stub)
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


@dataclasses.dataclass
class Files:
    """The paths the cases refer to: good inputs and every kind of bad path."""

    root: Path
    artifact: Path  # a float MLP on the digits' input shape
    quantized: Path  # int8, not calibrated
    npy: Path
    text: Path
    directory: Path
    fifo: Path
    dev_zero: Path
    plain_file: Path  # a regular file, used as a "directory" in output paths
    garbage: Path
    empty: Path
    busy_port: int


def build_files(root: str | os.PathLike[str]) -> Files:
    """Write the inputs of the matrix under ``root``."""
    import jax
    import numpy as np

    from jaxopt_serve.artifact import Artifact, save_artifact
    from jaxopt_serve.models import MLPConfig, init_variables
    from jaxopt_serve.quant import QuantSpec, default_rules, quantize, quantized_artifact

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    config = MLPConfig(features=(8,), num_classes=10)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda s: rng.normal(size=s.shape).astype(s.dtype), jax.eval_shape(lambda: init_variables(config, 0))
    )
    save_artifact(root / "float.jxs", Artifact(config, variables, (8, 8, 1)))
    qvars = quantize(variables, default_rules(QuantSpec(qtype="int8"))).variables
    save_artifact(root / "int8.jxs", quantized_artifact(config, qvars, (8, 8, 1)))
    np.save(root / "x.npy", np.zeros((4, 8, 8, 1), np.float32))
    (root / "lines.txt").write_text("a sentence\n")
    (root / "dir").mkdir(exist_ok=True)
    fifo = root / "pipe"
    if not fifo.exists():
        os.mkfifo(fifo)
    zero = root / "zero.jxs"
    if not zero.is_symlink():
        zero.symlink_to("/dev/zero")
    (root / "plain").write_text("a file, not a directory\n")
    (root / "garbage.jxs").write_bytes(b"\x00garbage" * 50)
    (root / "empty.jxs").write_bytes(b"")
    return Files(
        root,
        root / "float.jxs",
        root / "int8.jxs",
        root / "x.npy",
        root / "lines.txt",
        root / "dir",
        fifo,
        zero,
        root / "plain",
        root / "garbage.jxs",
        root / "empty.jxs",
        busy_port=0,
    )


@contextlib.contextmanager
def busy_port() -> Iterator[int]:
    """A port that a listening socket of this process holds."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class Case:
    """``argv(files) -> list[str]``; ``mention(files)``: a text the error line must contain (a flag or a path)."""

    command: str
    name: str
    argv: Callable[[Files], list[str]]
    mention: Callable[[Files], str]


def _case(command: str, name: str, argv: Callable[[Files], list[str]], mention: str | Callable[[Files], str]) -> Case:
    return Case(command, name, argv, mention if callable(mention) else (lambda f, m=mention: m))


def _o(f: Files) -> str:
    return str(f.root / "out" / "model.jxs")


def _cases() -> list[Case]:
    c = _case
    a = lambda f: str(f.artifact)  # noqa: E731
    train = [lambda f: ["train", "--no-progress", "-o", _o(f)]][0]
    out: list[Case] = [
        c("none", "no-command", lambda f: [], "COMMAND"),
        c("none", "unknown-command", lambda f: ["frobnicate"], "frobnicate"),
        # train
        c("train", "steps-0", lambda f: [*train(f), "--steps", "0"], "--steps"),
        c("train", "steps-negative", lambda f: [*train(f), "--steps", "-3"], "--steps"),
        c("train", "steps-not-a-number", lambda f: [*train(f), "--steps", "abc"], "--steps"),
        c("train", "batch-size-0", lambda f: [*train(f), "--batch-size", "0"], "--batch-size"),
        c("train", "learning-rate-nan", lambda f: [*train(f), "--learning-rate", "nan"], "--learning-rate"),
        c("train", "learning-rate-inf", lambda f: [*train(f), "--learning-rate", "inf"], "--learning-rate"),
        c("train", "learning-rate-0", lambda f: [*train(f), "--learning-rate", "0"], "--learning-rate"),
        c("train", "learning-rate-negative", lambda f: [*train(f), "--learning-rate", "-0.1"], "--learning-rate"),
        c("train", "output-a-directory", lambda f: ["train", "-o", str(f.directory)], "-o"),
        c("train", "output-under-a-file", lambda f: ["train", "-o", str(f.plain_file / "m.jxs")], "-o"),
        c("train", "model-unknown", lambda f: [*train(f), "--model", "resnet"], "--model"),
        c("train", "output-missing", lambda f: ["train"], "--output"),
        c("train", "seed-not-an-int", lambda f: [*train(f), "--seed", "x"], "--seed"),
        # eval
        c("eval", "missing-file", lambda f: ["eval", str(f.root / "none.jxs")], lambda f: str(f.root / "none.jxs")),
        c("eval", "a-directory", lambda f: ["eval", str(f.directory)], lambda f: str(f.directory)),
        c("eval", "a-fifo", lambda f: ["eval", str(f.fifo)], lambda f: str(f.fifo)),
        c("eval", "symlink-to-dev-zero", lambda f: ["eval", str(f.dev_zero)], lambda f: str(f.dev_zero)),
        c("eval", "garbage-file", lambda f: ["eval", str(f.garbage)], lambda f: str(f.garbage)),
        c("eval", "empty-file", lambda f: ["eval", str(f.empty)], lambda f: str(f.empty)),
        c("eval", "a-npy", lambda f: ["eval", str(f.npy)], lambda f: str(f.npy)),
        c(
            "eval",
            "static-on-uncalibrated-int8",
            lambda f: ["eval", str(f.quantized), "--mode", "static"],
            "--mode static",
        ),
        c("eval", "static-on-float", lambda f: ["eval", a(f), "--mode", "static"], "--mode static"),
        c("eval", "mode-unknown", lambda f: ["eval", a(f), "--mode", "fast"], "--mode"),
        # demo
        c("demo", "steps-0", lambda f: ["demo", "--steps", "0"], "--steps"),
        c("demo", "json-a-directory", lambda f: ["demo", "--json", str(f.directory)], "--json"),
        c("demo", "json-under-a-file", lambda f: ["demo", "--json", str(f.plain_file / "r.json")], "--json"),
        c("demo", "out-dir-a-file", lambda f: ["demo", "--out-dir", str(f.plain_file)], "--out-dir"),
        c("demo", "out-dir-under-a-file", lambda f: ["demo", "--out-dir", str(f.plain_file / "d")], "--out-dir"),
        # quantize
        c(
            "quantize",
            "input-a-directory",
            lambda f: ["quantize", str(f.directory), "-o", _o(f)],
            lambda f: str(f.directory),
        ),
        c("quantize", "input-missing", lambda f: ["quantize", str(f.root / "no.jxs"), "-o", _o(f)], "no.jxs"),
        c("quantize", "input-a-fifo", lambda f: ["quantize", str(f.fifo), "-o", _o(f)], lambda f: str(f.fifo)),
        c("quantize", "output-a-directory", lambda f: ["quantize", a(f), "-o", str(f.directory)], "-o"),
        c("quantize", "output-under-a-file", lambda f: ["quantize", a(f), "-o", str(f.plain_file / "q.jxs")], "-o"),
        c("quantize", "bits-3", lambda f: ["quantize", a(f), "--bits", "3", "-o", _o(f)], "--bits"),
        c("quantize", "group-size-0", lambda f: ["quantize", a(f), "--group-size", "0", "-o", _o(f)], "--group-size"),
        c(
            "quantize",
            "a-quantized-artifact",
            lambda f: ["quantize", str(f.quantized), "-o", _o(f)],
            lambda f: str(f.quantized),
        ),
        c(
            "quantize",
            "granularity-unknown",
            lambda f: ["quantize", a(f), "--granularity", "row", "-o", _o(f)],
            "--granularity",
        ),
        # prune
        c("prune", "sparsity-1", lambda f: ["prune", a(f), "--sparsity", "1", "-o", _o(f)], "--sparsity"),
        c("prune", "sparsity-nan", lambda f: ["prune", a(f), "--sparsity", "nan", "-o", _o(f)], "--sparsity"),
        c("prune", "sparsity-negative", lambda f: ["prune", a(f), "--sparsity", "-0.1", "-o", _o(f)], "--sparsity"),
        c(
            "prune",
            "finetune-steps-negative",
            lambda f: ["prune", a(f), "--finetune-steps", "-1", "-o", _o(f)],
            "--finetune-steps",
        ),
        c("prune", "nm-not-a-pattern", lambda f: ["prune", a(f), "--method", "nm", "--nm", "two", "-o", _o(f)], "--nm"),
        c("prune", "gradual-without-finetuning", lambda f: ["prune", a(f), "--gradual", "-o", _o(f)], "--gradual"),
        c("prune", "method-unknown", lambda f: ["prune", a(f), "--method", "lottery", "-o", _o(f)], "--method"),
        c("prune", "output-a-directory", lambda f: ["prune", a(f), "-o", str(f.directory)], "-o"),
        c("prune", "input-a-directory", lambda f: ["prune", str(f.directory), "-o", _o(f)], lambda f: str(f.directory)),
        c(
            "prune",
            "input-symlink-to-dev-zero",
            lambda f: ["prune", str(f.dev_zero), "-o", _o(f)],
            lambda f: str(f.dev_zero),
        ),
        # distill
        *[
            c(
                "distill",
                name,
                lambda f, extra=extra: [
                    "distill",
                    a(f),
                    "--student-config",
                    "{}",
                    "--no-progress",
                    "-o",
                    _o(f),
                    *extra,
                ],
                flag,
            )
            for name, extra, flag in [
                ("learning-rate-nan", ["--learning-rate", "nan"], "--learning-rate"),
                ("learning-rate-0", ["--learning-rate", "0"], "--learning-rate"),
                ("temperature-0", ["--temperature", "0"], "--temperature"),
                ("temperature-nan", ["--temperature", "nan"], "--temperature"),
                ("temperature-inf", ["--temperature", "inf"], "--temperature"),
                ("alpha-1.5", ["--alpha", "1.5"], "--alpha"),
                ("alpha-nan", ["--alpha", "nan"], "--alpha"),
                ("hidden-weight-negative", ["--hidden-weight", "-1"], "--hidden-weight"),
                ("val-fraction-1", ["--val-fraction", "1"], "--val-fraction"),
                ("val-fraction-negative", ["--val-fraction", "-0.5"], "--val-fraction"),
                ("steps-0", ["--steps", "0"], "--steps"),
                ("patience-0", ["--patience", "0"], "--patience"),
                ("teacher-mode-unknown", ["--teacher-mode", "later"], "--teacher-mode"),
            ]
        ],
        c(
            "distill",
            "student-config-not-json",
            lambda f: ["distill", a(f), "--student-config", "{oops", "-o", _o(f)],
            "--student-config",
        ),
        c(
            "distill",
            "student-config-a-list",
            lambda f: ["distill", a(f), "--student-config", "[1]", "-o", _o(f)],
            "--student-config",
        ),
        c(
            "distill",
            "student-config-file-missing",
            lambda f: ["distill", a(f), "--student-config", f"@{f.root / 'none.json'}", "-o", _o(f)],
            "none.json",
        ),
        c(
            "distill",
            "student-config-file-a-directory",
            lambda f: ["distill", a(f), "--student-config", f"@{f.directory}", "-o", _o(f)],
            lambda f: str(f.directory),
        ),
        c(
            "distill",
            "checkpoint-a-directory",
            lambda f: ["distill", a(f), "--student-config", "{}", "--checkpoint", str(f.directory), "-o", _o(f)],
            "--checkpoint",
        ),
        c(
            "distill",
            "output-a-directory",
            lambda f: ["distill", a(f), "--student-config", "{}", "-o", str(f.directory)],
            "-o",
        ),
        c(
            "distill",
            "teacher-a-directory",
            lambda f: ["distill", str(f.directory), "--student-config", "{}", "-o", _o(f)],
            lambda f: str(f.directory),
        ),
        c(
            "distill",
            "teacher-garbage",
            lambda f: ["distill", str(f.garbage), "--student-config", "{}", "-o", _o(f)],
            lambda f: str(f.garbage),
        ),
        # export
        c("export", "platform-unknown", lambda f: ["export", a(f), "--platform", "foo", "-o", _o(f)], "--platform"),
        c("export", "platform-empty", lambda f: ["export", a(f), "--platform", "", "-o", _o(f)], "--platform"),
        c("export", "output-a-directory", lambda f: ["export", a(f), "-o", str(f.directory)], "-o"),
        c("export", "output-under-a-file", lambda f: ["export", a(f), "-o", str(f.plain_file / "m.jxe")], "-o"),
        c(
            "export",
            "input-a-directory",
            lambda f: ["export", str(f.directory), "-o", _o(f)],
            lambda f: str(f.directory),
        ),
        c("export", "input-missing", lambda f: ["export", str(f.root / "no.jxs"), "-o", _o(f)], "no.jxs"),
        c("export", "input-a-fifo", lambda f: ["export", str(f.fifo), "-o", _o(f)], lambda f: str(f.fifo)),
        c(
            "export",
            "quant-mode-unknown",
            lambda f: ["export", a(f), "--quant-mode", "int3", "-o", _o(f)],
            "--quant-mode",
        ),
        # serve
        *[
            c("serve", name, lambda f, extra=extra: ["serve", a(f), *extra], flag)
            for name, extra, flag in [
                ("port-99999", ["--port", "99999"], "--port"),
                ("port-negative", ["--port", "-1"], "--port"),
                ("port-not-a-number", ["--port", "http"], "--port"),
                ("timeout-0", ["--timeout", "0"], "--timeout"),
                ("timeout-negative", ["--timeout", "-1"], "--timeout"),
                ("timeout-nan", ["--timeout", "nan"], "--timeout"),
                ("max-body-mb-0", ["--max-body-mb", "0"], "--max-body-mb"),
                ("max-body-mb-negative", ["--max-body-mb", "-5"], "--max-body-mb"),
                ("max-body-mb-inf", ["--max-body-mb", "inf"], "--max-body-mb"),
                ("max-wait-ms-negative", ["--max-wait-ms", "-1"], "--max-wait-ms"),
                ("max-wait-ms-nan", ["--max-wait-ms", "nan"], "--max-wait-ms"),
                ("max-batch-0", ["--max-batch", "0"], "--max-batch"),
                ("max-queue-0", ["--max-queue", "0"], "--max-queue"),
                ("host-unresolvable", ["--host", "no-such-host.invalid", "--port", "0"], "no-such-host.invalid"),
                ("host-not-on-this-machine", ["--host", "203.0.113.7", "--port", "0"], "203.0.113.7"),
            ]
        ],
        c("serve", "port-in-use", lambda f: ["serve", a(f), "--port", str(f.busy_port)], lambda f: str(f.busy_port)),
        c("serve", "input-a-directory", lambda f: ["serve", str(f.directory)], lambda f: str(f.directory)),
        c("serve", "input-missing", lambda f: ["serve", str(f.root / "no.jxs")], "no.jxs"),
        c("serve", "input-symlink-to-dev-zero", lambda f: ["serve", str(f.dev_zero)], lambda f: str(f.dev_zero)),
        # infer
        c(
            "infer",
            "chunk-size-0",
            lambda f: ["infer", a(f), "--input", str(f.npy), "--output", str(f.root / "o.npy"), "--chunk-size", "0"],
            "--chunk-size",
        ),
        c(
            "infer",
            "artifact-a-directory",
            lambda f: ["infer", str(f.directory), "--input", str(f.npy), "--output", str(f.root / "o.npy")],
            lambda f: str(f.directory),
        ),
        c(
            "infer",
            "input-missing",
            lambda f: ["infer", a(f), "--input", str(f.root / "no.npy"), "--output", str(f.root / "o.npy")],
            "no.npy",
        ),
        c(
            "infer",
            "input-a-directory",
            lambda f: ["infer", a(f), "--input", str(f.directory), "--output", str(f.root / "o.npy")],
            lambda f: f.directory.name,
        ),
        c(
            "infer",
            "output-a-directory",
            lambda f: ["infer", a(f), "--input", str(f.npy), "--output", str(f.directory)],
            lambda f: str(f.directory),
        ),
        c(
            "infer",
            "output-under-a-file",
            lambda f: ["infer", a(f), "--input", str(f.npy), "--output", str(f.plain_file / "o.npy")],
            lambda f: str(f.plain_file),
        ),
        # embed
        c(
            "embed",
            "input-a-directory",
            lambda f: ["embed", "minilm", "--input", str(f.directory), "--output", str(f.root / "e.npy")],
            lambda f: str(f.directory),
        ),
        c(
            "embed",
            "input-missing",
            lambda f: ["embed", "minilm", "--input", str(f.root / "no.txt"), "--output", str(f.root / "e.npy")],
            "no.txt",
        ),
        c(
            "embed",
            "model-dir-a-file",
            lambda f: ["embed", str(f.plain_file), "--input", str(f.text), "--output", str(f.root / "e.npy")],
            lambda f: str(f.plain_file),
        ),
        c(
            "embed",
            "output-a-directory",
            lambda f: ["embed", "minilm", "--input", str(f.text), "--output", str(f.directory)],
            "--output",
        ),
        c(
            "embed",
            "batch-size-0",
            lambda f: [
                "embed",
                "minilm",
                "--input",
                str(f.text),
                "--output",
                str(f.root / "e.npy"),
                "--batch-size",
                "0",
            ],
            "--batch-size",
        ),
    ]
    return out


CASES: list[Case] = _cases()


def case_ids() -> list[str]:
    return [f"{case.command}:{case.name}" for case in CASES]


def find_case(case_id: str) -> Case:
    return CASES[case_ids().index(case_id)]


@dataclasses.dataclass(frozen=True)
class Outcome:
    status: str  # "ok", "traceback", "accepted", "unclear"
    detail: str


def run_case(case: Case, files: Files) -> Outcome:
    """Run ``main(case.argv(files))`` with the work stubbed out; classify what it did."""
    import traceback

    from jaxopt_serve.cli import main

    argv = case.argv(files)
    stdout, stderr = io.StringIO(), io.StringIO()
    code: Any
    with stubbed_work(), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
        except WorkStarted as err:
            return Outcome("accepted", f"reached {err} with {argv}")
        except BaseException as err:  # noqa: BLE001 - what the matrix looks for
            return Outcome("traceback", "".join(traceback.format_exception_only(type(err), err)).strip()[:400])
    text = stderr.getvalue() + stdout.getvalue()
    if "Traceback" in text:
        return Outcome("traceback", text[-400:])
    if code == 0 or code is None:
        return Outcome("accepted", f"exit status {code!r} for {argv}")
    lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
    mention = case.mention(files)
    if code != 2 or len(lines) != 1 or "error" not in lines[0] or mention not in lines[0]:
        return Outcome("unclear", f"exit {code}, stderr {lines!r}, expected a mention of {mention!r}")
    return Outcome("ok", lines[0])


def run_matrix(root: str | os.PathLike[str]) -> dict[str, Any]:
    """Build the inputs and run every case; counts per outcome, per command, and the failures."""
    files = build_files(root)
    counts = {"cli_cases_total": 0, "cli_cases_tracebacks": 0, "bad_values_accepted": 0, "cli_cases_unclear": 0}
    key = {"traceback": "cli_cases_tracebacks", "accepted": "bad_values_accepted", "unclear": "cli_cases_unclear"}
    per_command: dict[str, int] = {}
    failures = []
    with busy_port() as port:
        files.busy_port = port
        for case in CASES:
            outcome = run_case(case, files)
            counts["cli_cases_total"] += 1
            per_command[case.command] = per_command.get(case.command, 0) + 1
            if outcome.status != "ok":
                counts[key[outcome.status]] += 1
                failures.append(
                    {"case": f"{case.command}:{case.name}", "status": outcome.status, "detail": outcome.detail}
                )
    return {**counts, "cli_cases_per_command": per_command, "cli_failures": failures}
