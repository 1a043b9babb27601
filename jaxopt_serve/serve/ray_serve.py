"""A Ray Serve deployment of a jaxopt_serve model, speaking the Open Inference Protocol (KServe v2) REST API.

``v2_deployment(model_path)`` returns a Ray Serve application (needs the
``ray`` extra): each replica loads the model once from its path
(``load_servable``: artifact or export) and groups concurrent requests with
``@serve.batch`` into one engine call, so the engine's compiled buckets serve
every batch. Routes, under the application's route prefix:

* ``GET /v2/health/live``, ``GET /v2/health/ready``: 200 once the replica is up;
* ``GET /v2/models/{name}``: metadata (input and output tensors: name, datatype, shape with -1 for the batch);
* ``GET /v2/models/{name}/ready``: 200;
* ``POST /v2/models/{name}/infer``: JSON tensors in, JSON tensors out::

    {"inputs": [{"name": "input", "shape": [2, 8, 8, 1], "datatype": "FP32", "data": [...]}]}
    -> {"model_name": "cnn", "outputs": [{"name": "output", "shape": [2, 10], "datatype": "FP32", "data": [...]}]}

A model with one array input reads the tensor named ``input``; a dict input
reads one tensor per key. One output array answers as ``output``; pytree
outputs as one tensor per leaf, named by its path (``0``, ``1``, ``logits``).
Malformed requests (not JSON, ``NaN`` / ``Infinity`` tokens, numbers that
overflow the datatype, booleans for numbers, wrong names, shapes or
datatypes, non-finite values) get a 400 with ``{"error": message}``; an
unknown model name a 404.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxopt_serve.engine.pytrees import batch_rows, concat_rows, slash_names, take_rows
from jaxopt_serve.extras import require

DATATYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
_NAMES = {np.dtype(v): k for k, v in DATATYPES.items()}


class V2Error(ValueError):
    """A request the protocol refuses; ``status`` is the HTTP status (400, 404)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def datatype(dtype: Any) -> str:
    """The v2 datatype name of a numpy dtype (``float32`` -> ``"FP32"``); ``ValueError`` for others.

    Example:
        >>> datatype(np.float32), datatype(np.int64), datatype(bool)
        ('FP32', 'INT64', 'BOOL')
    """
    try:
        return _NAMES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {np.dtype(dtype)} has no KServe v2 datatype") from None


def _no_constant(token: str) -> Any:
    raise V2Error(f"the body holds {token}, which is not JSON; send finite numbers")


def _flat(data: Any, name: str) -> list[Any]:
    out, stack = [], [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


def decode_tensor(tensor: Any, index: int) -> tuple[str, np.ndarray]:
    """``(name, array)`` of one request tensor, every field checked (``V2Error`` naming the tensor)."""
    if not isinstance(tensor, dict):
        raise V2Error(f"inputs[{index}] must be an object with name, shape, datatype and data")
    name, kind, shape, data = tensor.get("name"), tensor.get("datatype"), tensor.get("shape"), tensor.get("data")
    where = f"input {name!r}" if isinstance(name, str) else f"inputs[{index}]"
    if not isinstance(name, str) or not name:
        raise V2Error(f'inputs[{index}]: "name" must be a non-empty string')
    if kind not in DATATYPES:
        raise V2Error(f"{where}: datatype {kind!r} is not one of {sorted(DATATYPES)}")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise V2Error(f"{where}: shape must be a non-empty list of sizes >= 0, got {shape!r}")
    values = _flat(data, name)
    if len(values) != math.prod(shape):
        raise V2Error(f"{where}: shape {shape} needs {math.prod(shape)} values, data holds {len(values)}")
    dtype = np.dtype(DATATYPES[kind])
    if kind == "BOOL":
        if not all(isinstance(v, bool) for v in values):
            raise V2Error(f"{where}: BOOL data must be true or false")
    elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise V2Error(f"{where}: {kind} data must be numbers (no booleans, strings or nulls)")
    elif dtype.kind in "iu" and not all(isinstance(v, int) or float(v).is_integer() for v in values):
        raise V2Error(f"{where}: {kind} data must be whole numbers")
    try:
        array = np.asarray(values, dtype=np.float64 if dtype.kind == "f" else object)
        if dtype.kind == "f":
            with np.errstate(over="ignore"):
                cast = array.astype(dtype)
            if not np.isfinite(cast).all():
                raise V2Error(f"{where}: values overflow {kind} (or are not finite)")
            array = cast
        else:
            info = np.iinfo(dtype) if dtype.kind in "iu" else None
            if info is not None and any(int(v) < info.min or int(v) > info.max for v in values):
                raise V2Error(f"{where}: values out of the {kind} range [{info.min}, {info.max}]")
            array = np.asarray([int(v) for v in values] if info is not None else values, dtype=dtype)
    except OverflowError:
        raise V2Error(f"{where}: values overflow {kind}") from None
    return name, array.reshape(shape)


def decode_request(body: bytes) -> dict[str, np.ndarray]:
    """The named input tensors of a v2 JSON infer request (``V2Error`` for anything malformed)."""
    try:
        request = json.loads(body, parse_constant=_no_constant)
    except V2Error:
        raise
    except (ValueError, RecursionError) as err:
        raise V2Error(f"the body is not valid JSON: {str(err)[:200]}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise V2Error('the body must be a JSON object with a non-empty "inputs" list')
    tensors: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request["inputs"]):
        name, array = decode_tensor(tensor, i)
        if name in tensors:
            raise V2Error(f"input {name!r} is given twice")
        tensors[name] = array
    return tensors


def encode_response(model_name: str, outputs: Any, *, request_id: str | None = None) -> dict[str, Any]:
    """The v2 JSON response for ``outputs`` (one array: ``output``; a pytree: one tensor per leaf path)."""
    names = slash_names(outputs, empty="output")
    tensors = []
    for name, leaf in zip(names, jax.tree.leaves(outputs)):
        leaf = np.asarray(leaf)
        tensors.append(
            {
                "name": name,
                "shape": list(leaf.shape),
                "datatype": datatype(leaf.dtype),
                "data": leaf.reshape(-1).tolist(),
            }
        )
    response: dict[str, Any] = {"model_name": model_name, "outputs": tensors}
    if request_id is not None:
        response["id"] = request_id
    return response


class V2Model:
    """The protocol around one engine, without Ray: inputs from named tensors, metadata, responses."""

    def __init__(self, engine: Any, name: str) -> None:
        from jaxopt_serve.serve.batch_infer import dict_input_keys

        self.engine, self.name = engine, name
        self.keys = dict_input_keys(engine)
        if self.keys is None and getattr(engine, "input_shape", None) is None:
            raise ValueError(
                f"model {name!r}: the v2 deployment serves models with one array input or one dict of arrays"
            )

    def inputs(self, tensors: dict[str, np.ndarray]) -> Any:
        """The engine's input from the request's tensors, checked (``V2Error`` naming the tensor)."""
        expected = ["input"] if self.keys is None else self.keys
        if sorted(tensors) != sorted(expected):
            raise V2Error(f"model {self.name!r} takes the inputs {expected}, got {sorted(tensors)}")
        x = tensors["input"] if self.keys is None else {k: tensors[k] for k in self.keys}
        try:
            x = self.engine.check_input(x)
        except ValueError as err:
            raise V2Error(f"model {self.name!r}: {err}") from None
        if any(np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all() for a in jax.tree.leaves(x)):
            raise V2Error("the inputs hold NaN or infinity")
        if batch_rows(x) == 0:
            raise V2Error("empty batch: send at least one row")
        return x

    def metadata(self) -> dict[str, Any]:
        example = self.engine.example[0]
        leaves = [("input", example)] if self.keys is None else [(k, example[k]) for k in self.keys]
        out = self.engine(example)  # one row: the output leaves' shapes and dtypes
        inputs = [{"name": n, "datatype": datatype(a.dtype), "shape": [-1, *a.shape[1:]]} for n, a in leaves]
        outputs = [
            {
                "name": n,
                "datatype": datatype(np.float32 if np.issubdtype(a.dtype, np.floating) else a.dtype),
                "shape": [-1, *a.shape[1:]],
            }
            for n, a in zip(slash_names(out, empty="output"), jax.tree.leaves(out))
        ]
        return {"name": self.name, "platform": "jax", "inputs": inputs, "outputs": outputs}

    def run_many(self, requests: list[Any]) -> list[Any]:
        """One engine call for several requests' rows, split back per request."""
        sizes = [batch_rows(r) for r in requests]
        out = self.engine(concat_rows(requests))
        results, start = [], 0
        for n in sizes:
            results.append(take_rows(out, start, start + n))
            start += n
        return results


def v2_deployment(
    model_path: str | os.PathLike[str],
    *,
    name: str | None = None,
    max_batch_size: int = 32,
    batch_wait_timeout_s: float = 0.002,
    num_replicas: int = 1,
    num_cpus: float = 1,
    max_batch: int | None = None,
) -> Any:
    """A Ray Serve application serving ``model_path`` over the v2 REST API; run it with ``serve.run(app)``.

    Args:
        model_path: an artifact (``.jxs``) or exported model (``.jxe``), readable from every replica.
        name: the model's name in the routes (default: the file's stem).
        max_batch_size: the most requests ``@serve.batch`` groups into one engine call.
        batch_wait_timeout_s: how long a request waits for others to join its batch.
        num_replicas: replicas (each with its own compiled engine).
        num_cpus: CPUs Ray reserves per replica.
        max_batch: the engine's largest bucket (default: ``max_batch_size``).

    Example (a cluster, or a laptop)::

        from ray import serve
        serve.run(v2_deployment("/shared/cnn-int8.jxs", name="cnn"), route_prefix="/")
        # curl -X POST localhost:8000/v2/models/cnn/infer -d '{"inputs": [...]}'
    """
    serve = require("ray.serve", extra="ray", purpose="The Ray Serve deployment")
    model_path = Path(model_path)
    if not model_path.is_file():
        problem = "is not a regular file" if model_path.exists() else "does not exist"
        raise ValueError(f"model_path {model_path} {problem}")
    for field, value in (("max_batch_size", max_batch_size), ("num_replicas", num_replicas)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{field} must be a positive integer, got {value!r}")
    if not (
        isinstance(batch_wait_timeout_s, (int, float))
        and math.isfinite(batch_wait_timeout_s)
        and batch_wait_timeout_s >= 0
    ):
        raise ValueError(f"batch_wait_timeout_s must be >= 0 and finite, got {batch_wait_timeout_s!r}")
    name = name or model_path.stem
    if not name or "/" in name:
        raise ValueError(f"name must be a non-empty model name without '/', got {name!r}")

    @serve.deployment(name=f"v2-{name}", num_replicas=num_replicas, ray_actor_options={"num_cpus": num_cpus})
    class V2Deployment:
        def __init__(self, path: str, model_name: str, engine_batch: int) -> None:
            from jaxopt_serve.serve.servable import load_servable

            self.model = V2Model(load_servable(path, max_batch=engine_batch), model_name)

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
        async def _batched(self, requests: list[Any]) -> list[Any]:
            return self.model.run_many(requests)

        async def infer(self, tensors: dict[str, np.ndarray]) -> Any:
            """The outputs for named input tensors (for a ``DeploymentHandle``: ``handle.infer.remote(...)``)."""
            return await self._batched(self.model.inputs(tensors))

        async def __call__(self, request: Any) -> Any:
            from starlette.responses import JSONResponse

            parts = [p for p in request.url.path.split("/") if p]
            try:
                if parts[:2] == ["v2", "health"] and len(parts) == 3 and parts[2] in ("live", "ready"):
                    return JSONResponse({})
                if parts[:2] != ["v2", "models"] or len(parts) < 3:
                    raise V2Error(f"no route {request.url.path}", 404)
                if parts[2] != self.model.name:
                    raise V2Error(f"unknown model {parts[2]!r}; this server has {self.model.name!r}", 404)
                tail = parts[3:]
                if tail == [] and request.method == "GET":
                    return JSONResponse(self.model.metadata())
                if tail == ["ready"] and request.method == "GET":
                    return JSONResponse({"name": self.model.name, "ready": True})
                if tail != ["infer"]:
                    raise V2Error(f"no route {request.url.path}", 404)
                if request.method != "POST":
                    return JSONResponse({"error": "use POST"}, status_code=405, headers={"Allow": "POST"})
                tensors = decode_request(await request.body())
                outputs = await self.infer(tensors)
                return JSONResponse(encode_response(self.model.name, outputs))
            except V2Error as err:
                return JSONResponse({"error": str(err)}, status_code=err.status)

    return V2Deployment.bind(str(model_path.resolve()), name, max_batch or max_batch_size)
