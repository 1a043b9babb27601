"""The non-finite input policy shared by the engine, the batcher, the HTTP server and ``infer``.

A row (axis 0 of every input leaf) is non-finite when any float input leaf
holds a NaN or an infinity in it. Two policies:

* ``"error"``: refuse the request with a ``ValueError`` naming the offending
  rows (the HTTP server answers 400, ``infer`` stops before computing the chunk).
* ``"propagate"``: the row is computed, and its float outputs are NaN. The row
  is not run as given: XLA's kernels do not agree on NaN (a max-pool or an
  int8 activation quantizer may turn it into a finite value, and whether they
  do depends on the batch size, so on the other rows of the bucket). It runs
  as a zero row instead, like the padding rows of a bucket, and its float
  output leaves are overwritten with NaN afterwards. A row's output therefore
  never depends on its batch-mates: finite rows are bit-identical whatever
  shares their bucket, and non-finite rows are NaN whatever the model's
  pooling does. Integer and bool outputs cannot hold NaN, so a model with such
  outputs refuses non-finite rows under either policy.

Example:
    >>> import numpy as np
    >>> x = np.array([[1.0, 2.0], [np.nan, 0.0], [3.0, np.inf]], np.float32)
    >>> nonfinite_rows(x).tolist()
    [False, True, True]
    >>> replace_rows(x, nonfinite_rows(x)).tolist()
    [[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]]
    >>> mark_rows(np.ones((3, 2), np.float32), nonfinite_rows(x))[:, 0].tolist()
    [1.0, nan, nan]
    >>> str(nonfinite_error(nonfinite_rows(x), offset=100))
    'non-finite inputs (NaN or inf) in rows [101, 102]'
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import numpy as np

NanPolicy = Literal["propagate", "error"]
POLICIES: tuple[str, ...] = ("propagate", "error")
SHOWN_ROWS = 10


def check_policy(policy: Any, *, name: str = "nan_policy") -> str:
    """``policy`` itself, or ``ValueError`` when it is not one of ``POLICIES``."""
    if policy not in POLICIES:
        raise ValueError(f"{name} must be 'propagate' or 'error', got {policy!r}")
    return policy


def nonfinite_rows(inputs: Any) -> np.ndarray | None:
    """A bool mask of the rows holding a NaN or inf in any float leaf of ``inputs``; ``None`` when all are finite."""
    bad = None
    for leaf in jax.tree.leaves(inputs):
        leaf = np.asarray(leaf)
        if not np.issubdtype(leaf.dtype, np.floating) or leaf.ndim == 0:
            continue
        rows = ~np.isfinite(leaf.reshape(len(leaf), -1)).all(axis=1)
        bad = rows if bad is None else bad | rows
    return bad if bad is not None and bad.any() else None


def row_text(mask: np.ndarray, *, offset: int = 0) -> str:
    """``"rows [1, 5]"`` for a row mask (the first ``SHOWN_ROWS`` rows, then how many more), from ``offset``."""
    rows = (np.flatnonzero(mask) + offset).tolist()
    more = f" and {len(rows) - SHOWN_ROWS} more" if len(rows) > SHOWN_ROWS else ""
    return f"rows {rows[:SHOWN_ROWS]}{more}"


def nonfinite_error(mask: np.ndarray, *, offset: int = 0, where: str = "") -> ValueError:
    """The ``"error"`` policy's ``ValueError`` for the rows in ``mask`` (``where``: e.g. ``" of input.npy"``)."""
    return ValueError(f"non-finite inputs (NaN or inf) in {row_text(mask, offset=offset)}{where}")


def replace_rows(inputs: Any, mask: np.ndarray) -> Any:
    """``inputs`` with the rows in ``mask`` set to zero in every leaf (as a bucket's padding rows are)."""

    def replace(leaf: Any) -> np.ndarray:
        leaf = np.array(leaf)  # a copy: the caller's arrays are not written
        leaf[mask] = 0
        return leaf

    return jax.tree.map(replace, inputs)


def check_markable(out_dtypes: Any, mask: np.ndarray) -> None:
    """``ValueError`` when an output leaf (given by its dtypes) cannot hold the NaN that marks the rows in ``mask``."""
    kinds = [np.dtype(d) for d in jax.tree.leaves(out_dtypes)]
    if any(not np.issubdtype(d, np.floating) for d in kinds):
        raise ValueError(
            f"non-finite inputs (NaN or inf) in {row_text(mask)}: this model has integer or bool "
            f"outputs ({', '.join(map(str, kinds))}), which cannot be NaN; remove those rows"
        )


def mark_rows(outputs: Any, mask: np.ndarray) -> Any:
    """``outputs`` with the rows in ``mask`` set to NaN in every float leaf (``ValueError`` for other leaves)."""
    check_markable(jax.tree.map(lambda leaf: np.asarray(leaf).dtype, outputs), mask)

    def mark(leaf: Any) -> np.ndarray:
        leaf = np.array(leaf)
        leaf[mask] = np.nan
        return leaf

    return jax.tree.map(mark, outputs)
