"""``infer`` verifies what it resumes, and checks its paths before any work.

Each tamper case (``resume_cases.CASES``) interrupts a run, changes one thing
and runs the job again: identity problems (another input, job or state) are
refused with a message naming the file; damage to the partial output or the
chunk records is repaired by computing the affected chunks again, ending
byte-identical to an uninterrupted run.
"""

import json
import os

import numpy as np
import pytest

from jaxopt_serve.cli import main
from jaxopt_serve.serve import run_batch_inference
from jaxopt_serve.serve.batch_infer import check_paths, open_input
from resume_cases import CASES, CHUNK, ROWS, engine, run_case


@pytest.mark.parametrize("name", sorted(CASES))
def test_tamper_case_is_detected(tmp_path, name):
    outcome, message = run_case(name, tmp_path)
    assert outcome in CASES[name][1], message


@pytest.mark.parametrize(
    "name",
    [
        "partial_truncated_to_10_percent",
        "input_changed_same_shape",
        "state_empty",
        "records_output_digest_flipped",
        "partial_deleted",
    ],
)
def test_tamper_case_is_detected_with_npz_outputs(tmp_path, name):
    outcome, message = run_case(name, tmp_path, npz=True)
    assert outcome in CASES[name][1], message


def test_refusals_say_what_is_wrong_and_what_to_delete(tmp_path):
    def message_of(name):
        directory = tmp_path / name
        directory.mkdir()
        outcome, message = run_case(name, directory)
        assert outcome == "refused", message
        return message

    assert message_of("state_empty") == (
        f"{tmp_path / 'state_empty' / 'out.npy.state.json'} is not a valid resume "
        f"state (empty file); delete it and out.npy.partial to start over"
    )
    assert "'done' is 1000000, expected a chunk count from 1 to 13" in message_of("state_done_huge")
    assert "not JSON: Expecting property name" in message_of("state_not_json")
    assert "the input changed since the interrupted run: rows 32-47 of in.npy differ" in message_of(
        "input_changed_same_shape"
    )
    assert "belongs to another job (different chunk size)" in message_of("state_chunk_size_edited")
    assert "belongs to another job (different model)" in message_of("artifact_changed")


def test_a_repaired_resume_reports_what_it_recomputed(tmp_path):
    x = np.random.default_rng(0).normal(size=(ROWS, 8, 8, 1)).astype(np.float32)
    np.save(tmp_path / "in.npy", x)
    (tmp_path / "m.bin").write_bytes(b"model")

    def run(on_chunk=None):
        return run_batch_inference(
            engine(),
            tmp_path / "in.npy",
            tmp_path / "out.npy",
            artifact_path=tmp_path / "m.bin",
            chunk_size=CHUNK,
            progress=False,
            on_chunk=on_chunk,
        )

    def crash(done, total):
        if done == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(crash)
    partial = tmp_path / "out.npy.partial"
    offset = partial.stat().st_size - ROWS * 10 * 4  # the header's length
    with open(partial, "r+b") as f:  # a byte in chunk 4's rows
        f.seek(offset + 4 * CHUNK * 10 * 4 + 7)
        f.write(b"\x55")
    summary = run()
    assert summary["resumed_at_chunk"] == 4
    assert summary["notes"] == [
        "out.npy.partial: chunk 4 does not match its checksum (truncated or modified): recomputing from chunk 4"
    ]
    assert json.loads(json.dumps(summary["notes"]))  # plain strings
    assert not (tmp_path / "out.npy.state.json").exists() and not (tmp_path / "out.npy.state.chunks").exists()


@pytest.fixture
def files(tmp_path):
    np.save(tmp_path / "in.npy", np.zeros((4, 8, 8, 1), np.float32))
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "text.npy").write_text("1 2 3\n4 5 6\n")
    (tmp_path / "notzip.npz").write_bytes(b"this is not a zip archive")
    (tmp_path / "truncated.npy").write_bytes((tmp_path / "in.npy").read_bytes()[:200])
    (tmp_path / "dir.npy").mkdir()
    (tmp_path / "outdir").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    "inp, out, message",
    [
        ("empty.npy", "o.npy", "input {d}/empty.npy is empty (0 bytes)"),
        ("text.npy", "o.npy", "text.npy is not a .npy array (no NumPy header; it starts with b'1 2 3\\n')"),
        ("notzip.npz", "o.npy", "input {d}/notzip.npz is not a .npz (zip) archive"),
        ("dir.npy", "o.npy", "input {d}/dir.npy is a directory, not a .npy file"),
        ("missing.npy", "o.npy", "input {d}/missing.npy does not exist"),
        (
            "truncated.npy",
            "o.npy",
            "truncated.npy is truncated: shape (4, 8, 8, 1) of float32 needs 1,024 bytes of data",
        ),
        ("in.npy", "outdir", "output {d}/outdir is a directory; give a file path"),
        ("in.npy", "nowhere/o.npy", "output directory {d}/nowhere does not exist"),
        ("in.npy", "in.npy", "output {d}/in.npy is the input file"),
        ("in.npy", "text.npy/o.npy", "{d}/text.npy is not a directory"),
    ],
)
def test_bad_paths_are_reported_before_any_work(files, inp, out, message):
    expected = message.format(d=files)
    with pytest.raises(ValueError) as err:
        check_paths(files / inp, files / out)
    assert expected in str(err.value)

    def never(x):
        raise AssertionError("the model ran")

    with pytest.raises(ValueError) as err:
        run_batch_inference(never, files / inp, files / out, artifact_path=files / "in.npy", progress=False)
    assert expected in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_output_directory_is_reported(files):
    os.chmod(files / "outdir", 0o500)
    try:
        with pytest.raises(ValueError, match="outdir is not writable"):
            check_paths(files / "in.npy", files / "outdir" / "o.npy")
    finally:
        os.chmod(files / "outdir", 0o700)


def test_the_command_checks_paths_before_loading_the_model(files, capsys):
    # the artifact is no artifact at all: the input's error comes first, so the model was not loaded
    (files / "model.jxs").write_bytes(b"not an artifact")
    assert (
        main(
            [
                "infer",
                str(files / "model.jxs"),
                "--input",
                str(files / "text.npy"),
                "--output",
                str(files / "o.npy"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "text.npy is not a .npy array" in capsys.readouterr().err


def test_open_input_still_maps_good_files(files):
    mapped = open_input(files / "in.npy")
    assert isinstance(mapped, np.memmap) and mapped.shape == (4, 8, 8, 1)
    np.save(files / "scalar.npy", np.float32(3))
    assert open_input(files / "scalar.npy").shape == ()
