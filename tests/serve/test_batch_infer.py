import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from chunk_progress import chunks_done

from jaxopt_serve.artifact import Artifact, save_artifact
from jaxopt_serve.cli import main
from jaxopt_serve.engine import InferenceEngine
from jaxopt_serve.models import MLPConfig, init_variables
from jaxopt_serve.serve import open_input

CONFIG = MLPConfig(features=(16,))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "mlp.jxs"
    save_artifact(path, Artifact(CONFIG, init_variables(CONFIG, 0), (8, 8, 1)))
    return path


def test_outputs_are_in_input_order_from_npy_and_npz(tmp_path, artifact, capsys):
    x = np.random.default_rng(0).normal(size=(1000, 8, 8, 1)).astype(np.float32)
    np.save(tmp_path / "in.npy", x)
    np.savez(tmp_path / "in.npz", images=x, other=np.zeros(3))
    for name, extra in (("in.npy", []), ("in.npz", ["--key", "images"])):
        out = tmp_path / f"{name}.out.npy"
        assert (
            main(
                [
                    "infer",
                    str(artifact),
                    "--input",
                    str(tmp_path / name),
                    *extra,
                    "--output",
                    str(out),
                    "--chunk-size",
                    "96",
                    "--no-progress",
                ]
            )
            == 0
        )
        engine = InferenceEngine(CONFIG, init_variables(CONFIG, 0), max_batch=1000)
        np.testing.assert_allclose(np.load(out), engine(x), rtol=1e-5, atol=1e-6)
        assert not (tmp_path / f"{name}.out.npy.partial").exists()
    assert "rows/s" in capsys.readouterr().out


def test_inputs_are_memory_mapped_and_compressed_npz_is_refused(tmp_path):
    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    np.savez(tmp_path / "plain.npz", a=x)
    mapped = open_input(tmp_path / "plain.npz")
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, x)
    np.savez_compressed(tmp_path / "packed.npz", a=x)
    with pytest.raises(ValueError, match="compressed and cannot be memory-mapped"):
        open_input(tmp_path / "packed.npz")


def test_sigkill_mid_run_then_rerun_is_byte_identical(tmp_path, artifact):
    x = np.random.default_rng(1).normal(size=(24000, 8, 8, 1)).astype(np.float32)
    np.save(tmp_path / "in.npy", x)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}

    def command(out):
        return [
            sys.executable,
            "-m",
            "jaxopt_serve",
            "infer",
            str(artifact),
            "--input",
            str(tmp_path / "in.npy"),
            "--output",
            str(out),
            "--chunk-size",
            "16",
            "--no-progress",
        ]

    reference = tmp_path / "reference.npy"
    subprocess.run(command(reference), check=True, env=env, timeout=300, capture_output=True)

    out = tmp_path / "resumed.npy"
    state = tmp_path / "resumed.npy.state.json"
    proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = chunks_done(state, proc, 20, timeout_s=120)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    total = 24000 // 16
    assert 20 <= done < total, f"the run was not killed mid-way (done={done})"
    assert not out.exists() and (tmp_path / "resumed.npy.partial").exists()

    rerun = subprocess.run(command(out), env=env, timeout=300, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed at chunk" in rerun.stdout
    assert out.read_bytes() == reference.read_bytes()
    assert not state.exists()
