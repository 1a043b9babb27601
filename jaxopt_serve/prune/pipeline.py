"""Ready-made pruning recipes on a classification dataset: fine-tune with masks, deep compression, structured.

``deep_compress`` is the pipeline of Han et al. (2016) on a Flax model:
magnitude pruning -> fine-tuning with the masks held -> int4/int8 quantization
of the surviving weights -> a sparse, LZMA-compressed artifact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import jax
import numpy as np
import optax

from jaxopt_serve.artifact import Artifact
from jaxopt_serve.data.digits import Dataset
from jaxopt_serve.models.config import ModelConfig
from jaxopt_serve.models.functional import Variables, make_apply
from jaxopt_serve.prune.masks import (
    PruneResult,
    PruneRule,
    Scope,
    calibration_batches,
    classification_grad_fn,
    importance_scores,
    mean_gradients,
    prune,
    random_scores,
)
from jaxopt_serve.prune.schedule import gradual_pruning, keep_masks
from jaxopt_serve.prune.sparse_io import sparse_artifact
from jaxopt_serve.prune.structured import Criterion, StructuredResult, structured_prune
from jaxopt_serve.train.loop import classification_loss, fit
from jaxopt_serve.train.recipes import default_optimizer

Bits = Literal["int8", "int4"]


def _calibration(config: ModelConfig, variables: Variables, dataset: Dataset | None, what: str) -> tuple:
    """``(grad_fn, params, batches)``: the classifier's gradients on up to 8 training batches."""
    if dataset is None:
        raise ValueError(f"{what} needs a dataset for its calibration gradients")
    state = {k: v for k, v in variables.items() if k != "params"}
    batches = calibration_batches(dataset.x_train, dataset.y_train, limit=8)
    return classification_grad_fn(config, state), variables["params"], batches


def finetune(
    config: ModelConfig,
    variables: Variables,
    dataset: Dataset,
    *,
    steps: int,
    masks: Any | None = None,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> Variables:
    """Fine-tune on ``dataset``'s training split; with ``masks``, pruned weights stay exactly zero."""
    if steps <= 0:
        return variables
    optimizer = default_optimizer(steps, learning_rate=learning_rate)
    if masks is not None:
        optimizer = optax.chain(optimizer, keep_masks(masks))
    result = fit(
        classification_loss(make_apply(config)),
        variables,
        (dataset.x_train, dataset.y_train),
        optimizer=optimizer,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    return result.variables


def unstructured(
    config: ModelConfig,
    variables: Variables,
    dataset: Dataset | None,
    *,
    sparsity: float = 0.9,
    method: Literal["magnitude", "importance", "random", "nm"] = "magnitude",
    scope: Scope = "global",
    n_m: tuple[int, int] = (2, 4),
    pattern: str = r"params/(.*/)?kernel",
    finetune_steps: int = 0,
    seed: int = 0,
    progress: bool = False,
) -> tuple[Variables, PruneResult]:
    """Prune the kernels by ``method`` (``"nm"``: N:M), then fine-tune with the masks held."""
    if method == "nm":
        rules = [PruneRule(pattern, n_m=tuple(n_m))]
    else:
        rules = [PruneRule(pattern, sparsity)]
    params = variables["params"]
    scores = None
    if method == "importance":
        scores = importance_scores(*_calibration(config, variables, dataset, "importance pruning"))
    elif method == "random":
        scores = random_scores(params, seed=seed)
    elif method not in ("magnitude", "nm"):
        raise ValueError(f"method must be 'magnitude', 'importance', 'random' or 'nm', got {method!r}")
    result = prune(params, rules, scores=scores, scope=scope if method != "nm" else "layer")
    pruned = {**variables, "params": result.params}
    if finetune_steps:
        if dataset is None:
            raise ValueError("fine-tuning needs a dataset")
        pruned = finetune(
            config, pruned, dataset, steps=finetune_steps, masks=result.masks, seed=seed, progress=progress
        )
    return pruned, result


def gradual(
    config: ModelConfig,
    variables: Variables,
    dataset: Dataset,
    *,
    sparsity: float = 0.9,
    steps: int = 1200,
    end_fraction: float = 0.5,
    frequency: int = 20,
    learning_rate: float = 3e-3,
    scope: Scope = "global",
    pattern: str = r"params/(.*/)?kernel",
    seed: int = 0,
    progress: bool = False,
) -> Variables:
    """Fine-tune while raising kernel sparsity to ``sparsity`` (Zhu & Gupta), reached after ``end_fraction`` of the
    steps."""
    if steps <= 1:
        raise ValueError(f"gradual pruning needs steps > 1, got {steps}")
    end = max(1, int(steps * end_fraction))
    optimizer = gradual_pruning(
        default_optimizer(steps, learning_rate=learning_rate),
        [PruneRule(pattern, sparsity)],
        begin_step=0,
        end_step=end,
        frequency=min(frequency, end),
        scope=scope,
    )
    result = fit(
        classification_loss(make_apply(config)),
        variables,
        (dataset.x_train, dataset.y_train),
        optimizer=optimizer,
        steps=steps,
        batch_size=64,
        seed=seed,
        progress=progress,
    )
    return result.variables


@dataclasses.dataclass
class DeepCompressResult:
    """The pruned float variables, their quantized form, and the sparse artifact."""

    pruned: Variables
    quantized: Variables
    artifact: Artifact
    sparsity: float


def deep_compress(
    config: ModelConfig,
    variables: Variables,
    dataset: Dataset,
    *,
    sparsity: float = 0.9,
    bits: Bits | None = "int4",
    finetune_steps: int = 1200,
    scope: Scope = "global",
    seed: int = 0,
    metadata: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> DeepCompressResult:
    """Gradual magnitude pruning while fine-tuning -> quantize -> sparse artifact (float16 for the dense leaves).

    Quantization is symmetric per-channel, so a pruned weight stays the exact code 0.
    """
    from jaxopt_serve.quant import QuantRule, QuantSpec, quantize

    pruned = gradual(
        config, variables, dataset, sparsity=sparsity, steps=finetune_steps, scope=scope, seed=seed, progress=progress
    )
    quantized = pruned
    if bits is not None:
        spec = QuantSpec(qtype=bits, granularity="channel")
        quantized = quantize(pruned, [QuantRule(r"params/(.*/)?kernel", spec)]).variables
    kernels = [x for p, x in jax.tree_util.tree_leaves_with_path(pruned["params"]) if p[-1].key == "kernel"]
    achieved = float(sum(int((np.asarray(k) == 0).sum()) for k in kernels) / sum(k.size for k in kernels))
    meta = {
        **dict(metadata or {}),
        "deep_compression": {"sparsity": sparsity, "bits": bits, "finetune_steps": finetune_steps},
    }
    artifact = sparse_artifact(config, quantized, dataset.input_shape, meta, float_dtype="float16")
    return DeepCompressResult(pruned, quantized, artifact, achieved)


def structured(
    config: ModelConfig,
    variables: Variables,
    dataset: Dataset | None,
    *,
    sparsity: float | Mapping[str, float] = 0.5,
    criterion: Criterion = "l1",
    finetune_steps: int = 0,
    seed: int = 0,
    progress: bool = False,
) -> StructuredResult:
    """Structured pruning of a reference model, then (optionally) fine-tuning of the smaller model."""
    grads = None
    if criterion == "taylor":
        grads = mean_gradients(*_calibration(config, variables, dataset, "criterion 'taylor'"))
    result = structured_prune(config, variables, sparsity, criterion=criterion, grads=grads)
    if finetune_steps:
        if dataset is None:
            raise ValueError("fine-tuning needs a dataset")
        result.variables = finetune(
            result.config, result.variables, dataset, steps=finetune_steps, seed=seed, progress=progress
        )
    return result
