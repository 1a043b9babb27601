"""``jaxopt-serve infer --output-dir`` across 2 jax.distributed processes: same bytes as 1 process, resumable."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from chunk_progress import chunks_done

from jaxopt_serve.artifact import Artifact, save_artifact
from jaxopt_serve.cli import main
from jaxopt_serve.models import CNNConfig, init_variables
from jaxopt_serve.serve.sharded_infer import process_shards, shard_outputs

CNN = CNNConfig(channels=(8, 16), hidden=16)
SHARD_ROWS = (400, 6000, 300)  # process 0: shards 0 and 2; process 1: shard 1 (long, to be killed mid-way)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    save_artifact(root / "cnn.jxs", Artifact(CNN, init_variables(CNN, 0), (8, 8, 1)))
    (root / "in").mkdir()
    rng = np.random.default_rng(0)
    for i, rows in enumerate(SHARD_ROWS):
        np.save(root / "in" / f"shard-{i}.npy", rng.normal(size=(rows, 8, 8, 1)).astype(np.float32))
    reference = root / "one-process"
    reference.mkdir()
    subprocess.run(_command(root, reference), check=True, env=_env(), timeout=300, capture_output=True)
    return root, reference


def _env():
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("XLA_FLAGS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_COORDINATOR_ADDRESS")
    }


def _command(root, out, *extra):
    return [
        sys.executable,
        "-m",
        "jaxopt_serve",
        "infer",
        str(root / "cnn.jxs"),
        "--input",
        str(root / "in" / "*.npy"),
        "--output-dir",
        str(out),
        "--chunk-size",
        "16",
        "--no-progress",
        *extra,
    ]


def _start_two(root, out):
    port = _free_port()
    return [
        subprocess.Popen(
            _command(root, out, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def _finish(procs, timeout=240):
    try:
        results = [p.communicate(timeout=timeout) for p in procs]  # a hung peer fails the test, never hangs it
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def _same_bytes(a: Path, b: Path):
    for i in range(len(SHARD_ROWS)):
        assert (a / f"shard-{i}.npy").read_bytes() == (b / f"shard-{i}.npy").read_bytes(), f"shard {i} differs"


def test_two_processes_write_the_one_process_bytes(job, tmp_path):
    root, reference = job
    procs = _start_two(root, tmp_path)
    results = _finish(procs)
    for p, (_out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    assert "process 0 of 2: wrote 2 of 3 shards" in results[0][0]
    assert "process 1 of 2: wrote 1 of 3 shards" in results[1][0]
    _same_bytes(tmp_path, reference)
    # a rerun finds every shard complete and computes nothing
    results = _finish(_start_two(root, tmp_path))
    assert "0 rows computed" in results[0][0] and "already complete" in results[1][0], results


def test_sigkill_of_one_process_then_rerun_resumes_and_matches(job, tmp_path):
    root, reference = job
    procs = _start_two(root, tmp_path)
    state = tmp_path / "shard-1.npy.state.json"
    done = 0
    try:
        done = chunks_done(state, procs[1], 20, timeout_s=180)
        os.kill(procs[1].pid, signal.SIGKILL)
    finally:
        time.sleep(0.5)
        for p in procs:  # the surviving process would wait for its dead peer: stop it too
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        _finish(procs, timeout=60)
    assert 20 <= done < SHARD_ROWS[1] // 16, f"process 1 was not killed mid-shard (done={done})"
    assert not (tmp_path / "shard-1.npy").exists()

    procs = _start_two(root, tmp_path)
    results = _finish(procs)
    for p, (_out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    assert "shard-1.npy resumed at chunk" in results[1][0], results[1]
    resumed_at = int(results[1][0].split("resumed at chunk ")[1].split(")")[0].split(",")[0])
    assert resumed_at >= 20
    _same_bytes(tmp_path, reference)


def test_layout_helpers_and_refusals(tmp_path, capsys):
    assert process_shards(5, 2, 1) == [1, 3] and process_shards(1, 3, 2) == []
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\), got 2"):
        process_shards(4, 2, 2)
    with pytest.raises(ValueError, match="would both write"):
        shard_outputs([Path("a/x.npy"), Path("b/x.npy")], tmp_path)
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((2, 8, 8, 1), np.float32))
    model = tmp_path / "cnn.jxs"
    save_artifact(model, Artifact(CNN, init_variables(CNN, 0), (8, 8, 1)))
    cases = [
        (["--output-dir", str(tmp_path), "--num-processes", "2", "--process-id", "0"], "needs --coordinator"),
        (
            ["--output-dir", str(tmp_path), "--num-processes", "2", "--process-id", "2", "--coordinator", "h:1"],
            "--process-id must be in [0, 2)",
        ),
        (["--output-dir", str(tmp_path), "--coordinator", "nohost"], "--coordinator must be HOST:PORT"),
        (["--output", str(tmp_path / "o.npy"), "--input", str(x)], "several input shards need --output-dir"),
        (["--output-dir", str(tmp_path / "missing")], "is not a directory"),
    ]
    for extra, message in cases:
        assert main(["infer", str(model), "--input", str(x), *extra]) == 2
        assert message in capsys.readouterr().err
