"""A griffe extension (used by mkdocstrings in mkdocs.yml) that reads this package's docstring conventions.

The docstrings are Google style, written to read well in ``help()`` and to run under ``pytest --doctest-modules``:

- an ``Example:`` or ``Example (note):`` section holds doctest lines: it becomes an ``Examples:`` section, which
  griffe renders as Python console code (the note is kept as a sentence);
- an RST literal block (a line ending in ``::`` then an indented block) becomes a fenced Python block.

Only the rendering changes; the source docstrings stay as they are.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(?P<indent>\s*)Example(?P<note>\s*\(.*\))?:(?P<literal>:?)\s*$")


def _fence_literal_blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::") and not line.strip().startswith(">>>"):
            indent = len(line) - len(line.lstrip())
            text = line.rstrip()[:-1]
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            block_indent = len(lines[j]) - len(lines[j].lstrip()) if j < len(lines) else 0
            if j < len(lines) and block_indent > indent:
                k = j
                block: list[str] = []
                while k < len(lines) and (not lines[k].strip() or len(lines[k]) - len(lines[k].lstrip()) > indent):
                    block.append(lines[k][block_indent:] if lines[k].strip() else "")
                    k += 1
                while block and not block[-1]:
                    block.pop()
                pad = " " * indent
                out += [text, "", pad + "```python", *(pad + b if b else "" for b in block), pad + "```", ""]
                i = k
                continue
        out.append(line)
        i += 1
    return out


def rewrite(docstring: str) -> str:
    """``docstring`` with its example sections and literal blocks in the forms griffe renders as code."""
    lines = []
    for line in docstring.splitlines():
        match = _EXAMPLE.match(line)
        if match and not match["literal"]:
            lines.append(f"{match['indent']}Examples:")
            if match["note"]:
                lines.append(f"{match['indent']}    {match['note'].strip()[1:-1].capitalize()}:")
            continue
        lines.append(line)
    return "\n".join(_fence_literal_blocks(lines))


class PackageDocstrings(griffe.Extension):
    """Rewrites every docstring of the loaded objects before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
