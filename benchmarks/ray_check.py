"""Ray Data batch inference against single-process ``run_batch_inference``: identical bytes, and throughput.

``ray_data_check(tmpdir)`` builds a small CNN artifact and a sharded ``.npy``
dataset, runs ``run_batch_inference`` over the concatenated input in this
process and ``ray_batch_inference`` over the shards on a local Ray instance
(``ray.init(num_cpus=cpus)``, an actor per CPU), and returns
``ray_data_output_identical`` (1 when the two output files are equal byte for
byte, else 0) with the timings. Ray's start-up is not in the timed part; each
actor's model load and compilation is (it is part of every real job).

Run: ``.venv/bin/python benchmarks/ray_check.py [--rows N] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np


def ray_data_check(
    tmpdir: str | os.PathLike[str],
    *,
    rows: int = 60_000,
    shards: int = 6,
    chunk_size: int = 512,
    cpus: int | None = None,
) -> dict[str, Any]:
    """Run both paths over the same rows; ``{"ray_data_output_identical": 1 or 0, ...timings}``."""
    import ray

    from jaxopt_serve.artifact import Artifact, save_artifact
    from jaxopt_serve.models import CNNConfig, init_variables
    from jaxopt_serve.serve import run_batch_inference
    from jaxopt_serve.serve.ray_data import ray_batch_inference
    from jaxopt_serve.serve.servable import load_servable

    root = Path(tmpdir)
    cpus = cpus or os.cpu_count() or 2
    config = CNNConfig(channels=(8, 16), hidden=32)
    model = root / "cnn.jxs"
    save_artifact(model, Artifact(config, init_variables(config, 0), (8, 8, 1)))
    x = np.random.default_rng(0).normal(size=(rows, 8, 8, 1)).astype(np.float32)
    np.save(root / "all.npy", x)
    bounds = np.linspace(0, rows, shards + 1).astype(int)
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        np.save(root / f"part-{i:03d}.npy", x[lo:hi])

    start = time.perf_counter()
    engine = load_servable(model, max_batch=min(chunk_size, 1024))
    run_batch_inference(
        engine, root / "all.npy", root / "single.npy", artifact_path=model, chunk_size=chunk_size, progress=False
    )
    single_s = time.perf_counter() - start

    started_here = not ray.is_initialized()
    if started_here:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # Ray forks its processes from a JAX process
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        summary = ray_batch_inference(
            model, str(root / "part-*.npy"), root / "ray.npy", chunk_size=chunk_size, actors=cpus
        )
    finally:
        if started_here:
            ray.shutdown()
    identical = (root / "single.npy").read_bytes() == (root / "ray.npy").read_bytes()
    return {
        "ray_data_output_identical": int(identical),
        "rows": rows,
        "shards": shards,
        "chunk_size": chunk_size,
        "ray_actors": cpus,
        "single_process_seconds": single_s,
        "single_process_rows_per_s": rows / single_s,
        "ray_data_seconds": summary["seconds"],
        "ray_data_rows_per_s": summary["rows_per_second"],
        "ray_data_throughput_ratio_vs_single_process": (rows / summary["seconds"]) / (rows / single_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = ray_data_check(tmp, rows=args.rows, chunk_size=args.chunk_size)
    for name, value in result.items():
        print(f"{name:45s} {value:.4g}" if isinstance(value, float) else f"{name:45s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
