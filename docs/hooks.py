"""MkDocs hooks: the notebooks and the API reference come from the repository itself.

- ``notebooks/*.ipynb`` become pages under ``notebooks/`` (rendered by mkdocs-jupyter, never executed), so the
  notebooks have one copy, the one the tests run.
- ``api.md`` is written from ``jaxopt_serve.__all__``: one mkdocstrings entry per public name, grouped by the
  package it is re-exported from. ``jaxopt_serve/__init__.py`` is parsed, not imported, so the build needs no
  JAX; a name in ``__all__`` that is not re-exported there stops the build.
"""

from __future__ import annotations

import ast
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "jaxopt_serve"

# Section of the API reference for each module the public names are re-exported from, in page order.
SECTIONS = {
    "model": "Your model",
    "models": "Reference models",
    "data": "Data",
    "train": "Training",
    "artifact": "Artifacts",
    "exported": "Exported models",
    "quant": "Quantization",
    "prune": "Pruning",
    "distill": "Distillation",
    "engine": "Compiled and sharded inference",
    "serve": "Serving",
    "extras": "Errors",
}
# Functions users call through their package (they keep the package name unshadowed), documented with it.
ALSO = {"prune": ["prune.prune"], "distill": ["distill.distill"]}


def public_api(init: Path) -> dict[str, list[str]]:
    """``{section module: [public names]}`` from the package's ``__init__.py``, in ``__all__`` order."""
    tree = ast.parse(init.read_text())
    origin: dict[str, str] = {}
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE + "."):
            for alias in node.names:
                origin[alias.asname or alias.name] = node.module.split(".")[1]
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            names = list(ast.literal_eval(node.value))
    if not names:
        raise ValueError(f"{init}: no __all__ list")
    unknown = sorted(set(names) - set(origin))
    if unknown:
        raise ValueError(f"{init}: names in __all__ that are not re-exported from a {PACKAGE} module: {unknown}")
    sections: dict[str, list[str]] = {}
    for name in names:
        module = origin[name]
        if module not in SECTIONS:
            raise ValueError(f"{init}: {name} comes from {PACKAGE}.{module}, which has no section in docs/hooks.py")
        sections.setdefault(module, []).append(name)
    return sections


def api_page(sections: dict[str, list[str]]) -> str:
    total = sum(len(v) for v in sections.values())
    lines = [
        "# API reference",
        "",
        f"Every public name of `{PACKAGE}` ({total} names, `{PACKAGE}.__all__`), with its docstring, grouped by "
        "the package that implements it. Import them from the top level: `import jaxopt_serve as js`, then "
        "`js.quantize(...)`. The pages of the guides show them at work.",
        "",
    ]
    for module, title in SECTIONS.items():
        if module not in sections:
            continue
        lines += [f"## {title}", ""]
        for name in sections[module]:
            lines += [f"::: {PACKAGE}.{name}", ""]
        for dotted in ALSO.get(module, []):
            lines += [f"::: {PACKAGE}.{dotted}", "    options:", "      show_root_full_path: true", ""]
    return "\n".join(lines)


@event_priority(100)  # before mkdocs-jupyter turns .ipynb files into pages
def on_files(files: Files, config: MkDocsConfig) -> Files:
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        files.append(
            File(
                f"notebooks/{notebook.name}",
                src_dir=str(ROOT),
                dest_dir=config.site_dir,
                use_directory_urls=config.use_directory_urls,
            )
        )
    files.append(File.generated(config, "api.md", content=api_page(public_api(ROOT / PACKAGE / "__init__.py"))))
    return files
