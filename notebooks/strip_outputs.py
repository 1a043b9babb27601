"""Strip outputs, execution counts and run metadata from notebooks before committing them.

    python notebooks/strip_outputs.py              # every notebook next to this script
    python notebooks/strip_outputs.py a.ipynb ...  # the ones named

Outputs hold one machine's numbers and images; the notebooks are stored
without them, and ``tests/notebooks`` checks that they are. Standard library
only; the files are written the way Jupyter writes them (one-space indent,
sorted keys), so a stripped notebook diffs cleanly.
"""

import json
import sys
from pathlib import Path

CELL_METADATA = ("execution", "outputId", "colab", "collapsed", "scrolled")


def strip(path: Path) -> bool:
    """Strip ``path`` in place; returns whether anything changed."""
    text = path.read_text(encoding="utf-8")
    notebook = json.loads(text)
    notebook.get("metadata", {}).pop("widgets", None)
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        for key in CELL_METADATA:
            cell.get("metadata", {}).pop(key, None)
    stripped = json.dumps(notebook, sort_keys=True, indent=1, ensure_ascii=False) + "\n"
    if stripped != text:
        path.write_text(stripped, encoding="utf-8")
    return stripped != text


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]] or sorted(Path(__file__).parent.glob("*.ipynb"))
    for path in paths:
        print(f"{path}: {'stripped' if strip(path) else 'already clean'}")
