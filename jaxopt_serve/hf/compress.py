"""Smaller sentence encoders: layer-dropped students and embedding distillation.

``layer_student`` keeps a subset of an encoder's layers (DistilBERT-style
initialization: the student starts as a truncated teacher). Head and
feed-forward pruning is ``prune.structured_prune`` on the encoder's config
(groups ``layer_i/heads`` and ``layer_i/ffn``). Either way the smaller model
is then trained to reproduce the teacher's sentence embeddings:

.. math::

    L = 1 - \\cos(e_{student}(x), e_{teacher}(x)),

averaged over a batch of corpus sentences (``corpus.text_corpus`` ships
one). Teacher embeddings are computed once, before training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax

from jaxopt_serve.distill.losses import hidden_cosine
from jaxopt_serve.hf.sentence import SentenceEncoder, encode_fn
from jaxopt_serve.models.functional import Variables
from jaxopt_serve.models.transformer import TransformerConfig
from jaxopt_serve.train.loop import FitResult, fit


def layer_student(
    config: TransformerConfig, variables: Variables, layers: Sequence[int]
) -> tuple[TransformerConfig, Variables]:
    """A student of the teacher's ``layers`` (in that order), with the teacher's embeddings and head.

    Example:
        >>> from jaxopt_serve.models import TransformerConfig, init_variables
        >>> cfg = TransformerConfig(num_layers=4)
        >>> small, v = layer_student(cfg, init_variables(cfg, 0), [0, 2])
        >>> small.num_layers, sorted(k for k in v["params"] if k.startswith("layer_"))
        (2, ['layer_0', 'layer_1'])
    """
    layers = [int(i) for i in layers]
    if not layers:
        raise ValueError("layer_student needs at least one layer")
    bad = [i for i in layers if not 0 <= i < config.num_layers]
    if bad or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct indices in [0, {config.num_layers}), got {layers}")

    def per_layer(value: int | tuple[int, ...]) -> int | tuple[int, ...]:
        return tuple(value[i] for i in layers) if isinstance(value, tuple) else value

    student = config.replace(
        num_layers=len(layers),
        num_heads=per_layer(config.num_heads),
        mlp_dim=per_layer(config.mlp_dim),
        head_dim=config.resolved_head_dim,
    )
    params = {k: v for k, v in variables["params"].items() if not k.startswith("layer_")}
    params.update({f"layer_{j}": variables["params"][f"layer_{i}"] for j, i in enumerate(layers)})
    return student, {**variables, "params": params}


def distill_embeddings(
    teacher: SentenceEncoder,
    student_config: TransformerConfig,
    student_variables: Variables,
    sentences: Sequence[str],
    *,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 1e-4,
    max_tokens: int = 64,
    freeze_embeddings: bool = True,
    seed: int = 0,
    log_every: int = 50,
    eval_fn: Callable[[Variables], dict[str, float]] | None = None,
    progress: bool = False,
) -> FitResult:
    """Train ``student_variables`` so the student's sentence embeddings match ``teacher``'s on ``sentences``.

    Args:
        teacher: the float encoder whose embeddings are the targets.
        student_config, student_variables: the smaller encoder (same hidden size
            and tokenizer), e.g. from ``layer_student`` or ``structured_prune``.
        sentences: the training corpus (e.g. ``corpus.text_corpus()``).
        steps, batch_size, learning_rate, seed, log_every, eval_fn, progress: as ``train.fit``
            (Adam with a linear warm-up over the first tenth of the steps, then cosine decay).
        max_tokens: sentences are truncated to this many tokens for training.
        freeze_embeddings: keep the token, position and type embeddings fixed.

    Returns:
        ``FitResult``; its history holds ``loss`` (``1 - cosine``) per log point.
    """
    if student_config.hidden_size != teacher.config.hidden_size:
        raise ValueError(
            f"the student's hidden_size ({student_config.hidden_size}) must equal the teacher's "
            f"({teacher.config.hidden_size}): embeddings are compared directly"
        )
    if max_tokens <= 2:
        raise ValueError(f"max_tokens must be > 2 (room for [CLS] and [SEP]), got {max_tokens}")
    ids, mask = teacher.tokenize(list(sentences))
    ids, mask = ids[:, :max_tokens], mask[:, :max_tokens]
    targets = teacher.embed_tokens(ids, mask, batch_size=batch_size)
    student = encode_fn(student_config, teacher.pooling, teacher.normalize, "weight_only", quantized=False)

    def loss_fn(params: Any, model_state: Variables, batch: tuple[jax.Array, ...], rng: jax.Array):
        del rng
        tokens, attention, target = batch
        loss = hidden_cosine(student({"params": params, **model_state}, tokens, attention), target)
        return loss, (model_state, {"loss": loss})

    optimizer = student_optimizer(
        student_variables["params"], learning_rate, steps, freeze_embeddings=freeze_embeddings
    )
    return fit(
        loss_fn,
        student_variables,
        (ids, mask, targets),
        optimizer=optimizer,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        log_every=log_every,
        eval_fn=eval_fn,
        progress=progress,
    )


def student_optimizer(
    params: Any, learning_rate: float, steps: int, *, freeze_embeddings: bool = True
) -> optax.GradientTransformation:
    """Adam with a linear warm-up (a tenth of ``steps``) and cosine decay for a BERT student's ``params``.

    With ``freeze_embeddings`` the token, position and type embedding tables get no updates.

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"word_embeddings": {"embedding": jnp.ones((3, 2))}, "dense": {"kernel": jnp.ones((2, 2))}}
        >>> opt = student_optimizer(params, 1e-2, 10)
        >>> updates, _ = opt.update(params, opt.init(params), params)
        >>> float(abs(updates["word_embeddings"]["embedding"]).max())
        0.0
    """
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, steps // 10), max(steps, 2))
    optimizer = optax.adam(schedule)
    if not freeze_embeddings:
        return optimizer
    frozen = ("word_embeddings", "position_embeddings", "token_type_embeddings")
    labels = {k: jax.tree.map(lambda _, k=k: "frozen" if k in frozen else "train", v) for k, v in params.items()}
    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


def embedding_agreement(reference: np.ndarray, embeddings: np.ndarray) -> dict[str, float]:
    """Mean and minimum cosine, and top-1 nearest-neighbour agreement, of ``embeddings`` with ``reference``.

    Both are ``(n, d)`` L2-normalized rows; the nearest neighbour of a row is the
    most similar *other* row.

    Example:
        >>> e = np.eye(3, dtype=np.float32)
        >>> embedding_agreement(e, e)
        {'mean_cosine': 1.0, 'min_cosine': 1.0, 'top1_agreement': 1.0}
    """
    if reference.shape != embeddings.shape:
        raise ValueError(f"embeddings of shape {embeddings.shape} cannot be compared with {reference.shape}")
    cosine = (reference * embeddings).sum(-1)
    ref_sim, sim = reference @ reference.T, embeddings @ embeddings.T
    np.fill_diagonal(ref_sim, -np.inf)
    np.fill_diagonal(sim, -np.inf)
    top1 = float((ref_sim.argmax(1) == sim.argmax(1)).mean())
    return {"mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()), "top1_agreement": top1}
