"""Point the notebooks' Colab badges and install cells at the GitHub repository that hosts this project.

The one setting is ``[tool.jaxopt_serve]`` in ``pyproject.toml``: ``repository``
(``OWNER/NAME`` on GitHub) and ``branch`` (the branch the badges open). Every
Colab badge (in the notebooks, ``README.md`` and ``docs/``) and every notebook's
install cell (``REPO = "OWNER/NAME"``) is derived from it; ``make test`` checks
that they agree. After pushing the project to your own repository::

    make notebooks-url REPO=OWNER/NAME            # or: python notebooks/set_repository.py OWNER/NAME
    make notebooks-url REPO=OWNER/NAME BRANCH=dev

rewrites the setting and everything derived from it, then commit the result.
Standard library only; it edits the files as text, so the notebooks keep their
exact formatting.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLAB = "https://colab.research.google.com/github/"
_REPO = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}")
_BRANCH = re.compile(r"[A-Za-z0-9._/-]{1,200}")


def setting(root: Path = ROOT) -> tuple[str, str]:
    """``(repository, branch)`` from ``[tool.jaxopt_serve]`` in ``root/pyproject.toml``."""
    table = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["jaxopt_serve"]
    return table["repository"], table.get("branch", "main")


def derived_files(root: Path = ROOT) -> list[Path]:
    """The files whose badges or install cells derive from the setting."""
    return [*sorted((root / "notebooks").glob("*.ipynb")), root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def badge_url(repository: str, branch: str, notebook: str) -> str:
    """The Colab URL of ``notebooks/<notebook>.ipynb`` in ``repository`` at ``branch``."""
    return f"{COLAB}{repository}/blob/{branch}/notebooks/{notebook}.ipynb"


def rewrite(root: Path, repository: str, branch: str) -> list[Path]:
    """Set the setting to ``(repository, branch)`` and rewrite what derives from it; the files changed."""
    if not _REPO.fullmatch(repository):
        raise ValueError(f"repository must look like OWNER/NAME (a GitHub repository), got {repository!r}")
    if not _BRANCH.fullmatch(branch) or ".." in branch:
        raise ValueError(f"branch must be a plain git branch name, got {branch!r}")
    old_repository, old_branch = setting(root)
    changed = []
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text(encoding="utf-8")
    table = re.search(r"(?ms)^\[tool\.jaxopt_serve\]\n(.*?)(?=^\[|\Z)", text)
    if table is None:
        raise ValueError(f"{pyproject} has no [tool.jaxopt_serve] table")
    body = re.sub(r'(?m)^repository = ".*"$', f'repository = "{repository}"', table.group(1))
    body = re.sub(r'(?m)^branch = ".*"$', f'branch = "{branch}"', body)
    new_text = text[: table.start(1)] + body + text[table.end(1) :]
    if new_text != text:
        pyproject.write_text(new_text, encoding="utf-8")
        changed.append(pyproject)
    old_badge = f"{COLAB}{old_repository}/blob/{old_branch}/notebooks/"
    new_badge = f"{COLAB}{repository}/blob/{branch}/notebooks/"
    for path in derived_files(root):
        text = path.read_text(encoding="utf-8")
        new_text = text.replace(old_badge, new_badge)
        if path.suffix == ".ipynb":  # the install cell, inside a JSON string
            new_text = new_text.replace(f'REPO = \\"{old_repository}\\"', f'REPO = \\"{repository}\\"')
        if new_text != text:
            path.write_text(new_text, encoding="utf-8")
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repository", help="OWNER/NAME of the GitHub repository")
    parser.add_argument("--branch", default=None, help="the branch the Colab badges open (default: keep the current)")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    branch = args.branch or setting(args.root)[1]
    try:
        changed = rewrite(args.root, args.repository, branch)
    except ValueError as err:
        print(f"set_repository.py: error: {err}", file=sys.stderr)
        return 2
    print(f"repository {args.repository}, branch {branch}: {len(changed)} file(s) changed")
    for path in changed:
        print(f"  {path.relative_to(args.root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
