"""Shared test setup: 8 CPU devices for every test, and small trained models shared per session."""

import os

# Must happen before jax initializes its backends (first device query).
os.environ["XLA_FLAGS"] = " ".join(
    flag for flag in os.environ.get("XLA_FLAGS", "").split()
    if not flag.startswith("--xla_force_host_platform_device_count")
) + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from jaxopt_serve.data import load_digits  # noqa: E402
from jaxopt_serve.models import CNNConfig, init_variables  # noqa: E402
from jaxopt_serve.train import train_classifier  # noqa: E402

# A CNN small enough to train in seconds on 2 cores, large enough to pass 90%.
SMALL_CNN = CNNConfig(channels=(8, 16), hidden=32)
SMALL_CNN_STEPS = 250


@pytest.fixture(scope="session")
def digits():
    return load_digits()


@pytest.fixture(scope="session")
def trained_cnn(digits):
    """(artifact, fit result) of SMALL_CNN trained on the digits; shared by training, artifact and CLI tests."""
    return train_classifier(SMALL_CNN, digits, steps=SMALL_CNN_STEPS, seed=0, progress=False)


@pytest.fixture
def float_artifact(tmp_path, trained_cnn):
    """The trained CNN saved as an artifact file (for CLI tests)."""
    from jaxopt_serve.artifact import save_artifact

    path = tmp_path / "cnn.jxs"
    save_artifact(path, trained_cnn[0])
    return path


def random_variables(config, seed=0):
    """Random variables shaped like the model's, without an eager Flax init (which compiles op by op)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_variables(config, 0))

    def leaf(path, s):
        x = rng.normal(size=s.shape).astype(s.dtype)
        return np.abs(x) if path[-1].key == "var" else x  # batch norm variances are positive

    return jax.tree_util.tree_map_with_path(leaf, shapes)
