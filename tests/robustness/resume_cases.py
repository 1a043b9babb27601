"""Tamper cases for ``infer`` 's resume: interrupt a run, damage what it left, run again, judge the outcome.

Shared by ``test_resume.py`` and ``benchmarks/robustness_report.py``
(``infer_tamper_cases_undetected``). Every case interrupts a run of a small
MLP over a 200-row input (chunks of 16) after a few chunks, changes one thing
(the input file, the partial output, the state file, the chunk records), and
runs the same job again. The outcome is ``"refused"`` (a ``ValueError`` that
names the state, partial or input file), ``"repaired"`` (finished, with the
output byte-identical to an uninterrupted run on the current input) or
``"undetected"`` (anything else: a wrong output, a traceback of another kind).
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxopt_serve.engine import InferenceEngine
from jaxopt_serve.models import MLPConfig
from jaxopt_serve.serve import run_batch_inference

MLP = MLPConfig(features=(16,))
ROWS, CHUNK, CRASH_AFTER = 200, 16, 6


class Crash(Exception):
    """Stands for a killed process."""


@functools.cache
def engine() -> InferenceEngine:
    from nonfinite_cases import random_variables

    return InferenceEngine(MLP, random_variables(MLP, 4), max_batch=CHUNK)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _state(out: Path) -> Path:
    return out.with_name(out.name + ".state.json")


def _edit_state(out: Path, **fields: Any) -> None:
    state = json.loads(_state(out).read_text())
    for key, value in fields.items():
        if key == "chunk_size":
            state["job"]["chunk_size"] = value
        else:
            state[key] = value
    _state(out).write_text(json.dumps(state))


def _partial_leaf(out: Path) -> Path:
    partial = out.with_name(out.name + ".partial")
    return partial / "0.npy" if partial.is_dir() else partial


def _truncate(path: Path, fraction: float) -> None:  # a fraction > 1 extends the file with zeros
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * fraction))


def _change_input(inp: Path, out: Path) -> None:
    x = np.load(inp)
    x[CHUNK * 2 + 3] += 1.0  # a row of a committed chunk; same path, shape and dtype
    np.save(inp, x)


# name -> (tamper(input path, output path), outcomes that count as detected)
CASES: dict[str, tuple[Callable[[Path, Path], None], tuple[str, ...]]] = {
    "input_changed_same_shape": (_change_input, ("refused",)),
    "input_changed_after_committed_chunks": (
        lambda inp, out: np.save(
            inp, np.concatenate([np.load(inp)[: CHUNK * CRASH_AFTER], np.load(inp)[CHUNK * CRASH_AFTER :] * 2])
        ),
        ("repaired",),
    ),
    "input_reshaped": (lambda inp, out: np.save(inp, np.load(inp)[:-1]), ("refused",)),
    "partial_truncated_to_10_percent": (lambda inp, out: _truncate(_partial_leaf(out), 0.1), ("repaired",)),
    "partial_truncated_to_header": (lambda inp, out: _truncate(_partial_leaf(out), 0.02), ("repaired",)),
    "partial_extended": (lambda inp, out: _truncate(_partial_leaf(out), 1.5), ("repaired",)),
    "partial_byte_flipped": (
        lambda inp, out: _flip(_partial_leaf(out), _partial_leaf(out).stat().st_size // 10),
        ("repaired",),
    ),
    "partial_header_garbage": (lambda inp, out: _flip(_partial_leaf(out), 0), ("repaired",)),
    "partial_deleted": (lambda inp, out: _remove(out.with_name(out.name + ".partial")), ("repaired",)),
    "state_done_huge": (lambda inp, out: _edit_state(out, done=1_000_000), ("refused",)),
    "state_done_beyond_records": (lambda inp, out: _edit_state(out, done=CRASH_AFTER + 3), ("repaired",)),
    "state_done_smaller": (lambda inp, out: _edit_state(out, done=2), ("repaired",)),
    "state_done_negative": (lambda inp, out: _edit_state(out, done=-1), ("refused",)),
    "state_done_string": (lambda inp, out: _edit_state(out, done="6"), ("refused",)),
    "state_chunk_size_edited": (lambda inp, out: _edit_state(out, chunk_size=8), ("refused",)),
    "state_empty": (lambda inp, out: _state(out).write_text(""), ("refused",)),
    "state_not_json": (lambda inp, out: _state(out).write_text("{done: 3"), ("refused",)),
    "state_json_list": (lambda inp, out: _state(out).write_text("[1, 2]"), ("refused",)),
    "state_binary": (lambda inp, out: _state(out).write_bytes(b"\xff\xfe\x00garbage"), ("refused",)),
    "state_is_directory": (lambda inp, out: (_state(out).unlink(), _state(out).mkdir()), ("refused",)),
    "state_leaves_edited": (
        lambda inp, out: _edit_state(out, leaves=[{"shape": [3], "dtype": "float32"}]),
        ("repaired", "refused"),
    ),
    "records_deleted": (lambda inp, out: out.with_name(out.name + ".state.chunks").unlink(), ("repaired",)),
    "records_truncated": (lambda inp, out: _truncate(out.with_name(out.name + ".state.chunks"), 0.5), ("repaired",)),
    "records_output_digest_flipped": (
        lambda inp, out: _flip(out.with_name(out.name + ".state.chunks"), 16 + 32 * 3),
        ("repaired",),
    ),
    "records_input_digest_flipped": (
        lambda inp, out: _flip(out.with_name(out.name + ".state.chunks"), 32 * 2),
        ("refused",),
    ),
    "artifact_changed": (lambda inp, out: _flip(inp.parent / "model.jxs", 100), ("refused",)),
}


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def run_case(name: str, directory: Path, *, npz: bool = False) -> tuple[str, str]:
    """``(outcome, message)`` of tamper case ``name`` run in ``directory`` (see the module docstring)."""
    tamper, _ = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    inp, out = directory / "in.npy", directory / ("out.npz" if npz else "out.npy")
    model = directory / "model.jxs"
    np.save(inp, rng.normal(size=(ROWS, 8, 8, 1)).astype(np.float32))
    model.write_bytes(b"stands for the model artifact: only its checksum is read" * 4)
    predict = engine() if not npz else (lambda x: {"logits": engine()(x), "twice": 2 * engine()(x)})

    def run(path: Path, on_chunk: Any = None) -> None:
        run_batch_inference(
            predict, inp, path, artifact_path=model, chunk_size=CHUNK, progress=False, on_chunk=on_chunk
        )

    def crash(done: int, total: int) -> None:
        if done == CRASH_AFTER:
            raise Crash

    try:
        run(out, crash)
    except Crash:
        pass
    try:
        tamper(inp, out)
    except FileNotFoundError:  # a file this implementation does not write: nothing to damage
        pass
    try:
        run(out)
    except ValueError as err:
        message = str(err)
        named = any(p.name in message for p in (inp, out, model))  # out.npy also in its .partial and .state.json
        return ("refused" if named else "undetected"), message
    except Exception as err:  # noqa: BLE001 - any other exception is a traceback for the user
        return "undetected", f"{type(err).__name__}: {err}"
    reference = directory / ("reference.npz" if npz else "reference.npy")
    run(reference)
    same = out.read_bytes() == reference.read_bytes()
    return ("repaired" if same else "undetected"), "" if same else "output differs from an uninterrupted run"


def infer_tamper_cases_undetected(*, failures: list[str] | None = None) -> int:
    """How many tamper cases (``CASES``, with ``.npy`` and ``.npz`` outputs) end neither refused nor repaired."""
    engine()
    undetected = 0
    for npz in (False, True):
        for name, (_, _detected) in CASES.items():
            with tempfile.TemporaryDirectory() as tmp:
                outcome, message = run_case(name, Path(tmp), npz=npz)
            if outcome == "undetected":
                undetected += 1
                if failures is not None:
                    failures.append(f"{name} ({'npz' if npz else 'npy'}): {outcome}: {message}")
    return undetected
