"""The notebooks: stored without outputs, linked from the README, and executed top to bottom on CPU.

Each notebook runs in a fresh Jupyter kernel (the ``python3`` kernel, which
jupyter_client starts with this interpreter) in a temporary directory, with
``JAXOPT_SERVE_FIGURES`` pointing the figures there; a failing cell fails the
test, and so does a warning printed by a cell. Every figure a notebook should
save is then checked: a PNG, not tiny, not one flat colour. The kernels share
one private XLA compilation cache (they compile the same small CNN), which
takes about a third off the run time.
"""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
README = NOTEBOOKS.parent / "README.md"

# notebook -> the figures it saves
FIGURES = {
    "00_quickstart": ["quickstart_training_loss.png"],
    "01_quantization": ["quantization_latency_vs_batch.png"],
    "02_pruning_regularization": ["pruning_accuracy_vs_sparsity.png", "pruning_group_lasso_norms.png"],
    "03_distillation": ["distillation_pareto_accuracy_vs_size.png"],
    "04_acceleration_parallelism": ["acceleration_throughput_vs_batch.png"],
    "05_serving_batch_inference": ["serving_throughput_p99_vs_clients.png"],
    "06_your_own_model": ["your_model_accuracy_vs_size.png"],
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load(name):
    return json.loads((NOTEBOOKS / f"{name}.ipynb").read_text(encoding="utf-8"))


def test_every_notebook_is_tested():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(FIGURES)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_stored_without_outputs(name):
    """Outputs hold machine-specific numbers and images: they are stripped before commit (notebooks/strip_outputs.py)."""
    for i, cell in enumerate(load(name)["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{name}.ipynb cell {i} has outputs"
        assert "execution" not in cell.get("metadata", {}), f"{name}.ipynb cell {i} has execution timings"


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_first_cell_installs_in_colab_and_shows_the_devices(name):
    source = "".join(load(name)["cells"][1]["source"])
    for needed in ('"google.colab" in sys.modules', "jax[tpu]", "jax.default_backend()", "jax.devices()",
                   "JAXOPT_SERVE_FIGURES"):
        assert needed in source, f"{name}.ipynb setup cell lacks {needed!r}"


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_readme_links_the_notebook_with_an_open_in_colab_link(name):
    readme = README.read_text(encoding="utf-8")
    assert f"](notebooks/{name}.ipynb)" in readme
    colab = rf"\(https://colab\.research\.google\.com/github/[\w.<>-]+/[\w.-]+/blob/main/notebooks/{name}\.ipynb\)"
    assert re.search(colab, readme), f"no Open in Colab link for {name}.ipynb"


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """One XLA compilation cache for all the notebooks' kernels: they train and serve the same small CNN."""
    return tmp_path_factory.mktemp("xla_cache")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_top_to_bottom_and_saves_its_figures(name, tmp_path, monkeypatch, compilation_cache):
    import nbformat
    from matplotlib import image
    from nbclient import NotebookClient

    figures = tmp_path / "figures"
    monkeypatch.setenv("JAXOPT_SERVE_FIGURES", str(figures))
    # What a fresh CPU runtime sees: conftest.py's 8 virtual devices are for the tests, not for the kernel
    # (the parallelism notebook asks for its own before importing jax).
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    monkeypatch.setenv("XLA_FLAGS", " ".join(flags))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(compilation_cache))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(notebook, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    stderr = [o["text"] for c in notebook.cells for o in c.get("outputs", []) if o.get("name") == "stderr"]
    assert not [t for t in stderr if "Warning" in t], f"{name}.ipynb printed warnings: {stderr}"
    for png in FIGURES[name]:
        path = figures / png
        assert path.is_file(), f"{name}.ipynb did not save {png}"
        assert path.read_bytes()[:8] == PNG_MAGIC, f"{png} is not a PNG"
        assert path.stat().st_size > 10_000, f"{png} is only {path.stat().st_size} bytes"
        pixels = image.imread(path)
        assert min(pixels.shape[:2]) >= 200 and float(np.std(pixels)) > 0, f"{png} is blank"
