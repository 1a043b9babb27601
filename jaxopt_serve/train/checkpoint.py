"""Training checkpoints on orbax: a ``TrainState`` (and any extra pytree) with a JSON record, committed atomically.

A checkpoint is a directory. It holds a marker file (``jaxopt_serve_checkpoint.json``,
written before anything else, so a directory without it is never taken for a
checkpoint) and one orbax step directory per save (``27/``, named after the
state's step) with two items: ``arrays`` (every array of the state, orbax's
``StandardSave``) and ``record`` (JSON: the format version, the run's
fingerprint and whatever the caller records, e.g. a metrics history). Orbax
writes each step under a temporary name and renames it when complete, and the
older step is deleted only after the new one is committed, so a save killed
at any point leaves the previous checkpoint readable.

Restoring compares the record's fingerprint with the run's, then the stored
shapes and dtypes with the template's (a checkpoint of another model is
refused by leaf name before any array is read), then reads every array
straight onto its sharding: the template's (arrays already placed on a mesh
come back placed the same way) or the ``shardings`` given. Values come back
bit for bit, so a resumed run ends exactly where an uninterrupted one does
(the batch order is a pure function of ``(seed, step)``). Float arrays holding
NaN or inf are refused unless ``allow_nonfinite=True``: resuming a diverged
run only repeats the divergence. Every failure is a ``ValueError`` naming the
checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_serve.train.loop import TrainState

FORMAT = "jaxopt_serve.checkpoint"
FORMAT_VERSION = 3  # 1 and 2: the distillation trainer's single-file format (still read by ``distill.load_checkpoint``)
MARKER = "jaxopt_serve_checkpoint.json"


@dataclasses.dataclass(frozen=True)
class Restored:
    """What ``restore_checkpoint`` returns.

    Attributes:
        state: the ``TrainState``, its arrays on the template's (or the given) shardings.
        record: the JSON record saved with it (without the format fields).
        extra: the extra pytree (``None`` when none was asked for).
        step: the step of the checkpoint read (the newest committed one).
    """

    state: TrainState
    record: dict[str, Any]
    extra: Any
    step: int


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a checkpoint directory (it has the marker; it may not hold a committed step yet)."""
    return (Path(path) / MARKER).is_file()


def check_checkpoint_path(path: str | os.PathLike[str], *, what: str = "checkpoint") -> None:
    """``ValueError`` unless ``path`` is missing, a checkpoint directory, or a regular file (the older format).

    ``what`` names the path in the message (a command-line flag, say).
    """
    path = Path(path)
    if path.is_dir() and not is_checkpoint(path):
        raise ValueError(
            f"{what} {path} is a directory that holds no checkpoint (no {MARKER}); "
            "give a new path or the directory of a checkpoint"
        )
    if path.exists() and not path.is_dir() and not path.is_file():
        raise ValueError(f"{what} {path} exists and is neither a checkpoint directory nor a regular file")


def latest_step(path: str | os.PathLike[str]) -> int | None:
    """The newest committed step of the checkpoint at ``path``; ``None`` when there is none (or no checkpoint)."""
    path = Path(path)
    if not is_checkpoint(path):
        return None
    steps = _committed_steps(path)
    return steps[-1] if steps else None


def save_checkpoint(
    path: str | os.PathLike[str],
    state: TrainState,
    *,
    record: Mapping[str, Any] | None = None,
    extra: Any = None,
    fingerprint: Mapping[str, Any] | None = None,
) -> Path:
    """Commit ``state`` (and ``extra``, a pytree of arrays) with a JSON ``record`` as the newest step of ``path``.

    Args:
        path: the checkpoint directory; created (with its marker) when missing.
        state: the training state; its ``step`` names the step directory.
        record: JSON-serializable values saved with the arrays (a history, counters).
        extra: another pytree of arrays saved with the state (e.g. the best parameters so far).
        fingerprint: what identifies the run (seed, model, data); ``restore_checkpoint``
            refuses a checkpoint whose fingerprint differs from the one it is given.

    Returns:
        The directory of the committed step.

    Raises:
        ValueError: ``path`` exists and is not a checkpoint directory.

    Example:
        >>> import tempfile, optax
        >>> from jaxopt_serve.train import init_state
        >>> state = init_state({"params": {"w": jnp.ones((2, 3))}}, optax.sgd(0.1))
        >>> root = Path(tempfile.mkdtemp()) / "run"
        >>> save_checkpoint(root, state, record={"note": "x"}).name
        '0'
        >>> restore_checkpoint(root, state).record
        {'note': 'x'}
    """
    import orbax.checkpoint as ocp

    path = Path(path)
    _create(path)
    full_record = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "fingerprint": json.loads(json.dumps(dict(fingerprint or {}))),
        **(record or {}),
    }
    json.dumps(full_record)  # a value JSON cannot hold fails here, before anything is written
    arrays = _nested(_storable(state, extra))
    step = int(state.step)
    with _manager(path) as manager:
        if step in manager.all_steps():  # the same step again (a rerun of a finished save): replace it
            manager.delete(step)
        manager.save(
            step,
            args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), record=ocp.args.JsonSave(full_record)),
            force=True,
        )
        manager.wait_until_finished()
    return path / str(step)


def restore_checkpoint(
    path: str | os.PathLike[str],
    template: TrainState,
    *,
    extra: Any = None,
    fingerprint: Mapping[str, Any] | None = None,
    shardings: Any = None,
    allow_nonfinite: bool = False,
) -> Restored:
    """Read the newest committed step of ``path`` into the structure, shapes and shardings of ``template``.

    Args:
        path: a checkpoint directory written by ``save_checkpoint``.
        template: a ``TrainState`` of the run (e.g. ``init_state(variables, optimizer)``):
            its structure, shapes and dtypes must match the checkpoint's.
        extra: the template of the extra pytree saved with the state (``None``: none is read).
        fingerprint: when given, must equal the one saved (the same run).
        shardings: where the arrays go: ``None`` (each array where the template's
            is: its ``sharding`` for a ``jax.Array``, the default device otherwise),
            one ``jax.sharding.Sharding`` for every array, or a pytree of shardings
            with the structure of ``template`` (with ``extra``: of ``(template, extra)``).
        allow_nonfinite: restore float arrays holding NaN or inf (refused by default).

    Raises:
        ValueError: ``path`` is not a checkpoint or holds no committed step; its
            record is unreadable, of another format version or of another run;
            an array is missing, extra, or of another shape or dtype than the
            template's; an array cannot be read; or (by default) NaN or inf values.
            The message names the checkpoint (and the array).
    """
    import orbax.checkpoint as ocp

    path = Path(path)
    if path.is_file():
        raise ValueError(
            f"checkpoint {path} is a single file (the format before orbax checkpoints); "
            "jaxopt_serve.distill.load_checkpoint reads it"
        )
    check_checkpoint_path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    steps = _committed_steps(path)
    if not steps:
        raise ValueError(
            f"checkpoint {path} holds no committed step (its first save did not finish); "
            "delete the directory to start over"
        )
    step = steps[-1]
    where = f"checkpoint {path} (step {step})"
    want = _storable(template, extra)
    flat_want = _flat_specs(want)
    with _manager(path) as manager:
        try:
            record = manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]
        except Exception as err:  # noqa: BLE001 - orbax and the JSON reader raise many types
            raise ValueError(f"{where} has an unreadable record: {_first_line(err)}") from err
        record = _check_record(where, record, fingerprint)
        try:
            metadata = manager.item_metadata(step)["arrays"]
            metadata = getattr(metadata, "tree", metadata)
            stored = _flat_metadata(metadata)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"{where} has unreadable array metadata: {_first_line(err)}") from err
        unread = extra is None and isinstance(metadata, Mapping) and "1" in metadata  # saved extras not asked for
        _check_specs(where, flat_want, {k: v for k, v in stored.items() if not (unread and k.startswith("1/"))})
        targets = _targets(want, template, extra, shardings)
        target = _nested(targets)
        if unread:  # read onto the host and dropped: orbax restores whole trees
            host = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            target["1"] = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=host), metadata["1"]
            )
        try:
            restored = manager.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(target)))["arrays"]
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"{where}: its arrays cannot be read ({type(err).__name__}: {_first_line(err)})") from err
    leaves = _lookup_leaves(where, restored, want)
    for (key, _), leaf, spec in zip(flat_want, leaves, jax.tree.leaves(targets)):
        if tuple(leaf.shape) != tuple(spec.shape) or leaf.dtype != spec.dtype:
            raise ValueError(
                f"{where}: {_display(key)} came back as {leaf.dtype}{list(leaf.shape)}, "
                f"expected {spec.dtype}{list(spec.shape)}"
            )
        if not allow_nonfinite and jnp.issubdtype(leaf.dtype, jnp.floating) and not bool(jnp.isfinite(leaf).all()):
            raise ValueError(
                f"{where}: {_display(key)} holds non-finite values (NaN or inf); "
                "restore with allow_nonfinite=True to read it anyway"
            )
    state_part, extra_part = jax.tree.unflatten(jax.tree.structure(want), leaves)
    state = state_part._replace(rng=jax.random.wrap_key_data(state_part.rng, impl=jax.random.key_impl(template.rng)))
    return Restored(state=state, record=record, extra=extra_part, step=step)


# -- helpers -------------------------------------------------------------------------------------------


def _create(path: Path) -> None:
    """Make ``path`` a checkpoint directory: the marker is in place before the directory appears under its name."""
    check_checkpoint_path(path)
    if path.is_file():
        raise ValueError(
            f"checkpoint {path} is a file in the format before orbax checkpoints; "
            "save to another path (the old file can still be read)"
        )
    if path.is_dir():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        (staging / MARKER).write_text(
            json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "written_by": "jaxopt_serve (orbax checkpoint)"})
            + "\n"
        )
        os.chmod(staging, 0o777 & ~_umask())
        os.rename(staging, path)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not is_checkpoint(path):  # another process may have created it meanwhile
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _manager(path: Path):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, create=False, enable_async_checkpointing=False, cleanup_tmp_directories=True
    )
    handlers = {"arrays": ocp.StandardCheckpointHandler(), "record": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(path.absolute(), options=options, item_handlers=handlers)


def _committed_steps(path: Path) -> list[int]:
    """The committed step directories of ``path`` (orbax renames a step to its number only once it is complete)."""
    steps = []
    for entry in path.iterdir():
        name = entry.name
        if entry.is_dir() and name.isdigit() and (name == "0" or not name.startswith("0")):
            steps.append(int(name))
    return sorted(steps)


def _storable(state: TrainState, extra: Any) -> tuple[TrainState, Any]:
    """``(state, extra)`` with the typed PRNG key as its raw ``uint32`` data (what array storage holds)."""
    return state._replace(rng=jax.random.key_data(state.rng)), extra


def _name(entry: Any) -> str:
    if isinstance(entry, jax.tree_util.DictKey):
        text = str(entry.key)
    elif isinstance(entry, jax.tree_util.GetAttrKey):
        text = entry.name
    elif isinstance(entry, jax.tree_util.SequenceKey):
        text = str(entry.idx)
    elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
        text = str(entry.key)
    else:
        text = str(entry)
    # orbax joins names with dots; escape them (and the escape character) so that names stay apart
    return text.replace("%", "%25").replace(".", "%2E").replace("/", "%2F") or "%"


def _names(tree: Any) -> list[tuple[str, ...]]:
    return [tuple(_name(e) for e in key) for key, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _nested(tree: Any) -> dict[str, Any]:
    """The leaves of ``tree`` as nested dicts of plain string keys (what orbax stores), by their path names."""
    out: dict[str, Any] = {}
    for names, leaf in zip(_names(tree), jax.tree.leaves(tree)):
        node = out
        for part in names[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"two leaves share the path name {'/'.join(names)}; cannot checkpoint them apart")
        if names[-1] in node:
            raise ValueError(f"two leaves share the path name {'/'.join(names)}; cannot checkpoint them apart")
        node[names[-1]] = leaf
    return out


def _flat_specs(tree: Any) -> list[tuple[str, tuple[tuple[int, ...], np.dtype]]]:
    return [
        ("/".join(names), (tuple(np.shape(leaf)), np.dtype(leaf.dtype)))
        for names, leaf in zip(_names(tree), jax.tree.leaves(tree))
    ]


def _flat_metadata(metadata: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    flat: dict[str, tuple[tuple[int, ...], np.dtype]] = {}

    def visit(prefix: tuple[str, ...], node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                visit((*prefix, str(key)), value)
        elif node is not None:
            flat["/".join(prefix)] = (tuple(node.shape), np.dtype(node.dtype))

    visit((), metadata)
    return flat


def _check_record(where: str, record: Any, fingerprint: Mapping[str, Any] | None) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ValueError(f"{where} is corrupted: its record is a JSON {type(record).__name__}, not an object")
    if record.get("format") != FORMAT or record.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{where} has format {record.get('format')!r} version {record.get('version')!r}; "
            f"this version of jaxopt_serve reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    stored = record.get("fingerprint")
    if fingerprint is not None:
        wanted = json.loads(json.dumps(dict(fingerprint)))
        if stored != wanted:
            stored = stored if isinstance(stored, dict) else {}
            changed = sorted(k for k in {*wanted, *stored} if stored.get(k) != wanted.get(k))
            raise ValueError(f"{where} belongs to another run (differs in {changed}); use another path")
    return {k: v for k, v in record.items() if k not in ("format", "version", "fingerprint")}


def _check_specs(where: str, want: list[tuple[str, Any]], stored: dict[str, Any]) -> None:
    names = {name for name, _ in want}
    for name, (shape, dtype) in want:
        if name not in stored:
            raise ValueError(f"{where} does not fit the run: it has no array {_display(name)}")
        got_shape, got_dtype = stored[name]
        if got_shape != shape or got_dtype != dtype:
            raise ValueError(
                f"{where} does not fit the run: {_display(name)} is {got_dtype}{list(got_shape)}, "
                f"the run expects {dtype}{list(shape)}"
            )
    extra = sorted(set(stored) - names)
    if extra:
        raise ValueError(
            f"{where} does not fit the run: it has arrays the run does not ({[_display(name) for name in extra[:3]]})"
        )


def _default_sharding(leaf: Any) -> jax.sharding.Sharding:
    if isinstance(leaf, jax.Array) and not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return leaf.sharding
    if isinstance(leaf, jax.Array):  # a typed key: its raw data has one more axis; keep it on the same devices
        sharding = leaf.sharding
        if isinstance(sharding, jax.sharding.NamedSharding):
            return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        return sharding
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _targets(want: Any, template: TrainState, extra: Any, shardings: Any) -> Any:
    """``want``'s leaves as ``jax.ShapeDtypeStruct`` s with the shardings to restore onto."""
    if shardings is None:
        source = (template, extra)
        per_leaf = [_default_sharding(leaf) for leaf in jax.tree.leaves(source)]
    elif isinstance(shardings, jax.sharding.Sharding):
        per_leaf = [shardings] * len(jax.tree.leaves(want))
    else:
        given = shardings if extra is not None else (shardings, None)
        per_leaf = jax.tree.leaves(given, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        if len(per_leaf) != len(jax.tree.leaves(want)) or not all(
            isinstance(s, jax.sharding.Sharding) for s in per_leaf
        ):
            raise ValueError(
                f"shardings must be one Sharding or a pytree of them shaped like the template "
                f"({len(jax.tree.leaves(want))} leaves), got {len(per_leaf)} leaves"
            )
    leaves = jax.tree.leaves(want)
    specs = [jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=s) for leaf, s in zip(leaves, per_leaf)]
    return jax.tree.unflatten(jax.tree.structure(want), specs)


def _lookup_leaves(where: str, restored: Any, want: Any) -> list[Any]:
    leaves = []
    for names in _names(want):
        node = restored
        for part in names:
            if not isinstance(node, Mapping) or part not in node:
                raise ValueError(f"{where}: array {_display('/'.join(names))} is missing from what was read")
            node = node[part]
        leaves.append(node)
    return leaves


def _display(name: str) -> str:
    """A stored array's name as the caller knows it: ``params/...`` for the state, ``extra/...`` for the extra tree."""
    head, _, rest = name.partition("/")
    return {"0": rest, "1": f"extra/{rest}"}.get(head, name)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__
