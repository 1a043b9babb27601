"""Import BERT-family checkpoints (``config.json`` + ``model.safetensors``) into ``TransformerEncoder``.

The mapping from checkpoint names to this library's variable paths is
explicit (``bert_mapping``); every checkpoint tensor must be used (apart
from ``IGNORED`` buffers) and every shape must match, or a ``ValueError``
names the tensor. PyTorch ``Linear`` weights are ``(out, in)`` and are
transposed; attention projections are reshaped to keep the head axis
explicit. The reference encoder always has a classifier head: an imported
checkpoint without one gets a zero classifier (``num_classes=2``), which
sentence embeddings never use. Needs the ``hf`` extra (``safetensors``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxopt_serve.extras import require
from jaxopt_serve.models.functional import Variables, init_variables
from jaxopt_serve.models.transformer import TransformerConfig
from jaxopt_serve.quant.rules import path_str

IGNORED = ("embeddings.position_ids",)  # a buffer of 0..max_len-1, not a weight
SUPPORTED = ("BertModel", "BertForMaskedLM", "BertForPreTraining")


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    """The encoder config of a BERT ``config.json``; anything else is an error."""
    architectures = hf.get("architectures") or []
    if hf.get("model_type") != "bert" or not any(a in SUPPORTED for a in architectures):
        raise ValueError(
            f"unsupported architecture {architectures or hf.get('model_type')!r}: this importer reads "
            f"BERT encoders (model_type 'bert', architectures {list(SUPPORTED)})"
        )
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}: the encoder uses exact GELU")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"unsupported position_embedding_type {hf['position_embedding_type']!r}")
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    return TransformerConfig(
        vocab_size=int(hf["vocab_size"]),
        max_len=int(hf["max_position_embeddings"]),
        type_vocab_size=int(hf.get("type_vocab_size", 2)),
        hidden_size=hidden,
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        head_dim=hidden // heads,
        mlp_dim=int(hf["intermediate_size"]),
        num_classes=2,
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        pooling="cls",
        seq_len=128,
    )


def bert_mapping(config: TransformerConfig) -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """``{checkpoint tensor: (variable path, transform)}`` for a BERT encoder of ``config``."""
    heads, dim, hidden = config.layer_heads(0), config.resolved_head_dim, config.hidden_size

    def same(x):
        return x

    def linear(x):
        return x.T

    def qkv_kernel(x):
        return x.T.reshape(hidden, heads, dim)

    def qkv_bias(x):
        return x.reshape(heads, dim)

    def out_kernel(x):
        return x.T.reshape(heads, dim, hidden)

    mapping = {
        "embeddings.word_embeddings.weight": ("params/word_embeddings/embedding", same),
        "embeddings.position_embeddings.weight": ("params/position_embeddings/embedding", same),
        "embeddings.token_type_embeddings.weight": ("params/token_type_embeddings/embedding", same),
        "embeddings.LayerNorm.weight": ("params/embedding_norm/scale", same),
        "embeddings.LayerNorm.bias": ("params/embedding_norm/bias", same),
        "pooler.dense.weight": ("params/pooler/kernel", linear),
        "pooler.dense.bias": ("params/pooler/bias", same),
    }
    for i in range(config.num_layers):
        src, dst = f"encoder.layer.{i}", f"params/layer_{i}"
        for name in ("query", "key", "value"):
            mapping[f"{src}.attention.self.{name}.weight"] = (f"{dst}/attention/{name}/kernel", qkv_kernel)
            mapping[f"{src}.attention.self.{name}.bias"] = (f"{dst}/attention/{name}/bias", qkv_bias)
        mapping[f"{src}.attention.output.dense.weight"] = (f"{dst}/attention/out/kernel", out_kernel)
        mapping[f"{src}.attention.output.dense.bias"] = (f"{dst}/attention/out/bias", same)
        mapping[f"{src}.attention.output.LayerNorm.weight"] = (f"{dst}/attention_norm/scale", same)
        mapping[f"{src}.attention.output.LayerNorm.bias"] = (f"{dst}/attention_norm/bias", same)
        mapping[f"{src}.intermediate.dense.weight"] = (f"{dst}/intermediate/kernel", linear)
        mapping[f"{src}.intermediate.dense.bias"] = (f"{dst}/intermediate/bias", same)
        mapping[f"{src}.output.dense.weight"] = (f"{dst}/output/kernel", linear)
        mapping[f"{src}.output.dense.bias"] = (f"{dst}/output/bias", same)
        mapping[f"{src}.output.LayerNorm.weight"] = (f"{dst}/output_norm/scale", same)
        mapping[f"{src}.output.LayerNorm.bias"] = (f"{dst}/output_norm/bias", same)
    return mapping


def import_bert(directory: str | os.PathLike[str]) -> tuple[TransformerConfig, Variables]:
    """Read ``config.json`` and ``model.safetensors`` from ``directory`` into ``(config, variables)``.

    Raises:
        ValueError: an unsupported architecture, a checkpoint tensor the
            mapping does not use (or a missing one), or a shape mismatch; the
            message names the tensor.
    """
    safetensors_numpy = require("safetensors.numpy", extra="hf", purpose="reading .safetensors checkpoints")
    directory = Path(directory)
    config = config_from_hf(json.loads((directory / "config.json").read_text()))
    tensors = safetensors_numpy.load_file(str(directory / "model.safetensors"))
    tensors = {(k[len("bert.") :] if k.startswith("bert.") else k): v for k, v in tensors.items()}
    mapping = bert_mapping(config)
    extra = sorted(set(tensors) - set(mapping) - set(IGNORED))
    if extra:
        raise ValueError(
            f"checkpoint tensors not used by the BERT mapping: {extra[:5]}{' ...' if len(extra) > 5 else ''}"
        )
    missing = sorted(set(mapping) - set(tensors))
    if missing:
        raise ValueError(f"checkpoint is missing tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    expected = jax.eval_shape(lambda: init_variables(config, 0))
    shapes = {path_str(p): (tuple(s.shape), s.dtype) for p, s in jax.tree_util.tree_leaves_with_path(expected)}
    values: dict[str, np.ndarray] = {}
    for name, (path, transform) in mapping.items():
        source = tensors[name]
        want_shape, want_dtype = shapes[path]
        try:
            array = np.asarray(transform(source), dtype=want_dtype)
        except ValueError as err:
            raise ValueError(
                f"checkpoint tensor {name} has shape {source.shape}, which does not fit {path} {want_shape}: {err}"
            ) from None
        if array.shape != want_shape:
            raise ValueError(f"checkpoint tensor {name} has shape {source.shape}; {path} needs {want_shape}")
        values[path] = array

    def leaf(p, spec):
        name = path_str(p)
        if name in values:
            return values[name]
        return np.zeros(spec.shape, spec.dtype)  # the classifier head: not in the checkpoint, unused by embeddings

    return config, jax.tree_util.tree_map_with_path(leaf, expected)
