"""The demo: train the reference CNN on the bundled digits, then measure every model variant.

One row per variant with the same columns (``ROW_KEYS``). A variant is a
function ``variant(context) -> list[Variant]`` in ``VARIANT_BUILDERS``; later
chapters (quantized, pruned, distilled, served) append builders, and the
measurement and the table stay the same.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxopt_serve.artifact import Artifact, save_artifact
from jaxopt_serve.data.digits import Dataset, load_digits
from jaxopt_serve.fileio import atomic_write
from jaxopt_serve.models.cnn import CNNConfig
from jaxopt_serve.models.config import ModelConfig
from jaxopt_serve.models.functional import Variables, count_params, predict_fn
from jaxopt_serve.timing import device_description, throughput, time_calls
from jaxopt_serve.train.recipes import train_classifier

# The distilled student: a fifth of the default CNN's parameters. Its first conv keeps 24 channels: XLA:CPU
# runs a one-input-channel 3x3 conv 2.5x slower below 20 output channels (measured, batch 256).
STUDENT = CNNConfig(channels=(24, 16), hidden=32)


ROW_KEYS = ("variant", "params", "bytes", "accuracy", "latency_b1_ms", "throughput_b256")


@dataclasses.dataclass(frozen=True)
class Variant:
    """A model variant to measure: how to predict, with which variables, and its artifact on disk."""

    name: str
    predict: Callable[[Variables, jax.Array], jax.Array]
    variables: Variables
    artifact_path: Path
    params: int
    config: ModelConfig


@dataclasses.dataclass
class DemoContext:
    """What variant builders get: the data, the trained float model, and a directory for artifacts."""

    dataset: Dataset
    base: Artifact
    base_path: Path
    out_dir: Path
    seed: int
    qat_steps: int = 200
    prune_steps: int = 1200
    distill_steps: int = 600
    student: CNNConfig = STUDENT
    progress: bool = False


def f32_variant(ctx: DemoContext) -> list[Variant]:
    """The trained float32 CNN, as saved."""
    return [
        Variant("f32", predict_fn(ctx.base.config), ctx.base.variables, ctx.base_path, count_params(ctx.base.variables),
                ctx.base.config)
    ]


def quantized_variants(ctx: DemoContext) -> list[Variant]:
    """int8 dynamic W8A8, int8 static (calibrated), int4 per-group weight-only, ternary with QAT."""
    from jaxopt_serve.quant import QuantRule, QuantSpec, grouped_rules, quantize
    from jaxopt_serve.quant.calibrate import calibrate
    from jaxopt_serve.quant.qat import qat_finetune, ternary_rules
    from jaxopt_serve.quant.runtime import quantized_predict_fn, serving_layout
    from jaxopt_serve.quant.serialize import quantized_artifact

    config, variables = ctx.base.config, ctx.base.variables
    kernels = r"params/(.*/)?kernel"
    int8 = quantize(variables, [QuantRule(kernels, QuantSpec(qtype="int8"))]).variables
    static = calibrate(config, int8, ctx.dataset.x_train[:512], method="percentile")
    int4 = quantize(variables, grouped_rules(variables, QuantSpec(qtype="int4", granularity="group", group_size=32))).variables
    qat, _ = qat_finetune(config, variables, ctx.dataset, ternary_rules(), steps=ctx.qat_steps, seed=ctx.seed,
                          progress=ctx.progress)
    variants = []
    for name, qvariables, mode in [
        ("int8 W8A8 dynamic", int8, "dynamic"),
        ("int8 W8A8 static", static, "static"),
        ("int4 g32 weight-only", int4, "weight_only"),
        ("ternary QAT", qat.variables, "auto"),
    ]:
        path = ctx.out_dir / f"cnn_{name.split()[0]}_{mode}.jxs"
        save_artifact(path, quantized_artifact(config, qvariables, ctx.base.input_shape, {"mode": mode}))
        predict = quantized_predict_fn(config, mode=mode)
        variants.append(Variant(name, predict, serving_layout(qvariables), path, count_params(variables), config))
    return variants


def pruned_variants(ctx: DemoContext) -> list[Variant]:
    """90% unstructured (gradual) + int4 from its sparse artifact, and 50% structured (fine-tuned).

    The ``params`` column counts non-zero parameters for the sparse row and
    the smaller model's parameters for the structured row.
    """
    from jaxopt_serve.artifact import load_artifact
    from jaxopt_serve.prune.pipeline import deep_compress, structured
    from jaxopt_serve.quant.runtime import quantized_predict_fn, serving_layout

    config, variables = ctx.base.config, ctx.base.variables
    deep = deep_compress(config, variables, ctx.dataset, sparsity=0.9, bits="int4", finetune_steps=ctx.prune_steps,
                         seed=ctx.seed, progress=ctx.progress)
    sparse_path = ctx.out_dir / "cnn_sparse90_int4.jxs"
    save_artifact(sparse_path, deep.artifact)
    loaded = load_artifact(sparse_path).variables
    nonzero = sum(int(np.count_nonzero(x)) for x in jax.tree.leaves(deep.pruned["params"]))
    small = structured(config, variables, ctx.dataset, sparsity=0.5, finetune_steps=max(1, ctx.prune_steps // 2),
                       seed=ctx.seed, progress=ctx.progress)
    small_path = ctx.out_dir / "cnn_structured50.jxs"
    save_artifact(small_path, Artifact(small.config, small.variables, ctx.base.input_shape, {"structured": small.sizes}))
    return [
        Variant("90% sparse + int4", quantized_predict_fn(config, mode="auto"), serving_layout(loaded), sparse_path,
                nonzero, config),
        Variant("50% structured", predict_fn(small.config), small.variables, small_path, count_params(small.variables),
                small.config),
    ]


def distilled_variants(ctx: DemoContext) -> list[Variant]:
    """A CNN student with a fifth of the parameters distilled from the trained CNN, in f32 and int8 W8A8."""
    from jaxopt_serve.distill import distill
    from jaxopt_serve.quant import QuantRule, QuantSpec, quantize
    from jaxopt_serve.quant.runtime import quantized_predict_fn, serving_layout
    from jaxopt_serve.quant.serialize import quantized_artifact

    student = ctx.student
    result = distill(ctx.base.config, ctx.base.variables, student, ctx.dataset, steps=ctx.distill_steps,
                     seed=ctx.seed, val_fraction=0.0, progress=ctx.progress)
    path = ctx.out_dir / "cnn_student.jxs"
    save_artifact(path, Artifact(student, result.variables, ctx.base.input_shape, {"distilled_from": "cnn_f32.jxs"}))
    int8 = quantize(result.variables, [QuantRule(r"params/(.*/)?kernel", QuantSpec(qtype="int8"))]).variables
    int8_path = ctx.out_dir / "cnn_student_int8.jxs"
    save_artifact(int8_path, quantized_artifact(student, int8, ctx.base.input_shape, {"mode": "dynamic"}))
    params = count_params(result.variables)
    return [
        Variant("distilled student", predict_fn(student), result.variables, path, params, student),
        Variant("student + int8", quantized_predict_fn(student, mode="dynamic"), serving_layout(int8), int8_path, params,
                student),
    ]


VARIANT_BUILDERS: list[Callable[[DemoContext], list[Variant]]] = [
    f32_variant, quantized_variants, pruned_variants, distilled_variants,
]


def measure(variant: Variant, dataset: Dataset, *, latency_repeats: int = 200, throughput_repeats: int = 20) -> dict[str, Any]:
    """One table row: size, test accuracy, p50 latency at batch 1 and throughput at batch 256.

    Every number comes from the inference engine (``InferenceEngine`` with
    buckets 1 and 256, compiled ahead of time), numpy in and numpy out, as a
    caller would use it.
    """
    from jaxopt_serve.engine import InferenceEngine

    engine = InferenceEngine(variant.config, variant.variables, predict=variant.predict,
                             input_shape=dataset.input_shape, buckets=(1, 256)).warmup()
    x1 = np.asarray(dataset.x_test[:1])
    x256 = np.resize(dataset.x_test, (256, *dataset.input_shape))
    predictions = engine(dataset.x_test).argmax(-1)
    return {
        "variant": variant.name,
        "params": variant.params,
        "bytes": os.path.getsize(variant.artifact_path),
        "accuracy": float((predictions == dataset.y_test).mean()),
        "latency_b1_ms": time_calls(engine, x1, repeats=latency_repeats, warmup=5).p50,
        "throughput_b256": throughput(engine, x256, batch_size=256, repeats=throughput_repeats),
    }


def served_row(ctx: DemoContext, f32_row: dict[str, Any], *, clients: int = 32, seconds: float = 2.0) -> dict[str, Any]:
    """The f32 model served through the dynamic batcher to ``clients`` concurrent single-example clients.

    In this row ``latency_b1_ms`` is the p99 request latency and
    ``throughput_b256`` the requests per second through the batcher.
    """
    from jaxopt_serve.engine import InferenceEngine
    from jaxopt_serve.serve import DynamicBatcher
    from jaxopt_serve.serve.load import closed_loop_async

    engine = InferenceEngine(ctx.base.config, ctx.base.variables, input_shape=ctx.dataset.input_shape,
                             max_batch=64).warmup()
    with DynamicBatcher(engine) as batcher:
        load = closed_loop_async(batcher, np.asarray(ctx.dataset.x_test[:1]), clients, seconds)
    return {**f32_row, "variant": f"served, {clients} clients", "latency_b1_ms": load["p99 ms"],
            "throughput_b256": load["requests/s"]}


def run_demo(
    *,
    steps: int = 600,
    seed: int = 0,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    config: CNNConfig | None = None,
    latency_repeats: int = 200,
    qat_steps: int = 200,
    prune_steps: int = 1200,
    distill_steps: int = 600,
    student: CNNConfig | None = None,
    served_seconds: float = 2.0,
    variants: Sequence[Callable[[DemoContext], list[Variant]]] | None = None,
) -> dict[str, Any]:
    """Train the reference CNN on the digits and measure every variant; returns ``{"device", "rows"}``."""
    dataset = load_digits(seed=seed)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="jaxopt_serve_demo_"))
    base, _ = train_classifier(config or CNNConfig(), dataset, steps=steps, seed=seed, progress=progress)
    base_path = out / "cnn_f32.jxs"
    save_artifact(base_path, base)
    ctx = DemoContext(dataset=dataset, base=base, base_path=base_path, out_dir=out, seed=seed,
                      qat_steps=qat_steps, prune_steps=prune_steps, distill_steps=distill_steps,
                      student=student or STUDENT, progress=progress)
    rows = [
        measure(variant, dataset, latency_repeats=latency_repeats)
        for builder in (VARIANT_BUILDERS if variants is None else variants)
        for variant in builder(ctx)
    ]
    rows.append(served_row(ctx, rows[0], seconds=served_seconds))
    return {"device": device_description(), "artifacts": str(out), "rows": rows}


def format_table(report: dict[str, Any]) -> str:
    """The report as an aligned text table.

    Example:
        >>> row = {"variant": "f32", "params": 1000, "bytes": 4100, "accuracy": 0.98,
        ...        "latency_b1_ms": 0.05, "throughput_b256": 1e5}
        >>> print(format_table({"device": "cpu", "rows": [row]}))  # doctest: +NORMALIZE_WHITESPACE
        device: cpu
        variant  params  bytes  accuracy  p50 latency b1 (ms)  throughput b256 (ex/s)
        f32      1,000   4,100  98.00%    0.050                100,000
    """
    headers = ["variant", "params", "bytes", "accuracy", "p50 latency b1 (ms)", "throughput b256 (ex/s)"]
    cells = [
        [
            r["variant"],
            f"{r['params']:,}",
            f"{r['bytes']:,}",
            f"{100 * r['accuracy']:.2f}%",
            f"{r['latency_b1_ms']:.3f}",
            f"{r['throughput_b256']:,.0f}",
        ]
        for r in report["rows"]
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = [f"device: {report['device']}", "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def write_json(path: str | os.PathLike[str], report: dict[str, Any]) -> None:
    """Write ``{"device": ..., "rows": [...]}`` to ``path`` atomically."""
    payload = {"device": report["device"], "rows": [{k: row[k] for k in ROW_KEYS} for row in report["rows"]]}
    atomic_write(path, (json.dumps(payload, indent=2) + "\n").encode("utf-8"))
