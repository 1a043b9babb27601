"""An inference server: the Open Inference Protocol (KServe v2) over HTTP, on Starlette and uvicorn.

Needs the ``serve`` extra (``pip install 'jaxopt_serve[serve]'``). Several
models in one server, each a ``ServedModel`` with its own dynamic batcher and
engine; requests are awaited on the event loop through the batcher's asyncio
path (no thread per request or connection).

Routes:
    ``GET  /v2/health/live``            200 while the process serves.
    ``GET  /v2/health/ready``           200, or 503 while draining.
    ``GET  /v2``                        server metadata.
    ``GET  /v2/models/{name}``          model metadata: input and output tensors.
    ``GET  /v2/models/{name}/ready``    200, 503 while draining, 404 for an unknown model.
    ``POST /v2/models/{name}/infer``    named tensors in, named tensors out (``jaxopt_serve.serve.protocol``:
                                        JSON, or the binary tensor extension for large inputs).
    ``GET  /metrics``                   Prometheus text (``jaxopt_serve.serve.prometheus``).

Every error is JSON ``{"error": reason}``: 400 (malformed JSON, NaN or
Infinity tokens, numbers that overflow the datatype, booleans for numbers,
wrong tensor names, datatype or shape, a non-finite value under
``nan_policy="error"``, a request line or headers the parser refuses, such
as two different ``Content-Length`` s), 404 (unknown model or route), 405
(wrong method, with ``Allow``), 408 (the request line, headers or body did not
arrive within ``read_timeout_s``; the connection is closed), 413 (body over
``max_body_bytes``; the body is read and discarded first, up to
``discard_limit_bytes``, so that a client that sends it all before reading sees
the 413 rather than a reset), 429 (the model's queue is full; ``Retry-After``),
431 (headers over ``max_header_bytes``), 500 (the model failed), 503 (draining;
``Retry-After``), 504 (the request waited in the queue past ``timeout_s``).

Graceful drain: ``stop()``, or SIGTERM/SIGINT under ``serve_forever()``, stops
readiness, answers new requests 503 with ``Connection: close``, lets every
accepted request finish (its response also closes the connection), waits
``drain_grace_s`` after the last one so that keep-alive clients learn to go
away, then closes the remaining idle connections and the batchers. A second
SIGINT exits at once.

Put a reverse proxy (TLS, authentication) in front for anything beyond a trusted network.
"""

from __future__ import annotations

import asyncio
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxopt_serve.engine.nonfinite import NanPolicy, check_policy, nonfinite_error, nonfinite_rows
from jaxopt_serve.engine.pytrees import axes_per_leaf, batch_rows, slash_names
from jaxopt_serve.extras import require
from jaxopt_serve.serve.batcher import Closed, DynamicBatcher, Overloaded, RequestTimeout
from jaxopt_serve.serve.protocol import (
    BYTES,
    HEADER_LENGTH,
    ProtocolError,
    TensorSpec,
    datatype_of,
    decode_request,
    encode_response,
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_JSON = b"application/json"
_OCTETS = b"application/octet-stream"


def _require_serve() -> tuple[Any, Any]:
    starlette = require("starlette", extra="serve", purpose="the inference server (Starlette)")
    uvicorn = require("uvicorn", extra="serve", purpose="the inference server (uvicorn)")
    require("prometheus_client", extra="serve", purpose="the server's Prometheus metrics")
    return starlette, uvicorn


# ---------------------------------------------------------------------------------------------- models


def check_model_name(name: Any, *, what: str = "model name") -> str:
    """``name`` itself, or ``ValueError`` when it cannot be a model's name in the URL."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"{what} {name!r} must be 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


class ServedModel:
    """One model of a server: a name, an engine behind its own dynamic batcher, and its tensors.

    Inputs and outputs are named after the engine's pytrees: a model with one
    array input takes ``"input"`` and one array output gives ``"output"``; a
    dict input ``{"input_ids": ..., "attention_mask": ...}`` takes tensors of
    those names (nested keys are joined by ``/``, tuple positions are ``0``,
    ``1``, ...). Axis 0 is the batch; a length-bucketed axis is ``-1`` in the
    metadata. Datatypes must match the engine's inputs exactly.

    Args:
        name: the model's name in the URL (letters, digits, ``_.-``).
        engine: an ``InferenceEngine`` (or anything ``DynamicBatcher`` takes with an ``example``).
        max_wait_ms, max_queue, timeout_s, max_request_rows, preferred_batch_sizes: the batcher's options
            (see ``DynamicBatcher``).
        nan_policy: ``"error"`` (default): a NaN or inf in a float input (binary tensors only; JSON
            cannot carry them) is answered 400 naming the rows; ``"propagate"``: passed to the
            engine, whose own policy decides (JSON writes NaN outputs as ``null``).
        inputs, prepare: for a model whose request tensors are not its engine inputs: the
            input ``TensorSpec`` s, and ``prepare(tensors) -> engine request`` (``ValueError`` for a bad one).
        outputs: output names for the engine's output leaves, in flattening order.
        platform: the ``platform`` of the model metadata.
    """

    def __init__(
        self,
        name: str,
        engine: Any,
        *,
        max_wait_ms: float = 0.0,
        max_queue: int = 1024,
        timeout_s: float | None = None,
        max_request_rows: int | None = None,
        preferred_batch_sizes: Sequence[int] | None = None,
        nan_policy: NanPolicy = "error",
        inputs: Sequence[TensorSpec] | None = None,
        prepare: Callable[[dict[str, np.ndarray]], Any] | None = None,
        outputs: Sequence[str] | None = None,
        platform: str = "jax",
    ) -> None:
        check_model_name(name)
        if (inputs is None) != (prepare is None):
            raise ValueError("inputs= and prepare= go together: the request tensors and how they become engine inputs")
        self.name = name
        self.engine = engine
        self.nan_policy = check_policy(nan_policy)
        self.platform = platform
        example = engine.pack(engine.example)
        self._treedef = jax.tree.structure(example)
        if inputs is None:
            leaves = jax.tree.leaves(example)
            axes = (
                axes_per_leaf(engine.length_axes, example)
                if getattr(engine, "length_buckets", None)
                else [None] * len(leaves)
            )
            self.inputs = [
                TensorSpec(n, datatype_of(leaf.dtype), _shape(leaf.shape, axis))
                for n, leaf, axis in zip(slash_names(example, empty="input"), leaves, axes)
            ]
            self._prepare = self._unflatten
        else:
            self.inputs, self._prepare = list(inputs), prepare
        self._input_specs = {spec.name: spec for spec in self.inputs}
        # request() checks these inputs as completely as the engine would (exact dtypes and shapes, no length
        # buckets): the batcher may skip its own check, unless a non-finite row must be refused at submit
        self._complete_check = inputs is None and getattr(engine, "length_buckets", None) is None
        probe = engine(example)  # one run on the example: the output structure, shapes and dtypes
        out_leaves = jax.tree.leaves(probe)
        out_axes = (
            [None] * len(out_leaves)
            if getattr(engine, "output_length_axes", None) is None
            else axes_per_leaf(engine.output_length_axes, probe)
        )
        names = list(outputs) if outputs is not None else slash_names(probe, empty="output")
        if len(names) != len(out_leaves):
            raise ValueError(f"outputs= names {len(names)} tensors, the model returns {len(out_leaves)}")
        self.outputs = [
            TensorSpec(n, datatype_of(np.asarray(leaf).dtype), _shape(np.shape(leaf), axis))
            for n, leaf, axis in zip(names, out_leaves, out_axes)
        ]
        self.batcher = DynamicBatcher(
            engine,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
            timeout_s=timeout_s,
            max_request_rows=max_request_rows,
            preferred_batch_sizes=preferred_batch_sizes,
        )

    @classmethod
    def text_embedding(
        cls,
        name: str,
        encoder: Any,
        *,
        engine: Any = None,
        max_batch: int = 32,
        length_buckets: Sequence[int] = (16, 32, 64, 128),
        **options: Any,
    ) -> ServedModel:
        """A sentence encoder (``jaxopt_serve.hf.SentenceEncoder``) served from text.

        Input ``"text"``: a ``BYTES`` tensor of shape ``[n]`` (UTF-8 sentences),
        tokenized on the server and truncated to the encoder's ``max_length``
        tokens (then to the largest length bucket). Output ``"embedding"``:
        ``FP32 [n, hidden]``.

        Args:
            engine: the engine to run (default: ``encoder.engine(max_batch=, length_buckets=)``, not warmed up).
            max_batch, length_buckets: the default engine's buckets.
            **options: ``ServedModel`` options (``max_queue``, ``timeout_s``, ...).
        """
        engine = engine if engine is not None else encoder.engine(max_batch=max_batch, length_buckets=length_buckets)
        longest = engine.length_buckets[-1]

        def prepare(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            text = tensors["text"]
            if text.ndim != 1 or len(text) == 0:
                raise ValueError(f"input 'text': expected shape [n] with n >= 1, got {list(text.shape)}")
            sentences = []
            for i, raw in enumerate(text):
                try:
                    sentences.append(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise ValueError(f"input 'text': element {i} is not valid UTF-8") from None
            ids, mask = encoder.tokenize(sentences, multiple=1)
            return {"input_ids": ids[:, :longest], "attention_mask": mask[:, :longest]}

        return cls(
            name, engine, inputs=[TensorSpec("text", BYTES, (-1,))], prepare=prepare, outputs=["embedding"], **options
        )

    def _unflatten(self, tensors: dict[str, np.ndarray]) -> Any:
        return jax.tree.unflatten(self._treedef, [tensors[spec.name] for spec in self.inputs])

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": self.platform,
            "inputs": [s.metadata() for s in self.inputs],
            "outputs": [s.metadata() for s in self.outputs],
        }

    def request(self, tensors: dict[str, np.ndarray], *, finite: bool = False) -> Any:
        """Check the named tensors against the model's inputs and build the engine request (``ValueError`` if bad).

        ``finite=True``: the tensors are known to be finite (decoded from JSON), no NaN scan.
        """
        missing = [n for n in self._input_specs if n not in tensors]
        unexpected = [n for n in tensors if n not in self._input_specs]
        if missing or unexpected:
            want = ", ".join(repr(n) for n in self._input_specs)
            raise ValueError(
                f"model {self.name!r} takes inputs {want}; "
                + "; ".join(
                    p
                    for p in (f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else "")
                    if p
                )
            )
        rows = None
        for name, array in tensors.items():
            spec = self._input_specs[name]
            got = datatype_of(array.dtype)
            if got != spec.datatype:
                raise ValueError(f"input {name!r}: expected datatype {spec.datatype}, got {got}")
            if array.ndim != len(spec.shape) or any(w not in (-1, g) for w, g in zip(spec.shape, array.shape)):
                raise ValueError(
                    f"input {name!r}: expected shape {list(spec.shape)} (-1: any), got {list(array.shape)}"
                )
            if array.ndim and rows is not None and array.shape[0] != rows:
                raise ValueError(f"input {name!r}: {array.shape[0]} rows, the other inputs have {rows}")
            rows = array.shape[0] if array.ndim else rows
        if rows == 0:
            raise ValueError("the request holds no rows (axis 0 has size 0)")
        if self.nan_policy == "error" and not finite:
            bad = nonfinite_rows({n: a for n, a in tensors.items() if a.dtype != object})
            if bad is not None:
                raise nonfinite_error(bad)
        return self._prepare(tensors)

    def checked(self, *, finite: bool) -> bool:
        """Whether ``request()``'s result needs no second check by the engine before batching."""
        return self._complete_check and (finite or getattr(self.engine, "nan_policy", "error") != "error")

    def response(self, out: Any) -> list[tuple[str, np.ndarray]]:
        return [(spec.name, np.asarray(leaf)) for spec, leaf in zip(self.outputs, jax.tree.leaves(out))]


def _shape(shape: Sequence[int], axis: int | None) -> tuple[int, ...]:
    dims = [-1, *(int(d) for d in shape[1:])]
    if axis is not None:
        dims[axis] = -1
    return tuple(dims)


# ---------------------------------------------------------------------------------------------- the app


class _Reply(Exception):
    """An early answer from the inference route: status, reason, error kind for the metrics, extra headers."""

    def __init__(self, status: int, reason: str, kind: str, *, close: bool = False, retry: bool = False) -> None:
        super().__init__(reason)
        self.status, self.reason, self.kind, self.close, self.retry = status, reason, kind, close, retry


def _route_of(path: str) -> str:
    if path.startswith("/v2/models/"):
        if path.endswith("/infer"):
            return "infer"
        return "model_ready" if path.endswith("/ready") else "model_metadata"
    if path.startswith("/v2/health/"):
        return "health"
    return {"/metrics": "metrics", "/v2": "server_metadata"}.get(path, "other")


class InferenceServer:
    """Serve ``models`` (``ServedModel`` s) over HTTP with the Open Inference Protocol.

    Args:
        models: the models; their names must differ.
        host, port: where to listen (port 0: a free one; see ``port`` once constructed).
        max_body_bytes: the largest request body (413 beyond it).
        discard_limit_bytes: an oversized body up to this size is read and discarded before
            the 413 (so that an ordinary client sees it); a larger one is answered at once and
            the connection closed (default ``8 * max_body_bytes``, at least 64 MiB).
        read_timeout_s: the request line and headers, and then the body, must each arrive within
            this many seconds (408 and the connection closed otherwise).
        max_header_bytes: the largest request line plus headers (431 beyond it).
        keep_alive_s: idle keep-alive connections are closed after this long.
        drain_grace_s: after the last accepted request of a drain, keep answering 503 with
            ``Connection: close`` this long before closing idle connections.
        drain_timeout_s: the longest drain; requests still running then are cancelled.

    Example:
        >>> import json, urllib.request, numpy as np
        >>> from jaxopt_serve.engine import InferenceEngine
        >>> from jaxopt_serve.models import MLPConfig, init_variables
        >>> cfg = MLPConfig(features=(8,))
        >>> mlp = ServedModel("mlp", InferenceEngine(cfg, init_variables(cfg, 0), max_batch=4))
        >>> server = InferenceServer([mlp], port=0).start()
        >>> body = json.dumps({"inputs": [{"name": "input", "shape": [2, 8, 8, 1], "datatype": "FP32",
        ...                                "data": [0.0] * 128}]}).encode()
        >>> with urllib.request.urlopen(f"{server.url}/v2/models/mlp/infer", body) as r:
        ...     reply = json.load(r)
        >>> reply["model_name"], reply["outputs"][0]["shape"]
        ('mlp', [2, 10])
        >>> server.stop()
    """

    def __init__(
        self,
        models: Sequence[ServedModel],
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        max_body_bytes: int = 8 << 20,
        discard_limit_bytes: int | None = None,
        read_timeout_s: float = 30.0,
        max_header_bytes: int = 64 << 10,
        keep_alive_s: float = 5.0,
        drain_grace_s: float = 0.5,
        drain_timeout_s: float = 30.0,
    ) -> None:
        _require_serve()
        from jaxopt_serve.serve.prometheus import ServerMetrics

        models = list(models)
        if not models:
            raise ValueError("InferenceServer needs at least one ServedModel")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must differ, got {names}")
        for value, what in ((max_body_bytes, "max_body_bytes"), (max_header_bytes, "max_header_bytes")):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{what} must be a positive int, got {value!r}")
        for value, what in (
            (read_timeout_s, "read_timeout_s"),
            (keep_alive_s, "keep_alive_s"),
            (drain_timeout_s, "drain_timeout_s"),
        ):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{what} must be > 0 and finite, got {value!r}")
        if not (math.isfinite(drain_grace_s) and drain_grace_s >= 0):
            raise ValueError(f"drain_grace_s must be >= 0 and finite, got {drain_grace_s!r}")
        self.models = {m.name: m for m in models}
        self.max_body_bytes = max_body_bytes
        self.discard_limit_bytes = (
            discard_limit_bytes if discard_limit_bytes is not None else max(8 * max_body_bytes, 64 << 20)
        )
        self.read_timeout_s = float(read_timeout_s)
        self.max_header_bytes = max_header_bytes
        self.keep_alive_s = keep_alive_s
        self.drain_grace_s = drain_grace_s
        self.drain_timeout_s = drain_timeout_s
        self.metrics = ServerMetrics({name: m.batcher for name, m in self.models.items()})
        self.draining = False
        self.drained = threading.Event()  # set once every accepted request has been answered
        self._drain_started: float | None = None
        self._in_flight = 0
        self._children: dict[tuple[str, str, str], Any] = {}
        self._errors = {
            (n, r): self.metrics.errors.labels(n, r)
            for n in self.models
            for r in ("invalid", "too_large", "read_timeout", "deadline", "overloaded", "draining", "model_error")
        }
        self._latency = {n: self.metrics.latency.labels(n) for n in self.models}
        self._gauges = {n: self.metrics.in_flight.labels(n) for n in self.models}
        self.app = self._build_app()
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self._socket.listen(2048)  # connections made before the event loop runs wait in the backlog
        self.host, self.port = self._socket.getsockname()[:2]
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- the Starlette application --------------------------------------------------------------

    def _build_app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        async def live(request: Any) -> Any:
            return JSONResponse({"live": True})

        async def ready(request: Any) -> Any:
            return JSONResponse({"ready": not self.draining}, status_code=503 if self.draining else 200)

        async def server_metadata(request: Any) -> Any:
            from jaxopt_serve import __version__

            return JSONResponse(
                {
                    "name": "jaxopt-serve",
                    "version": __version__,
                    "extensions": ["binary_tensor_data"],
                    "models": list(self.models),
                }
            )

        def model_of(request: Any) -> ServedModel:
            name = request.path_params["name"]
            if name not in self.models:
                raise HTTPException(404, f"unknown model {name!r}; this server has {sorted(self.models)}")
            return self.models[name]

        async def model_metadata(request: Any) -> Any:
            return JSONResponse(model_of(request).metadata())

        async def model_ready(request: Any) -> Any:
            model = model_of(request)
            return JSONResponse(
                {"name": model.name, "ready": not self.draining}, status_code=503 if self.draining else 200
            )

        async def metrics(request: Any) -> Any:
            from jaxopt_serve.serve.prometheus import CONTENT_TYPE

            return Response(self.metrics.exposition(), media_type=CONTENT_TYPE)

        async def http_error(request: Any, exc: Any) -> Any:
            reason = exc.detail
            if exc.status_code == 404 and reason == "Not Found":
                reason = (
                    f"no route {request.url.path}; the routes are /v2/health/live, /v2/health/ready, /v2, "
                    f"/v2/models/{{name}}, /v2/models/{{name}}/ready, /v2/models/{{name}}/infer, /metrics"
                )
            elif exc.status_code == 405:
                allowed = ", ".join(sorted((exc.headers or {}).get("Allow", "").split(", ")))
                reason = f"method {request.method} is not allowed on {request.url.path}; allowed: {allowed}"
            return JSONResponse({"error": reason}, status_code=exc.status_code, headers=exc.headers)

        async def internal_error(request: Any, exc: Exception) -> Any:
            return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)

        routes = [  # the inference route first: it is matched on every inference request
            Route("/v2/models/{name}/infer", _InferRoute(self), methods=["POST"]),
            Route("/v2/health/live", live, methods=["GET"]),
            Route("/v2/health/ready", ready, methods=["GET"]),
            Route("/v2", server_metadata, methods=["GET"]),
            Route("/v2/models/{name}", model_metadata, methods=["GET"]),
            Route("/v2/models/{name}/ready", model_ready, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
        app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: internal_error})
        return _Accounting(self, app)

    # -- the inference route ---------------------------------------------------------------------

    async def infer(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        name = scope["path_params"]["name"]
        model = self.models.get(name)
        start = time.perf_counter()
        headers = scope["headers"]
        length = header_length = None
        expect_continue = False
        for key, value in headers:
            if key == b"content-length":
                length = int(value) if value.isdigit() else -1
            elif key == HEADER_LENGTH.encode():
                header_length = value
            elif key == b"expect" and value.lower() == b"100-continue":
                expect_continue = True
        gauge = self._gauges.get(name)
        if gauge is not None:
            gauge.inc()
        try:
            try:
                reply = await self._infer(model, name, receive, length, header_length, expect_continue, start)
            except _Reply as err:
                if model is not None:
                    self._errors[(name, err.kind)].inc()
                extra = [(b"retry-after", b"1")] if err.retry else []
                await _send_json_error(send, err.status, err.reason, close=err.close, extra=extra)
                return
            except Exception as err:  # noqa: BLE001 - e.g. an output the protocol cannot carry: a JSON 500
                if model is not None:
                    self._errors[(name, "model_error")].inc()
                await _send_json_error(send, 500, f"{type(err).__name__}: {err}", close=True, extra=[])
                return
            body, binary_length = reply
            response_headers = [
                (b"content-type", _OCTETS if binary_length is not None else _JSON),
                (b"content-length", str(len(body)).encode()),
            ]
            if binary_length is not None:
                response_headers.append((HEADER_LENGTH.encode(), str(binary_length).encode()))
            await send({"type": "http.response.start", "status": 200, "headers": response_headers})
            await send({"type": "http.response.body", "body": body})
            self._latency[name].observe(time.perf_counter() - start)
        finally:
            if gauge is not None:
                gauge.dec()

    async def _infer(
        self,
        model: ServedModel | None,
        name: str,
        receive: Any,
        length: int | None,
        header_length: bytes | None,
        expect_continue: bool,
        start: float,
    ) -> tuple[bytes, int | None]:
        if length == -1:
            raise _Reply(400, "Content-Length is not a number", "invalid", close=True)
        if length is not None and length > self.max_body_bytes:
            reason = f"body of {length} bytes exceeds the limit of {self.max_body_bytes} bytes"
            if not expect_continue and length <= self.discard_limit_bytes:
                await _read_body(receive, length, start + self.read_timeout_s, discard=True)
            raise _Reply(413, reason, "too_large", close=True)
        body = await _read_body(receive, self.max_body_bytes, start + self.read_timeout_s)
        if self.draining:
            raise _Reply(
                503, "the server is shutting down; retry on another replica", "draining", close=True, retry=True
            )
        if model is None:
            raise _Reply(404, f"unknown model {name!r}; this server has {sorted(self.models)}", "invalid")
        try:
            n = None
            if header_length is not None:
                if not header_length.isdigit():
                    raise ProtocolError("Inference-Header-Content-Length is not a number")
                n = int(header_length)
            request = decode_request(body, n)
            finite = not request.binary_inputs
            x = model.request(request.inputs, finite=finite)
            rows = batch_rows(x)
            if rows > model.batcher.max_request_rows:
                raise ValueError(f"a request may hold at most {model.batcher.max_request_rows} rows, got {rows}")
            out = await model.batcher.predict_async(x, _checked=model.checked(finite=finite))
        except (ProtocolError, ValueError) as err:
            raise _Reply(getattr(err, "status", 400), str(err), "invalid") from None
        except Overloaded as err:
            raise _Reply(429, str(err), "overloaded", retry=True) from None
        except Closed as err:
            raise _Reply(503, str(err), "draining", close=True, retry=True) from None
        except RequestTimeout as err:
            raise _Reply(504, f"{err} (deadline {model.batcher.timeout_s} s)", "deadline") from None
        except Exception as err:  # noqa: BLE001 - the model failed: 500, the server stays up
            raise _Reply(500, f"model {name!r} failed: {type(err).__name__}: {err}", "model_error") from None
        outputs = model.response(out)
        if request.outputs is not None:
            known = {n for n, _ in outputs}
            unknown = [n for n in request.outputs if n not in known]
            if unknown:
                raise _Reply(400, f"model {name!r} has no outputs {unknown}; it has {sorted(known)}", "invalid")
            outputs = [(n, a) for n, a in outputs if n in request.outputs]
        return encode_response(name, outputs, request_id=request.id, binary=request.binary_outputs)

    # -- running ---------------------------------------------------------------------------------

    def _uvicorn_server(self) -> Any:
        _, uvicorn = _require_serve()
        config = uvicorn.Config(
            self.app,
            http=_protocol_class(self.read_timeout_s, self.max_header_bytes),
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_keep_alive=self.keep_alive_s,
            timeout_graceful_shutdown=self.drain_timeout_s,
            backlog=2048,
            server_header=False,
            proxy_headers=False,
            h11_max_incomplete_event_size=self.max_header_bytes,
        )
        return _DrainingServer(config, self)

    def start(self) -> InferenceServer:
        """Serve in a background thread (its own event loop); returns once the server listens."""
        if self._thread is not None:
            raise RuntimeError("the server is already running")
        self._server = self._uvicorn_server()
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="jaxopt-serve-http", daemon=True
        )
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.005)
        return self

    def serve_forever(self) -> None:
        """Serve in this (the main) thread until SIGTERM or SIGINT, then drain and close the batchers."""
        self._server = self._uvicorn_server()
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self._close()

    def begin_drain(self) -> None:
        """Start a graceful drain: not ready, new requests 503; the server exits once it is drained."""
        if not self.draining:
            self._drain_started = time.perf_counter()
            self.draining = True

    def stop(self, timeout: float | None = None) -> None:
        """Drain gracefully (see the module doc), stop the server thread and close the batchers."""
        if self._thread is not None:
            self.begin_drain()
            self._thread.join(timeout)
            self._thread = None
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for model in self.models.values():
            model.batcher.close()
        self._socket.close()

    def _drain_done(self) -> bool:
        """Called every tick while draining: True once the server may stop."""
        elapsed = time.perf_counter() - self._drain_started
        if self._in_flight == 0:
            self.drained.set()
            return elapsed >= self.drain_grace_s
        return elapsed >= self.drain_timeout_s

    def __enter__(self) -> InferenceServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _InferRoute:
    """The inference route as a plain ASGI app (no Request object, no thread)."""

    def __init__(self, server: InferenceServer) -> None:
        self.server = server

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.server.infer(scope, receive, send)


class _Accounting:
    """Wraps the app: counts requests by model, route and status, tracks in-flight requests, adds
    ``Connection: close`` to every response while draining."""

    def __init__(self, server: InferenceServer, app: Any) -> None:
        self.server, self.app = server, app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        server = self.server
        path = scope["path"]
        route = _route_of(path)
        model = ""
        if route in ("infer", "model_ready", "model_metadata"):
            name = path.split("/")[3] if path.count("/") >= 3 else ""
            model = name if name in server.models else ""
        status = [0]

        async def counted_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if server.draining:
                    headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        server._in_flight += 1
        try:
            parts = path.split("/")
            if route == "infer" and scope["method"] == "POST" and len(parts) == 5 and model:
                # the hot path: straight to the inference route (Starlette would route it to the same place)
                await server.infer({**scope, "path_params": {"name": model}}, receive, counted_send)
            else:
                await self.app(scope, receive, counted_send)
        finally:
            server._in_flight -= 1
            key = (model, route, str(status[0]))
            child = server._children.get(key)
            if child is None:
                child = server._children[key] = server.metrics.requests.labels(*key)
            child.inc()


async def _read_body(receive: Any, limit: int, deadline: float, *, discard: bool = False) -> bytes:
    """The request body, at most ``limit`` bytes, by ``deadline`` (``_Reply`` 413 / 408 otherwise)."""
    if getattr(getattr(receive, "__self__", None), "more_body", True) is False:
        # uvicorn's request cycle holds the whole body already (a small body comes with the headers): reading it
        # cannot stall, so no timer (about a tenth of the server's time per small request)
        return await _collect_body(receive, limit, discard, [0])
    size = [0]
    try:
        async with asyncio.timeout(max(0.0, deadline - time.perf_counter()) if deadline else None):
            return await _collect_body(receive, limit, discard, size)
    except TimeoutError:
        raise _Reply(
            408,
            f"the request body did not arrive within the read timeout ({size[0]} bytes received)",
            "read_timeout",
            close=True,
        ) from None


async def _collect_body(receive: Any, limit: int, discard: bool, size: list[int]) -> bytes:
    """``receive`` until the body ends; ``size[0]`` counts the bytes received."""
    chunks: list[bytes] = []
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Reply(400, "the client closed the connection before sending the body", "invalid", close=True)
        chunk = message.get("body", b"")
        size[0] += len(chunk)
        more = message.get("more_body", False)
        if discard:
            continue
        if size[0] > limit:
            raise _Reply(413, f"body exceeds the limit of {limit} bytes", "too_large", close=True)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _send_json_error(send: Any, status: int, reason: str, *, close: bool, extra: list) -> None:
    import json

    body = json.dumps({"error": reason}).encode()
    headers = [(b"content-type", _JSON), (b"content-length", str(len(body)).encode()), *extra]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------- uvicorn parts


def _error_bytes(status: int, phrase: str, reason: str) -> bytes:
    import json

    body = json.dumps({"error": reason}).encode()
    return (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"connection: close\r\n\r\n"
    ).encode() + body


def _protocol_class(read_timeout_s: float, max_header_bytes: int) -> type:
    """uvicorn's HTTP protocol (httptools when installed, else h11) with a deadline and a size limit for the
    request line and headers, and JSON bodies on the errors the protocol itself answers."""
    try:
        import httptools  # noqa: F401
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class Protocol(Base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._head_timer: Any = None
            self._head_bytes = 0
            self._arm()

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_bytes = 0
                self._head_timer = self.loop.call_later(read_timeout_s, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _idle(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            if self._idle():  # between requests: this is a request line and headers
                self._arm()
                end = data.find(b"\r\n\r\n")
                if self._head_bytes + (end + 4 if end >= 0 else len(data)) > max_header_bytes:
                    self._disarm()
                    if not self.transport.is_closing():
                        self.transport.write(
                            _error_bytes(
                                431,
                                "Request Header Fields Too Large",
                                f"request line and headers exceed {max_header_bytes} bytes",
                            )
                        )
                        self.transport.close()
                    return
                self._head_bytes += len(data)
            super().data_received(data)
            if self.cycle is not cycle:  # the headers of a new request are complete
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()  # the next request's deadline starts with its first byte (keep-alive covers idling)

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or not self._idle():
                return
            if self._head_bytes:
                self.transport.write(
                    _error_bytes(
                        408,
                        "Request Timeout",
                        f"the request line and headers did not arrive within the read timeout ({read_timeout_s:g} s)",
                    )
                )
            self.transport.close()

        def connection_lost(self, exc: Any) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self.transport.write(
                    _error_bytes(
                        400,
                        "Bad Request",
                        f"{msg} (malformed request line or headers, e.g. conflicting Content-Length headers)",
                    )
                )
                self.transport.close()

    return Protocol


def _draining_server_class() -> type:
    _, uvicorn = _require_serve()

    class DrainingServer(uvicorn.Server):  # type: ignore[misc, name-defined]
        """uvicorn's server with a drain phase before its shutdown; signals start the drain."""

        def __init__(self, config: Any, owner: InferenceServer) -> None:
            super().__init__(config)
            self.owner = owner

        def handle_exit(self, sig: int, frame: Any) -> None:
            import signal

            if self.owner.draining and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop now
                self.should_exit = True
            self.owner.begin_drain()  # not recorded for re-raising: the process exits normally once drained

        async def on_tick(self, counter: int) -> bool:
            if self.owner.draining and not self.should_exit and self.owner._drain_done():
                self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer


def _DrainingServer(config: Any, owner: InferenceServer) -> Any:  # noqa: N802 - a class, built on first use
    return _draining_server_class()(config, owner)
