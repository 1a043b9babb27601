"""The distillation trainer: a student learns from a teacher's outputs with the foundation's optax loop.

``distill`` trains a student model (any reference config, Linen or NNX) on a
labelled dataset against a teacher (float, quantized or pruned variables).
The teacher runs inside the jit-compiled step (``teacher_mode="online"``) or
once over the training set beforehand (``"precomputed"``). A validation split
carved from the training set is scored every epoch; early stopping keeps the
best student. With ``checkpoint=PATH`` the student, the optimizer state and
the early-stopping record are committed every epoch and at the end as an
orbax checkpoint (a directory, ``jaxopt_serve.train.checkpoint``: atomic
commits, arrays restored onto the run's shardings), and a later call with the
same path resumes where it stopped (a checkpoint that is corrupted, of another
run, or whose arrays do not fit the student is refused by name): the batch
order is a pure function of ``(seed, step)``, so a resumed run ends with
exactly the parameters of an uninterrupted one. Checkpoint files of earlier
versions (one file: JSON record, msgpack, SHA-256) still load, and the next
save replaces such a file by the directory (keeping the file as ``PATH.v2``).

Hidden-state distillation pairs student and teacher layers: an ``int`` names
an entry of the ``hidden_states`` the model sows (the Transformer encoder:
0 = embeddings, ``i`` = output of layer ``i - 1``); a ``str`` names a
submodule whose output is captured (``"dense_0"``). When widths differ a
learned linear projection maps the student's states to the teacher's width.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from jaxopt_serve.data.digits import Dataset
from jaxopt_serve.distill.losses import HIDDEN_LOSSES, check_temperature, distillation_loss
from jaxopt_serve.fileio import NotARegularFileError, RegularFile
from jaxopt_serve.models.config import ModelConfig
from jaxopt_serve.models.functional import Variables, example_input, init_variables, make_apply, predict_fn
from jaxopt_serve.quant.qarray import has_qarrays
from jaxopt_serve.train import checkpoint as ckpt
from jaxopt_serve.train.loop import TrainState, accuracy, fit, init_state
from jaxopt_serve.train.recipes import default_optimizer

Layer = int | str
CHECKPOINT_VERSION = 2  # the last single-file format (payload size and a SHA-256 trailer; 1 without): read only


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """How the student learns.

    Attributes:
        temperature: softmax temperature ``T`` of the soft term (> 0).
        alpha: weight of the soft (teacher) term; ``1 - alpha`` goes to the labels.
        hidden_pairs: ``((student_layer, teacher_layer), ...)`` to match hidden states.
        hidden_loss: ``"mse"`` or ``"cosine"``.
        hidden_weight: weight of the summed hidden-state losses.
        teacher_mode: ``"online"`` (teacher forward inside each step) or
            ``"precomputed"`` (teacher outputs computed once over the training set).
    """

    temperature: float = 2.0
    alpha: float = 0.9
    hidden_pairs: tuple[tuple[Layer, Layer], ...] = ()
    hidden_loss: Literal["mse", "cosine"] = "mse"
    hidden_weight: float = 1.0
    teacher_mode: Literal["online", "precomputed"] = "online"

    def __post_init__(self) -> None:
        check_temperature(self.temperature)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"DistillConfig.alpha must be in [0, 1], got {self.alpha!r}")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(
                f"DistillConfig.hidden_loss must be one of {sorted(HIDDEN_LOSSES)}, got {self.hidden_loss!r}"
            )
        if self.hidden_weight < 0:
            raise ValueError(f"DistillConfig.hidden_weight must be >= 0, got {self.hidden_weight!r}")
        if self.teacher_mode not in ("online", "precomputed"):
            raise ValueError(f"DistillConfig.teacher_mode must be 'online' or 'precomputed', got {self.teacher_mode!r}")
        pairs = tuple(tuple(p) for p in self.hidden_pairs)
        for pair in pairs:
            if len(pair) != 2 or not all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in pair):
                raise ValueError(
                    f"DistillConfig.hidden_pairs entries must be (student_layer, teacher_layer), got {pair!r}"
                )
        object.__setattr__(self, "hidden_pairs", pairs)


@dataclasses.dataclass
class DistillResult:
    """The distilled student.

    Attributes:
        config: the student's config.
        variables: the student variables with the best validation accuracy
            (the last ones when there is no validation split).
        final_variables: the student variables after the last step taken.
        history: one entry per log point (loss parts, validation accuracy per epoch).
        best_val_accuracy: best validation accuracy (``None`` without validation).
        stopped_early: whether early stopping ended the run.
        steps: optimizer steps taken in total.
    """

    config: ModelConfig
    variables: Variables
    final_variables: Variables
    history: list[dict[str, float]]
    best_val_accuracy: float | None
    stopped_early: bool
    steps: int


# -- forward passes that expose hidden states ---------------------------------------------------------


def _hidden_apply(config: ModelConfig, layers: Sequence[Layer]):
    """``apply(variables, x, train, rng) -> (logits, state_updates, hiddens)`` for a Linen model."""
    layers = list(layers)
    if not layers:
        plain_apply = make_apply(config)

        def plain(variables, x, *, train=False, rng=None):
            out, updates = plain_apply(variables, x, train=train, rng=rng)
            return out, updates, ()

        return plain
    if config.framework != "linen":
        raise ValueError(f"hidden-state distillation needs a Flax Linen model; {config.name!r} is {config.framework}")
    module = config.build()
    names = [layer for layer in layers if isinstance(layer, str)]

    def capture(mdl, method_name):
        return method_name == "__call__" and "/".join(mdl.path) in names

    def apply(variables, x, *, train=False, rng=None):
        mutable = [name for name in variables if name != "params"] if train else []
        rngs = {"dropout": rng} if (train and rng is not None) else {}
        out, updates = module.apply(
            variables,
            x,
            train=train,
            rngs=rngs,
            mutable=[*mutable, "intermediates"],
            capture_intermediates=capture if names else False,
        )
        updates = dict(updates)
        inter = updates.pop("intermediates", {})
        hiddens = tuple(_lookup(inter, layer, config) for layer in layers)
        return out, {k: v for k, v in updates.items() if k in mutable}, hiddens

    return apply


def _lookup(intermediates: Any, layer: Layer, config: ModelConfig) -> jax.Array:
    if isinstance(layer, int):
        sown = intermediates.get("hidden_states")
        if sown is None:
            raise ValueError(f"model {config.name!r} sows no hidden_states; name a submodule (a str layer) instead")
        if not -len(sown) <= layer < len(sown):
            raise ValueError(
                f"hidden layer {layer} does not exist in {config.name!r}: it exposes hidden_states 0..{len(sown) - 1}"
            )
        return sown[layer]
    node = intermediates
    for part in layer.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(
                f"hidden layer {layer!r} does not exist in {config.name!r} (no submodule output captured there)"
            )
        node = node[part]
    return node["__call__"][0]


def teacher_fn(config: ModelConfig, variables: Variables, layers: Sequence[Layer] = ()):
    """``f(x) -> (logits, hiddens)`` of a teacher; quantized teachers run quantized (hidden states: dequantized)."""
    from jaxopt_serve.quant.rules import dequantize_tree
    from jaxopt_serve.quant.runtime import quantized_predict_fn

    if has_qarrays(variables):
        if layers:
            apply = _hidden_apply(config, layers)
            float_variables = dequantize_tree(variables)
            return lambda x: apply(float_variables, x)[::2]
        predict = quantized_predict_fn(config, mode="auto")
        return lambda x: (predict(variables, x), ())
    apply = _hidden_apply(config, layers)
    return lambda x: apply(variables, x)[::2]


# -- checkpoints -----------------------------------------------------------------------------------


def _state_dict(state: TrainState, tracker: dict[str, Any]) -> dict[str, Any]:
    """The tree of a single-file checkpoint (the format before orbax), as it was written."""
    return {
        "step": state.step,
        "params": state.params,
        "model_state": state.model_state,
        "opt_state": state.opt_state,
        "rng": jax.random.key_data(state.rng),
        "best_params": tracker["best_params"],
        "best_state": tracker["best_state"],
    }


_BEST = ("best_params", "best_state")


def save_checkpoint(
    path: str | os.PathLike[str], state: TrainState, tracker: dict[str, Any], fingerprint: dict
) -> None:
    """Commit the run's state, its best student so far and its early-stopping record as an orbax checkpoint.

    ``path`` is a checkpoint directory (``jaxopt_serve.train.checkpoint``): each
    save is a new step directory, committed atomically, and the previous one is
    removed once it is. A ``path`` holding a checkpoint in the single-file format
    of earlier versions is kept beside it as ``PATH.v2`` and replaced by the
    directory.
    """
    path = Path(path)
    if path.is_file():  # the single-file format: keep it until the directory holds a committed step
        legacy = _legacy_backup(path)
        os.replace(path, legacy)
    record = {k: v for k, v in tracker.items() if k not in _BEST}
    extra = {k: tracker[k] for k in _BEST}
    ckpt.save_checkpoint(path, state, record=record, extra=extra, fingerprint=fingerprint)


def load_checkpoint(
    path: str | os.PathLike[str],
    template: TrainState,
    fingerprint: dict,
    *,
    allow_nonfinite: bool = False,
    shardings: Any = None,
) -> tuple[TrainState, dict]:
    """Read a checkpoint written by ``save_checkpoint`` for the same run (same student, seed and data).

    ``allow_nonfinite``: restore float arrays holding NaN or inf (refused by
    default: resuming a diverged run only repeats the divergence).
    ``shardings``: where the arrays go (``train.checkpoint.restore_checkpoint``;
    default: where the template's are). A checkpoint file in the single-file
    format of earlier versions (length, JSON record, msgpack, SHA-256) is still
    read, onto the default device.

    Raises:
        ValueError: ``path`` is not a checkpoint, or the checkpoint is
            truncated, corrupted, of another version or run, holds arrays of
            other shapes than the run's, or (by default) NaN or inf values
            (the message names the checkpoint and the array).
    """
    path = Path(path)
    if not path.is_dir():
        return _load_legacy_checkpoint(path, template, fingerprint, allow_nonfinite=allow_nonfinite)
    blank = {"best_params": template.params, "best_state": template.model_state}
    restored = ckpt.restore_checkpoint(
        path, template, extra=blank, fingerprint=fingerprint, shardings=shardings, allow_nonfinite=allow_nonfinite
    )
    tracker = dict(restored.record)
    for key in ("best_val_accuracy", "best_step", "bad_epochs", "history", "stopped_early"):
        if key not in tracker:
            raise ValueError(
                f"checkpoint {path} (step {restored.step}) is not a distillation checkpoint: its record has no {key!r}"
            )
    tracker.update(restored.extra)
    return restored.state, tracker


def _legacy_backup(path: Path) -> Path:
    """Where a single-file checkpoint is kept once the orbax directory replaces it."""
    return path.with_name(path.name + ".v2")


def _has_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds something to resume from (a single-file checkpoint, or a committed orbax step)."""
    ckpt.check_checkpoint_path(path, what="checkpoint")
    return path.is_file() or ckpt.latest_step(path) is not None


def _resume_source(path: Path) -> Path | None:
    """The checkpoint to resume from: ``path``, or the kept single-file one when a conversion did not finish."""
    if _has_checkpoint(path):
        return path
    backup = _legacy_backup(path)
    return backup if backup.is_file() else None


def _load_legacy_checkpoint(
    path: Path, template: TrainState, fingerprint: dict, *, allow_nonfinite: bool
) -> tuple[TrainState, dict]:
    """Read a single-file checkpoint (format 1 or 2: length, JSON record, msgpack payload, SHA-256 trailer)."""
    record, payload = _read_checkpoint(path)
    if record.get("fingerprint") != fingerprint:
        stored = record.get("fingerprint") if isinstance(record.get("fingerprint"), dict) else {}
        changed = sorted(k for k in fingerprint if stored.get(k) != fingerprint[k])
        raise ValueError(f"checkpoint {path} belongs to another run (differs in {changed}); use another path")
    blank = {"best_params": template.params, "best_state": template.model_state}
    expected = _state_dict(template, blank)
    try:
        restored = serialization.from_bytes(expected, payload)
    except Exception as err:  # noqa: BLE001 - msgpack and flax raise many types on malformed bytes
        raise ValueError(
            f"checkpoint {path} is corrupted: its state cannot be decoded ({type(err).__name__}: {err})"
        ) from err
    _check_state(path, expected, restored)
    if not allow_nonfinite:
        _check_finite_state(path, restored)
    state = TrainState(
        step=jnp.asarray(restored["step"]),
        params=restored["params"],
        model_state=restored["model_state"],
        opt_state=restored["opt_state"],
        rng=jax.random.wrap_key_data(jnp.asarray(restored["rng"])),
    )
    tracker = {k: v for k, v in record.items() if k not in ("version", "fingerprint", "payload_bytes")}
    tracker["best_params"], tracker["best_state"] = restored["best_params"], restored["best_state"]
    return jax.tree.map(jnp.asarray, state), tracker


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], bytes]:
    """``(record, payload)`` of a checkpoint file, its size checked against the record before the payload is read."""
    try:
        file = RegularFile(path, "checkpoint")
    except NotARegularFileError as err:
        raise ValueError(str(err)) from None
    with file:
        if file.size < 8:
            raise ValueError(f"checkpoint {path} is truncated: {file.size} bytes, not even a record length")
        size = int.from_bytes(file.read_exact(0, 8, "record length"), "little")
        if 8 + size > file.size:
            raise ValueError(
                f"checkpoint {path} is truncated or corrupted: its record needs {8 + size} bytes, "
                f"the file has {file.size}"
            )
        head = file.read_exact(8, size, "record")
        try:
            record = json.loads(head.decode("utf-8"))
        except (ValueError, RecursionError) as err:
            raise ValueError(f"checkpoint {path} cannot be read: {err}") from err
        if not isinstance(record, dict):
            raise ValueError(
                f"checkpoint {path} is corrupted: its record is a JSON {type(record).__name__}, not an object"
            )
        version = record.get("version")
        if version == 1:  # no size, no checksum: the rest of the file is the payload
            return record, file.read_exact(8 + size, file.size - 8 - size, "payload")
        if version != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint {path} has version {version!r}, expected {CHECKPOINT_VERSION}")
        payload_bytes = record.get("payload_bytes")
        if not isinstance(payload_bytes, int) or isinstance(payload_bytes, bool) or payload_bytes < 0:
            raise ValueError(
                f"checkpoint {path} is corrupted: its record field 'payload_bytes' must be a "
                f"non-negative integer, got {payload_bytes!r}"
            )
        expected = 8 + size + payload_bytes + 32
        if file.size != expected:
            what = "truncated" if file.size < expected else "corrupted"
            raise ValueError(f"checkpoint {path} is {what}: expected {expected} bytes, found {file.size}")
        payload = file.read_exact(8 + size, payload_bytes, "payload")
        stored = file.read_exact(expected - 32, 32, "checksum")
    if hashlib.sha256(len(head).to_bytes(8, "little") + head + payload).digest() != stored:
        raise ValueError(f"checkpoint {path} is corrupted: SHA-256 checksum mismatch")
    return record, payload


def _check_state(path: str | os.PathLike[str], expected: Any, restored: Any) -> None:
    """Every restored leaf an array of its template's shape and dtype (``ValueError`` naming the file and leaf)."""
    want = jax.tree_util.tree_leaves_with_path(expected)
    try:
        have = jax.tree_util.tree_structure(expected).flatten_up_to(restored)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"checkpoint {path} is corrupted: its state has another structure than the run's ({err})"
        ) from err
    for (key, leaf), got in zip(want, have):
        name = jax.tree_util.keystr(key)
        shape, dtype = np.shape(leaf), np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype))
        if not isinstance(got, (np.ndarray, np.generic, jax.Array)) or np.shape(got) != shape or got.dtype != dtype:
            kind = f"{got.dtype}{list(np.shape(got))}" if hasattr(got, "dtype") else type(got).__name__
            raise ValueError(f"checkpoint {path} is corrupted: {name} is {kind}, the run expects {dtype}{list(shape)}")


def _check_finite_state(path: str | os.PathLike[str], restored: Any) -> None:
    """``ValueError`` naming the file and the first float leaf of ``restored`` that holds NaN or inf."""
    for key, leaf in jax.tree_util.tree_leaves_with_path(restored):
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.floating) and not np.isfinite(leaf).all():
            raise ValueError(
                f"checkpoint {path}: {jax.tree_util.keystr(key)} holds non-finite values (NaN or inf); "
                "load_checkpoint(..., allow_nonfinite=True) restores it anyway"
            )


# -- the trainer -----------------------------------------------------------------------------------------


def validation_split(dataset: Dataset, fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """``(x_train, y_train, x_val, y_val)``: a seeded ``fraction`` of the training set held out."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction!r}")
    n = len(dataset.x_train)
    order = np.random.default_rng([seed, 7919]).permutation(n)
    n_val = int(round(fraction * n))
    val, train = order[:n_val], order[n_val:]
    return dataset.x_train[train], dataset.y_train[train], dataset.x_train[val], dataset.y_train[val]


def distill(
    teacher_config: ModelConfig,
    teacher_variables: Variables,
    student_config: ModelConfig,
    dataset: Dataset,
    *,
    student_variables: Variables | None = None,
    config: DistillConfig | None = None,
    steps: int = 1000,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    optimizer: optax.GradientTransformation | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    patience: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> DistillResult:
    """Train ``student_config``'s model to mimic the teacher on ``dataset``.

    Args:
        teacher_config, teacher_variables: the teacher (float, quantized or pruned variables).
        student_config: the student's model; ``student_variables`` (default: a
            fresh init with ``seed``) are where training starts.
        dataset: labelled data (``x_train``, ``y_train``; the test split is not touched).
        config: losses and teacher mode (``DistillConfig``).
        steps: total optimizer steps (counting a resumed checkpoint's).
        batch_size: examples per step.
        learning_rate, optimizer: ``default_optimizer(steps, learning_rate)`` unless an optimizer is given.
        seed: student init, batch order, validation split.
        val_fraction: share of the training set held out for per-epoch validation (0: none).
        patience: stop after this many epochs without a better validation accuracy.
        checkpoint: checkpoint directory, committed every epoch and at the end; resumed from
            when it holds a checkpoint of this run (a single-file checkpoint of earlier versions too).
        progress: show a progress bar.

    Raises:
        ValueError: teacher and student output sizes differ, a hidden layer
            does not exist, a bad temperature, or a checkpoint of another run.

    Example:
        >>> from jaxopt_serve.data import load_digits
        >>> from jaxopt_serve.models import MLPConfig, init_variables
        >>> data = load_digits()
        >>> teacher = MLPConfig(features=(32,))
        >>> student = MLPConfig(features=(8,))
        >>> result = distill(teacher, init_variables(teacher, 0), student, data, steps=20, progress=False)
        >>> result.config == student, result.steps
        (True, 20)
    """
    cfg = config or DistillConfig()
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    pairs = cfg.hidden_pairs
    student_layers = [s for s, _ in pairs]
    teacher_layers = [t for _, t in pairs]
    x_train, y_train, x_val, y_val = validation_split(dataset, val_fraction, seed)
    if student_variables is None:
        student_variables = init_variables(student_config, seed, dataset.input_shape)

    teacher = teacher_fn(teacher_config, teacher_variables, teacher_layers)
    student_apply = _hidden_apply(student_config, student_layers)
    example = example_input(student_config, 2, dataset.input_shape)
    t_logits, t_hidden = jax.eval_shape(teacher, example)
    s_logits, _, s_hidden = jax.eval_shape(lambda v, x: student_apply(v, x), student_variables, example)
    if t_logits.shape[-1] != s_logits.shape[-1]:
        raise ValueError(
            f"teacher {teacher_config.name!r} has {t_logits.shape[-1]} outputs, student {student_config.name!r} has "
            f"{s_logits.shape[-1]}: distillation needs the same output size"
        )
    projections = {}
    for i, ((s_layer, t_layer), s, t) in enumerate(zip(pairs, s_hidden, t_hidden)):
        if s.shape[:-1] != t.shape[:-1]:
            raise ValueError(
                f"hidden pair {i} ({s_layer!r}, {t_layer!r}): student states {s.shape} and teacher "
                f"states {t.shape} differ before the feature axis"
            )
        if s.shape[-1] != t.shape[-1]:
            key = jax.random.fold_in(jax.random.key(seed), 1000 + i)
            projections[f"pair_{i}"] = {
                "kernel": jax.random.normal(key, (s.shape[-1], t.shape[-1])) / np.sqrt(s.shape[-1]),
                "bias": jnp.zeros((t.shape[-1],)),
            }
    hidden_loss = HIDDEN_LOSSES[cfg.hidden_loss]

    def project(params, i, h):
        p = params["proj"].get(f"pair_{i}")
        return h if p is None else h @ p["kernel"] + p["bias"]

    def loss_fn(params, model_state, batch, rng):
        x, labels, *teacher_out = batch
        if cfg.teacher_mode == "online":
            logits_t, hidden_t = teacher(x)
        else:
            logits_t, hidden_t = teacher_out[0], tuple(teacher_out[1:])
        logits_t = jax.lax.stop_gradient(logits_t)
        logits, updates, hidden = student_apply({"params": params["student"], **model_state}, x, train=True, rng=rng)
        loss, parts = distillation_loss(logits, logits_t, labels, temperature=cfg.temperature, alpha=cfg.alpha)
        metrics = {"loss": loss, **parts, "accuracy": (logits.argmax(-1) == labels).mean()}
        if pairs:
            h_loss = sum(
                hidden_loss(project(params, i, h), jax.lax.stop_gradient(t))
                for i, (h, t) in enumerate(zip(hidden, hidden_t))
            )
            loss = loss + cfg.hidden_weight * h_loss
            metrics["hidden"] = h_loss
            metrics["loss"] = loss
        return loss, ({**model_state, **updates}, metrics)

    data = [x_train, y_train]
    if cfg.teacher_mode == "precomputed":
        data += _precompute(teacher, x_train)
    variables = {
        "params": {"student": student_variables["params"], "proj": projections},
        **{k: v for k, v in student_variables.items() if k != "params"},
    }
    optimizer = optimizer or default_optimizer(steps, learning_rate=learning_rate)
    steps_per_epoch = max(1, len(x_train) // batch_size)
    fingerprint = {
        "student": student_config.to_dict(),
        "teacher": teacher_config.to_dict(),
        "seed": seed,
        "batch_size": batch_size,
        "val_fraction": val_fraction,
        "distill": dataclasses.asdict(cfg),
        "train_examples": int(len(x_train)),
    }
    fingerprint = json.loads(json.dumps(fingerprint))
    template = init_state(variables, optimizer, seed=seed)
    tracker: dict[str, Any] = {
        "best_val_accuracy": None,
        "best_step": 0,
        "bad_epochs": 0,
        "history": [],
        "stopped_early": False,
        "best_params": template.params,
        "best_state": template.model_state,
    }
    state = None
    source = _resume_source(Path(checkpoint)) if checkpoint is not None else None
    if source is not None:
        state, tracker = load_checkpoint(source, template, fingerprint)
    if tracker["stopped_early"] or (state is not None and int(state.step) >= steps):
        return _result(student_config, state, tracker)
    student_predict = predict_fn(student_config)

    def on_log(train_state: TrainState, entry: dict[str, float]) -> bool:
        done = int(train_state.step)
        stop = False
        if val_fraction > 0 and done % steps_per_epoch == 0:
            current = {"params": train_state.params["student"], **train_state.model_state}
            acc = accuracy(student_predict, current, x_val, y_val)
            entry["val_accuracy"] = acc
            if tracker["best_val_accuracy"] is None or acc > tracker["best_val_accuracy"]:
                tracker.update(
                    best_val_accuracy=acc,
                    best_step=done,
                    bad_epochs=0,
                    best_params=train_state.params,
                    best_state=train_state.model_state,
                )
            else:
                tracker["bad_epochs"] += 1
                stop = patience is not None and tracker["bad_epochs"] >= patience
        tracker["stopped_early"] = stop
        tracker["history"].append(dict(entry))
        if checkpoint is not None:
            save_checkpoint(checkpoint, train_state, tracker, fingerprint)
        return stop

    result = fit(
        loss_fn,
        variables,
        data,
        optimizer=optimizer,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        state=state if state is not None else template,
        log_every=steps_per_epoch,
        progress=progress,
        on_log=on_log,
    )
    return _result(student_config, result.state, tracker)


def _result(student_config: ModelConfig, state: TrainState, tracker: dict[str, Any]) -> DistillResult:
    final = {"params": state.params["student"], **state.model_state}
    if tracker["best_val_accuracy"] is not None:
        best = {"params": tracker["best_params"]["student"], **tracker["best_state"]}
    else:
        best = final
    return DistillResult(
        student_config,
        best,
        final,
        tracker["history"],
        tracker["best_val_accuracy"],
        bool(tracker["stopped_early"]),
        int(state.step),
    )


def _precompute(teacher: Callable, x: np.ndarray, batch_size: int = 256) -> list[np.ndarray]:
    """Teacher logits (and hidden states) for every row of ``x``, in fixed-size jitted batches."""
    jitted = jax.jit(teacher)
    outputs: list[list[np.ndarray]] = []
    for start in range(0, len(x), batch_size):
        chunk = np.asarray(x[start : start + batch_size])
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), chunk.dtype)])
        logits, hidden = jitted(chunk)
        outputs.append([np.asarray(a)[:n] for a in (logits, *hidden)])
    return [np.concatenate(parts) for parts in zip(*outputs)]
