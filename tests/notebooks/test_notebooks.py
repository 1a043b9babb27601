"""The notebooks: stored without outputs, Colab badges from one setting, and executed top to bottom on CPU.

Each notebook runs in a fresh Jupyter kernel (the ``python3`` kernel, which
jupyter_client starts with this interpreter) in a temporary directory, with
``JAXOPT_SERVE_FIGURES`` pointing the figures there; a failing cell fails the
test, and so does a warning printed by a cell. Every figure a notebook should
save is then checked: a PNG, not tiny, not one flat colour. The kernels share
one private XLA compilation cache (they compile the same small CNN), which
takes about a third off the run time.

Each notebook gathers its run-size knobs (training steps, batch sizes, timed
repeats...) in one cell tagged ``parameters``, right after the setup cell; the
test runs it with the smaller values of ``QUICK``, in a cell inserted right after
that one, the way papermill injects parameters. Every cell still runs and every
figure is still drawn, on shorter runs.
"""

import ast
import importlib.util
import json
import os
import re
import shutil
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

# notebook -> smaller values for knobs of its `parameters` cell, for the test run (the printed accuracies are lower)
QUICK = {
    "00_quickstart": {"STEPS": 100, "LATENCY_REPEATS": 10},
    "01_quantization": {"STEPS": 100, "QAT_STEPS": 20, "BATCH_SIZES": (1, 8, 64), "REPEATS": 5},
    "02_pruning_regularization": {"STEPS": 100, "FINETUNE_STEPS": 30, "SPARSITIES": (0.5, 0.8, 0.9)},
    "03_distillation": {"STEPS": 100, "QAT_STEPS": 20},
    "04_acceleration_parallelism": {"STEPS": 100, "REQUESTS": 6, "MULTIPLES": (1, 4, 16), "REPEATS": 3},
    "05_serving_batch_inference": {"STEPS": 100, "CLIENTS": (1, 4, 16), "SECONDS": 0.1, "LATENCY_REPEATS": 20},
    "06_your_own_model": {"STEPS": 30, "FINETUNE_STEPS": 20, "DISTILL_STEPS": 20},
}


def load(name):
    return json.loads((NOTEBOOKS / f"{name}.ipynb").read_text(encoding="utf-8"))


def test_every_notebook_is_tested():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(FIGURES)
    assert set(QUICK) <= set(FIGURES)


def parameters_cells(cells):
    """The indices of the cells tagged ``parameters`` (papermill's convention)."""
    return [i for i, cell in enumerate(cells) if "parameters" in cell.get("metadata", {}).get("tags", [])]


def _assigned(source):
    """The names a cell's code assigns (anywhere in it, e.g. also as a loop variable); a cell may `await`."""
    tree = compile(source, "<cell>", "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}


def with_overrides(notebook, name):
    """``notebook`` with ``QUICK[name]`` assigned in a code cell right after its ``parameters`` cell."""
    import nbformat

    overrides = QUICK.get(name, {})
    if overrides:
        [index] = parameters_cells(notebook.cells)
        source = "# Injected parameters (tests/notebooks/test_notebooks.py QUICK): a shorter run\n" + "\n".join(
            f"{knob} = {value!r}" for knob, value in overrides.items()
        )
        cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
        notebook.cells.insert(index + 1, cell)
    return notebook


@pytest.mark.parametrize("name", sorted(QUICK))
def test_every_override_sets_a_knob_of_the_parameters_cell(name):
    """An override can never silently miss: the knob is assigned in the one ``parameters`` cell, a code cell
    right after the setup cell, and no later cell assigns it again."""
    cells = load(name)["cells"]
    assert parameters_cells(cells) == [2], f"{name}.ipynb: one cell tagged parameters, right after the setup cell"
    assert cells[2]["cell_type"] == "code"
    knobs = _assigned("".join(cells[2]["source"]))
    assert not set(QUICK[name]) - knobs, f"{name}.ipynb: its parameters cell does not assign {set(QUICK[name]) - knobs}"
    for i, cell in enumerate(cells[3:], start=3):
        if cell["cell_type"] == "code":
            again = set(QUICK[name]) & _assigned("".join(cell["source"]))
            assert not again, f"{name}.ipynb cell {i} assigns {again} again: the override would not hold"


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_stored_without_outputs(name):
    """Outputs hold machine-specific numbers and images: they are stripped before commit
    (notebooks/strip_outputs.py)."""
    for i, cell in enumerate(load(name)["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{name}.ipynb cell {i} has outputs"
        assert "execution" not in cell.get("metadata", {}), f"{name}.ipynb cell {i} has execution timings"


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_first_cell_installs_in_colab_and_shows_the_devices(name):
    source = "".join(load(name)["cells"][1]["source"])
    for needed in (
        '"google.colab" in sys.modules',
        "jax[tpu]",
        "jax.default_backend()",
        "jax.devices()",
        "JAXOPT_SERVE_FIGURES",
    ):
        assert needed in source, f"{name}.ipynb setup cell lacks {needed!r}"


def _set_repository():
    spec = importlib.util.spec_from_file_location("set_repository", NOTEBOOKS / "set_repository.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COLAB_URL = re.compile(r"https://colab\.research\.google\.com/github/[^)\s\"]*")


def _colab_urls(root):
    """``{file: [every Colab URL in it]}`` over the notebooks, the README and the docs."""
    files = [*sorted((root / "notebooks").glob("*.ipynb")), root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    return {path: COLAB_URL.findall(path.read_text(encoding="utf-8")) for path in files}


def _check_urls(root, repository, branch):
    """The problems with the badges and install cells under ``root`` for the setting ``(repository, branch)``."""
    problems = []
    for path, urls in _colab_urls(root).items():
        for url in urls:
            match = re.fullmatch(
                r"https://colab\.research\.google\.com/github/(.+)/blob/(.+)/notebooks/([\w.-]+)\.ipynb", url
            )
            if match is None or match.group(1, 2) != (repository, branch):
                problems.append(f"{path.name}: {url} does not open {repository} at {branch}")
            elif not (root / "notebooks" / f"{match.group(3)}.ipynb").is_file():
                problems.append(f"{path.name}: {url} names a notebook that does not exist")
    for name in sorted(FIGURES):
        notebook = json.loads((root / "notebooks" / f"{name}.ipynb").read_text(encoding="utf-8"))
        own = f"https://colab.research.google.com/github/{repository}/blob/{branch}/notebooks/{name}.ipynb"
        if own not in "".join(notebook["cells"][0]["source"]):
            problems.append(f"{name}.ipynb: its first cell has no Open in Colab badge for itself")
        setup = "".join(notebook["cells"][1]["source"])
        if f'REPO = "{repository}"' not in setup or "git+https://github.com/{REPO}" not in setup:
            problems.append(f"{name}.ipynb: its install cell does not install {repository} through REPO")
        code = "".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
        if re.search(r"github\.com/(?!\{REPO\})", code):
            problems.append(f"{name}.ipynb: a code cell names a GitHub URL other than the one of REPO")
    return problems


def test_every_colab_badge_and_install_cell_uses_the_repository_setting():
    """One setting ([tool.jaxopt_serve] in pyproject.toml) names the repository; everything else derives from it."""
    module = _set_repository()
    repository, branch = module.setting(NOTEBOOKS.parent)
    assert _check_urls(NOTEBOOKS.parent, repository, branch) == []
    notebooks_page = (NOTEBOOKS.parent / "docs" / "notebooks.md").read_text(encoding="utf-8")
    for name in sorted(FIGURES):  # the docs' table links each notebook and its badge
        assert f"](notebooks/{name}.ipynb)" in notebooks_page
        assert module.badge_url(repository, branch, name) in notebooks_page
    assert "make notebooks-url REPO=OWNER/NAME" in README.read_text(encoding="utf-8")


def test_make_notebooks_url_rewrites_every_badge_and_install_cell(tmp_path):
    root = tmp_path / "clone"
    (root / "notebooks").mkdir(parents=True)
    for path in [NOTEBOOKS.parent / "pyproject.toml", NOTEBOOKS.parent / "README.md"]:
        shutil.copy(path, root / path.name)
    for path in NOTEBOOKS.glob("*.ipynb"):
        shutil.copy(path, root / "notebooks" / path.name)
    shutil.copytree(NOTEBOOKS.parent / "docs", root / "docs")
    module = _set_repository()
    old = module.setting(root)
    assert module.main(["acme-labs/serving.fork", "--branch", "release", "--root", str(root)]) == 0
    assert module.setting(root) == ("acme-labs/serving.fork", "release")
    assert _check_urls(root, "acme-labs/serving.fork", "release") == []
    assert all(urls for path, urls in _colab_urls(root).items() if path.suffix == ".ipynb")
    for path in (root / "notebooks").glob("*.ipynb"):
        json.loads(path.read_text(encoding="utf-8"))  # still valid JSON
        assert old[0] not in path.read_text(encoding="utf-8")
    assert module.main(["not a repository", "--root", str(root)]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_top_to_bottom_and_saves_its_figures(name, tmp_path, monkeypatch):
    import nbformat
    from matplotlib import image
    from nbclient import NotebookClient

    figures = tmp_path / "figures"
    monkeypatch.setenv("JAXOPT_SERVE_FIGURES", str(figures))
    # What a fresh CPU runtime sees: conftest.py's 8 virtual devices are for the tests, not for the kernel
    # (the parallelism notebook asks for its own before importing jax).
    # The kernel keeps conftest.py's other flags and its session compilation cache: a notebook compiles hundreds of
    # small programs (eager operations included), and compiling is most of its run time.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    monkeypatch.setenv("XLA_FLAGS", " ".join(flags))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")

    notebook = with_overrides(nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4), name)
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
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
