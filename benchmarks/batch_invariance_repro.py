"""Minimal reproduction: XLA's compiled float results depend on the batch size, on one device.

Why ``foreign_sharded_max_abs_diff`` cannot reach 1e-5 in the integer modes:
a data-parallel mesh of 8 devices runs the same program on 1/8 of the batch,
and XLA:CPU compiles a float reduction differently for the smaller shape (above
a size threshold the reduce goes to a YNNPACK fusion, below it to XLA's own
loop), so the same row sums in another order. No sharding is involved here:
one device, batch 8 against the first 8 rows of batch 64. An int8 activation
quantizer downstream turns such a last-bit difference into a whole int8 step
whenever a value sits on a rounding boundary.

Run: ``.venv/bin/python benchmarks/batch_invariance_repro.py``; it prints, per
batch size, the largest difference of ``jnp.sum(x, axis=-1)`` from the same rows
computed in a batch of 64, and whether the compiled program used a YNNPACK fusion.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def main() -> None:
    x = np.exp(np.random.default_rng(0).normal(size=(64, 4, 8, 8))).astype(np.float32)  # softmax numerators
    row_sum = jax.jit(lambda a: jnp.sum(a, axis=-1))
    full = np.asarray(row_sum(x))
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    print(f"{'batch':>5}  {'max |sum(batch) - sum(rows of 64)|':>34}  ynn fusion")
    for n in (1, 2, 4, 8, 16, 32, 64):
        part = np.asarray(row_sum(x[:n]))
        ynn = "__ynn_fusion" in row_sum.lower(x[:n]).compile().as_text()
        print(f"{n:>5}  {np.abs(full[:n] - part).max():>34.3g}  {ynn}")


if __name__ == "__main__":
    main()
