"""Device suite: the GPU/TPU-relevant checks and a few benchmarks, on whatever ``jax.default_backend()`` is.

    python benchmarks/device_suite.py --json results/device_suite.json

One script for a machine with an accelerator (it runs on CPU too, at small
sizes, in under 3 minutes on 2 cores). Sections, each against a baseline
measured in the same run:

* matmul: a 3-layer MLP of 4096-wide layers (1024 on CPU) at batch 1 and 16
  (memory-bound, decode-like): f32 vs bf16, weight-only int8 and weight-only
  int4 (groups of 128); then W8A8 (int8 x int8 -> int32, dynamic activation
  scales) vs f32 and bf16 at batch 256 (64 on CPU). Every quantized product
  runs through XLA's own ops (``native.use_kernel("xla")``: the CPU-only native
  kernels are off), so the figures are XLA's on this device;
* engine: the reference CNN at 224x224x3 (32x32x3 on CPU) served by
  ``InferenceEngine`` from AOT-compiled buckets: a stream of requests of random
  sizes, its throughput and the compiles after warm-up (must be 0);
* sharded: the same stream data-parallel over every local device (on CPU:
  ``--cpu-devices`` virtual devices), its outputs against one device's;
* export: ``export_model`` -> ``load_exported`` round trip of the float and the
  int8 CNN, outputs against the engine's.

Prints a table per section and writes ``{"device", "checks", "tables"}``
(atomically); ``device`` names the platform, the device kind
(``jax.devices()[0].device_kind``) and count, and the sizes used. Tests never assert wall-clock times: the checks are
about correctness and recompiles; the speeds are figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

# Virtual CPU devices for the sharded section must be set before jax starts its backends.
if "--cpu-devices" in sys.argv:
    _count = sys.argv[sys.argv.index("--cpu-devices") + 1]
else:
    _count = "4"
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    + [f"--xla_force_host_platform_device_count={_count}"]
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import Report, paired_times  # noqa: E402

from jaxopt_serve import native  # noqa: E402
from jaxopt_serve.engine import InferenceEngine, export_model, make_mesh  # noqa: E402
from jaxopt_serve.exported import load_exported  # noqa: E402
from jaxopt_serve.fileio import atomic_write  # noqa: E402
from jaxopt_serve.models import CNNConfig, MLPConfig, init_variables, predict_fn  # noqa: E402
from jaxopt_serve.quant import QuantSpec, default_rules, grouped_rules, quantize  # noqa: E402
from jaxopt_serve.quant.runtime import quantized_predict_fn  # noqa: E402
from jaxopt_serve.timing import CompileCounter, device_description  # noqa: E402

# Sizes: "full" on an accelerator, "small" on CPU (the suite must finish there in minutes).
SIZES = {
    "full": {
        "width": 4096,
        "batches": (1, 16),
        "w8a8_batch": 256,
        "image": 224,
        "max_batch": 64,
        "requests": 200,
        "rounds": 7,
        "calls": 10,
    },
    "small": {
        "width": 1024,
        "batches": (1, 16),
        "w8a8_batch": 64,
        "image": 32,
        "max_batch": 16,
        "requests": 40,
        "rounds": 3,
        "calls": 3,
    },
}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def _bf16(tree):
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def matmul_section(report: Report, size: dict) -> None:
    width = size["width"]
    config = MLPConfig(features=(width, width), num_classes=width, input_shape=(width,))  # three width x width layers
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: init_variables(config, 0))
    variables = jax.tree.map(lambda s: (rng.normal(size=s.shape) / np.sqrt(s.shape[0])).astype(s.dtype), shapes)
    variables = jax.device_put(variables)
    float_predict = jax.jit(predict_fn(config))
    q8 = jax.device_put(quantize(variables, default_rules(QuantSpec(qtype="int8"))).variables)
    q4 = jax.device_put(
        quantize(
            variables, grouped_rules(variables, QuantSpec(qtype="int4", granularity="group", group_size=128))
        ).variables
    )
    bf16_vars = jax.device_put(_bf16(variables))
    with native.use_kernel("xla"):  # XLA's ops for every quantized product, on every backend
        weight_only = jax.jit(quantized_predict_fn(config, mode="weight_only"))
        w8a8 = jax.jit(quantized_predict_fn(config, mode="dynamic"))
        rows = []
        for batch in (*size["batches"], size["w8a8_batch"]):
            x = jax.device_put(rng.normal(size=(batch, width)).astype(np.float32))
            xb = x.astype(jnp.bfloat16)
            reference = np.asarray(float_predict(variables, x))
            variants = {"bf16": functools.partial(float_predict, bf16_vars, xb)}
            if batch in size["batches"]:
                variants["int8 weight-only"] = functools.partial(weight_only, q8, x)
                variants["int4 weight-only (g128)"] = functools.partial(weight_only, q4, x)
            if batch == size["w8a8_batch"]:
                variants["int8 W8A8"] = functools.partial(w8a8, q8, x)
            baseline = functools.partial(float_predict, variables, x)
            for name, fn in variants.items():
                out = np.asarray(fn(), np.float32)
                t_f32, t_variant = paired_times(baseline, fn, rounds=size["rounds"], calls=size["calls"])
                rows.append(
                    {
                        "batch": batch,
                        "variant": name,
                        "f32 ms": t_f32,
                        "ms": t_variant,
                        "speed-up vs f32": t_f32 / t_variant,
                        "cosine to f32": _cosine(out, reference),
                    }
                )
    report.table(f"3-layer MLP, {width}-wide: f32 vs bf16 / int8 / int4 / W8A8 (XLA ops)", rows)
    worst = {
        name: min(r["cosine to f32"] for r in rows if r["variant"] == name) for name in {r["variant"] for r in rows}
    }
    report.check("mlp_int8_weight_only_min_cosine", worst["int8 weight-only"], 0.999, ">=")
    # random Gaussian weights are int4's worst case, and three layers compound it
    report.check("mlp_int4_weight_only_min_cosine", worst["int4 weight-only (g128)"], 0.97, ">=")
    report.check("mlp_w8a8_min_cosine", worst["int8 W8A8"], 0.995, ">=")
    report.check("mlp_bf16_min_cosine", worst["bf16"], 0.999, ">=")


def _stream(size: dict, image: int, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    pool = rng.normal(size=(size["max_batch"], image, image, 3)).astype(np.float32)
    sizes = [int(n) for n in rng.integers(1, size["max_batch"] + 1, size=size["requests"])]
    return pool, sizes


def _serve(engine: InferenceEngine, pool: np.ndarray, sizes: list[int]) -> tuple[float, list[np.ndarray], int]:
    """Rows per second over the stream, the outputs, and the compiles it caused."""
    with CompileCounter() as compiles:
        start = time.perf_counter()
        outputs = [np.asarray(engine(pool[:n])) for n in sizes]
        seconds = time.perf_counter() - start
    return sum(sizes) / seconds, outputs, compiles.count


def engine_section(report: Report, size: dict, directory: str) -> None:
    image = size["image"]
    config = CNNConfig(in_channels=3, example_size=image)
    shape = (image, image, 3)
    variables = jax.device_put(init_variables(config, 0, shape))
    q8 = quantize(variables, default_rules(QuantSpec(qtype="int8"))).variables
    pool, sizes = _stream(size, image)
    rows = []
    start = time.perf_counter()
    single = InferenceEngine(config, variables, input_shape=shape, max_batch=size["max_batch"]).warmup()
    warm_s = time.perf_counter() - start
    rate, outputs, compiles = _serve(single, pool, sizes)
    rows.append(
        {
            "engine": "1 device, f32",
            "devices": 1,
            "buckets": len(single.buckets),
            "warm-up s": warm_s,
            "rows/s": rate,
            "compiles after warm-up": compiles,
            "max |diff| to 1 device": 0.0,
        }
    )
    report.check("engine_compiles_after_warmup", compiles, 0, "<=")

    devices = jax.devices()
    mesh = make_mesh(data=len(devices))
    start = time.perf_counter()
    sharded = InferenceEngine(
        config, variables, input_shape=shape, max_batch=size["max_batch"] * len(devices), mesh=mesh
    ).warmup()
    warm_s = time.perf_counter() - start
    rate_sharded, sharded_outputs, sharded_compiles = _serve(sharded, pool, sizes)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(outputs, sharded_outputs))
    rows.append(
        {
            "engine": f"data-parallel over {len(devices)}, f32",
            "devices": len(devices),
            "buckets": len(sharded.buckets),
            "warm-up s": warm_s,
            "rows/s": rate_sharded,
            "compiles after warm-up": sharded_compiles,
            "max |diff| to 1 device": diff,
        }
    )
    report.check("sharded_compiles_after_warmup", sharded_compiles, 0, "<=")
    report.check("sharded_max_abs_diff_to_one_device", diff, 1e-4, "<=")
    report.table(
        f"reference CNN at {image}x{image}x3: bucketed AOT engine, {len(sizes)} requests of 1-{size['max_batch']} rows",
        rows,
    )

    export_rows = []
    probe = pool[: min(8, size["max_batch"])]
    for name, tree, mode in (("f32", variables, "weight_only"), ("int8 weight-only", q8, "weight_only")):
        path = os.path.join(directory, f"cnn_{name.split()[0]}.jxe")
        start = time.perf_counter()
        nbytes = export_model(path, config, tree, input_shape=shape, quant_mode=mode)
        loaded = load_exported(path)
        seconds = time.perf_counter() - start
        engine = InferenceEngine(config, tree, input_shape=shape, max_batch=size["max_batch"], quant_mode=mode)
        diff = float(np.max(np.abs(np.asarray(loaded(probe)) - np.asarray(engine(probe)))))
        export_rows.append(
            {"model": name, "file bytes": nbytes, "export + load s": seconds, "max |diff| to engine": diff}
        )
        report.check(f"export_roundtrip_max_abs_diff_{name.split()[0]}", diff, 1e-4, "<=")
    report.table("export_model -> load_exported round trip (CNN)", export_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON (atomically)")
    parser.add_argument(
        "--size", choices=["auto", "small", "full"], default="auto", help="auto: full sizes on GPU/TPU, small on CPU"
    )
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=4,
        help="virtual devices of the CPU backend, for the sharded section (default 4)",
    )
    parser.add_argument("--sections", default="matmul,engine", help="comma-separated: matmul, engine")
    args = parser.parse_args()
    backend = jax.default_backend()
    size_name = args.size if args.size != "auto" else ("small" if backend == "cpu" else "full")
    size = SIZES[size_name]
    first = jax.devices()[0]
    device = {
        "platform": first.platform,
        "device_kind": first.device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "sizes": size_name,
        **{k: v for k, v in size.items() if k not in ("rounds", "calls")},
    }
    report = Report("device suite")
    start = time.perf_counter()
    sections = set(args.sections.split(","))
    if "matmul" in sections:
        matmul_section(report, size)
    if "engine" in sections:
        with tempfile.TemporaryDirectory() as directory:
            engine_section(report, size, directory)
    device["suite_seconds"] = round(time.perf_counter() - start, 1)
    report.table("device and sizes", [{"setting": k, "value": str(v)} for k, v in device.items()])
    report.print()
    if args.json:
        payload = {
            "device": {"description": device_description(), **device},
            "checks": report.checks,
            "tables": report.tables,
        }
        atomic_write(args.json, (json.dumps(payload, indent=2) + "\n").encode())
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
