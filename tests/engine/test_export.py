import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxopt_serve.exported
from conftest import random_variables
from jaxopt_serve.engine import InferenceEngine, export_model
from jaxopt_serve.exported import load_exported
from jaxopt_serve.models import CNNConfig, MLPConfig
from jaxopt_serve.quant import QuantRule, QuantSpec, quantize

CNN = CNNConfig(channels=(8, 16), hidden=16)
SIZES = (1, 7, 64)

# Runs in a fresh interpreter where importing jaxopt_serve (and so its models) is impossible:
# the loader is read from its file, the way a user without the package would copy it.
LOADER = textwrap.dedent("""
    import importlib.util, sys
    import numpy as np
    sys.modules["jaxopt_serve"] = None
    sys.modules["jaxopt_serve.models"] = None
    spec = importlib.util.spec_from_file_location("standalone_loader", sys.argv[1])
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    model = loader.load_exported(sys.argv[2])
    inputs = np.load(sys.argv[3])
    np.savez(sys.argv[4], **{name: model(inputs[name]) for name in inputs.files})
    assert not any(name.startswith("jaxopt_serve") and mod is not None for name, mod in sys.modules.items())
""")


def _run_in_fresh_process(tmp_path, artifact, inputs):
    np.savez(tmp_path / "in.npz", **{str(len(x)): x for x in inputs})
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            LOADER,
            jaxopt_serve.exported.__file__,
            str(artifact),
            str(tmp_path / "in.npz"),
            str(tmp_path / "out.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr
    with np.load(tmp_path / "out.npz") as out:
        return {int(k): out[k] for k in out.files}


@pytest.mark.parametrize("kind", ["float cnn", "int8 mlp"])
def test_exported_artifact_runs_without_the_model_code(tmp_path, kind):
    if kind == "float cnn":
        config, variables, mode = CNN, jax.tree.map(np.asarray, random_variables(CNN, seed=7)), "auto"
    else:
        config = MLPConfig(features=(32,))
        variables = quantize(
            jax.tree.map(np.asarray, random_variables(config, seed=8)),
            [QuantRule(r"params/.*/kernel", QuantSpec(qtype="int8"))],
        ).variables
        mode = "weight_only"
    path = tmp_path / "model.jxe"
    export_model(path, config, variables, quant_mode=mode)
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(n, 8, 8, 1)).astype(np.float32) for n in SIZES]
    outputs = _run_in_fresh_process(tmp_path, path, inputs)
    engine = InferenceEngine(config, variables, max_batch=64, quant_mode=mode)
    for x in inputs:
        expected = engine(x)  # a padded bucket vs a symbolic batch: float32 summation order may differ
        np.testing.assert_allclose(outputs[len(x)], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_a_corrupted_export_is_refused(tmp_path):
    path = tmp_path / "model.jxe"
    export_model(path, CNN, random_variables(CNN))
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_exported(path)


def test_exported_model_checks_its_input(tmp_path):
    path = tmp_path / "model.jxe"
    export_model(path, CNN, random_variables(CNN))
    model = load_exported(path)
    with pytest.raises(ValueError, match=r"expected a batch of shape \(batch, 8, 8, 1\), got \(2, 8, 8\)"):
        model(np.zeros((2, 8, 8), np.float32))
