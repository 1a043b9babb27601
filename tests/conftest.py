"""Shared test setup: 8 CPU devices for every test, and small trained models shared per session."""

import os

# Must happen before jax initializes its backends (first device query).
_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
# The suite's programs are small and compiled once or twice each: compiling dominates its CPU time, and LLVM at
# optimization level 0 compiles them in half the time (the suite's CPU time halves). The numerics are IEEE at any
# level. Set --xla_backend_optimization_level yourself in XLA_FLAGS to test at another level (XLA's default is 3).
if not any(f.startswith("--xla_backend_optimization_level") for f in _flags):
    _flags.append("--xla_backend_optimization_level=0")
# XLA's CPU fusion emitters compile about twice as slowly as its elemental emitters; the suite compiles far more than
# it runs, so it takes the elemental ones. Both are correct; their float results can differ in the last bits (exp,
# tanh and friends are approximated differently), so the suite's bars must hold under either (set the flag yourself
# to test the default emitters).
if not any(f.startswith("--xla_cpu_use_fusion_emitters") for f in _flags):
    _flags.append("--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = " ".join([*_flags, "--xla_force_host_platform_device_count=8"])
# mode="auto" times large layers in both forms and runs the faster (quant.measure): which form wins depends on the
# machine and its load, so the suite (and every process it starts) takes auto's rules instead, the same choice on
# every machine. tests/quant/test_measure.py tests the measuring itself.
os.environ["JAXOPT_SERVE_AUTO"] = "rules"
# The suite tests the CPU backend: naming it spares every process (the workers, and each subprocess the tests start)
# jax's search of the installed packages for accelerator plugins, about 0.5 s of CPU each with the test extra's
# 200-odd distributions. Set JAX_PLATFORMS yourself to run the suite elsewhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, shared by both xdist workers and every subprocess the tests start
# (notebook kernels, CLI runs, multi-process and Ray workers): a program compiled once is loaded everywhere else, and
# a test that jits a fresh function with the same program loads it too. The first process to import this file (the
# xdist controller) creates it and removes it at exit; the workers and subprocesses inherit the variables.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="jaxopt_serve_tests_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from jaxopt_serve.data import load_digits  # noqa: E402
from jaxopt_serve.models import CNNConfig, init_variables  # noqa: E402
from jaxopt_serve.train import train_classifier  # noqa: E402

# `make test` runs the suite on two pytest-xdist workers (-n 2). The scheduler below sends whole groups of tests to a
# worker: every test module is one group, so its module-scoped fixtures (trained models, servers, engines) are built
# once, on one worker. Exceptions: each notebook is its own group (each starts its own kernel and shares only a
# compilation cache); the two foreign-model modules are one group (their zoo is trained once per session, about
# 50 s); the two Ray modules are one group (two local Ray clusters at once would overcommit two cores). Groups are
# handed out longest first (HEAVY, from --durations), so no long one is left for the end while the other worker
# idles. (xdist's own --dist loadgroup marks do not work with pytest 9.2: xdist 3.8 rewrites a node id field that
# pytest no longer reads.)
_SHARED = {
    "tests/foreign/test_quant.py": "foreign",
    "tests/foreign/test_training.py": "foreign",
    "tests/serve/test_ray_data.py": "ray",
    "tests/serve/test_ray_serve.py": "ray",
}
_NOTEBOOK = "tests/notebooks/test_notebooks.py::test_notebook_runs_top_to_bottom_and_saves_its_figures[{}]"
# The groups that take longest on the 2-core machine, longest first; the rest follow in collection order.
HEAVY = (
    "foreign",
    "tests/quant/test_qarray.py",
    _NOTEBOOK.format("03_distillation"),
    "tests/quant/test_runtime.py",
    "ray",
    _NOTEBOOK.format("02_pruning_regularization"),
    "tests/models/test_shapes.py",
    "tests/test_demo.py",
    "tests/distill/test_trainer.py",
    _NOTEBOOK.format("06_your_own_model"),
    "tests/engine/test_distributed.py",
    _NOTEBOOK.format("00_quickstart"),
    _NOTEBOOK.format("01_quantization"),
    "tests/hf/test_sentence_engine.py",
    _NOTEBOOK.format("04_acceleration_parallelism"),
)


def test_group(nodeid: str) -> str:
    """The group a test runs in under xdist (see above)."""
    module = nodeid.split("::")[0]
    if module == "tests/notebooks/test_notebooks.py" and "test_notebook_runs_top_to_bottom" in nodeid:
        return nodeid
    return _SHARED.get(module, module)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return test_group(nodeid)

    config.option.loadscopereorder = False  # keep the order pytest_collection_modifyitems gives
    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """HEAVY groups first (in that order), then the rest in collection order."""
    rank = {group: i for i, group in enumerate(HEAVY)}
    items.sort(key=lambda item: rank.get(test_group(item.nodeid), len(HEAVY)))  # stable: the rest keep their order


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


@pytest.fixture(scope="session")
def local_ray():
    """``ray``, initialised once per test process: the Ray Data and Ray Serve modules share one local cluster
    (they run in one xdist group; starting a cluster takes seconds on 2 cores)."""
    ray = pytest.importorskip("ray")
    import warnings

    with warnings.catch_warnings():  # starting Ray's processes forks a process that has imported JAX
        warnings.simplefilter("ignore", RuntimeWarning)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
