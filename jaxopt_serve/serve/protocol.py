"""The Open Inference Protocol (KServe v2) tensors: JSON and binary bodies to numpy arrays, and back.

Pure functions, no web framework: the server (``jaxopt_serve.serve.server``)
calls ``decode_request`` on a request body and ``encode_response`` on the
model's outputs.

A request names its tensors::

    {"id": "42", "inputs": [{"name": "input", "shape": [2, 8, 8, 1], "datatype": "FP32",
                             "data": [0.0, 0.5, ...]}],
     "outputs": [{"name": "output"}], "parameters": {"binary_data_output": false}}

``data`` is row-major, flat or nested. JSON has no NaN or infinity, so the
tokens ``NaN``, ``Infinity`` and ``-Infinity`` (which Python's ``json`` would
accept), numbers that overflow the datatype (``1e39`` for ``FP32``), booleans
where numbers are expected, fractions for integer datatypes and element
counts that do not match ``shape`` are all errors naming the tensor.

The binary form is the protocol's binary tensor extension: the body is the
JSON header (its length in the ``Inference-Header-Content-Length`` header)
followed by the raw little-endian bytes of each input that says
``"parameters": {"binary_data_size": N}`` instead of ``data``, in input
order; ``BYTES`` elements are each a 4-byte little-endian length and the
bytes. Responses use the same form for the outputs asked for in binary
(``"parameters": {"binary_data_output": true}`` for all of them, or
``"binary_data": true`` on one requested output). Binary tensors can carry
NaN and infinity; the server's non-finite policy decides what happens to them.

Example:
    >>> import json, numpy as np
    >>> body = json.dumps({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32",
    ...                                "data": [[1, 2], [3, 4.5]]}]}).encode()
    >>> request = decode_request(body)
    >>> request.inputs["x"].dtype, request.inputs["x"].tolist()
    (dtype('float32'), [[1.0, 2.0], [3.0, 4.5]])
    >>> decode_request(b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [NaN]}]}')
    Traceback (most recent call last):
    ...
    jaxopt_serve.serve.protocol.ProtocolError: body is not valid JSON: NaN is not a JSON number (send non-finite
    values as binary tensor data)
    >>> body, header_length = encode_response("m", [("y", np.array([[0.5, np.nan]], np.float32))])
    >>> header_length is None, json.loads(body)["outputs"][0]["data"]
    (True, [0.5, None])
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import struct
from typing import Any

import numpy as np

try:  # the serve extra's JSON writer for float arrays: a tenth of the time of formatting them in Python
    import orjson
except ImportError:  # pragma: no cover - the serve extra installs it
    orjson = None

# v2 datatype -> numpy dtype (little-endian); BYTES tensors are numpy object arrays of ``bytes``
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
BYTES = "BYTES"
_FLOAT_MAX = {name: float(np.finfo(d).max) for name, d in DATATYPES.items() if d.kind == "f"}
HEADER_LENGTH = "inference-header-content-length"


class ProtocolError(ValueError):
    """A request that does not follow the protocol; ``status`` is the HTTP status to answer (400 unless said)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the protocol describes it: name, datatype, shape (``-1``: any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclasses.dataclass
class InferRequest:
    """A decoded request: its ``id``, the input arrays by name, and which outputs to send and how."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None  # requested output names (None: all)
    binary_outputs: set[str] | bool  # True: every output in binary
    binary_inputs: bool = False  # some input came as binary data (only those can hold NaN or infinity)


_NAMES = {dtype: name for name, dtype in DATATYPES.items()}


def datatype_of(dtype: Any) -> str:
    """The v2 datatype name of a numpy dtype (``ValueError`` for one the protocol has no name for)."""
    name = _NAMES.get(dtype)
    if name is not None:
        return name
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return BYTES
    name = _NAMES.get(dtype.newbyteorder("<"))
    if name is None:
        raise ValueError(f"dtype {dtype} has no Open Inference Protocol datatype")
    return name


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a JSON number (send non-finite values as binary tensor data)")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _loads(text: bytes) -> Any:
    if orjson is not None:
        try:  # strict JSON, about 10x faster; anything it refuses goes to the standard parser for its verdict
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    try:
        return _DECODER.decode(text.decode("utf-8"))
    except RecursionError:
        raise ProtocolError("body is not valid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise ProtocolError(f"body is not valid JSON: {err}") from None


def decode_request(body: bytes, header_length: int | None = None) -> InferRequest:
    """Parse an inference request body (JSON, or JSON header + binary tensors when ``header_length`` is given)."""
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise ProtocolError(
                f"Inference-Header-Content-Length {header_length} is not within the body's {len(body)} bytes"
            )
        header, binary = _loads(body[:header_length]), memoryview(body)[header_length:]
    else:
        header, binary = _loads(body), memoryview(b"")
    if not isinstance(header, dict):
        raise ProtocolError(f"the request must be a JSON object, got {type(header).__name__}")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError('the request needs "inputs": a non-empty list of tensors')
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(f'"id" must be a string, got {type(request_id).__name__}')
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for i, tensor in enumerate(inputs):
        name, datatype, shape = _tensor_header(tensor, f"inputs[{i}]")
        if name in arrays:
            raise ProtocolError(f"input {name!r} is given twice")
        size = _binary_size(tensor, name)
        if size is None:
            if "data" not in tensor:
                raise ProtocolError(f'input {name!r} has neither "data" nor parameters.binary_data_size')
            arrays[name] = _from_json(tensor["data"], datatype, shape, name)
        else:
            if offset + size > len(binary):
                raise ProtocolError(
                    f"input {name!r}: binary_data_size {size} runs past the end of the body "
                    f"({len(binary) - offset} bytes left)"
                )
            arrays[name] = _from_binary(binary[offset : offset + size], datatype, shape, name)
            offset += size
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes after the binary tensors belong to no input")
    outputs, binary_outputs = _requested_outputs(header)
    return InferRequest(request_id, arrays, outputs, binary_outputs, binary_inputs=header_length is not None)


def _tensor_header(tensor: Any, where: str) -> tuple[str, str, tuple[int, ...]]:
    if not isinstance(tensor, dict):
        raise ProtocolError(f"{where} must be an object with name, shape, datatype and data")
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f'{where}: "name" must be a non-empty string')
    if datatype != BYTES and datatype not in DATATYPES:
        raise ProtocolError(f"input {name!r}: unknown datatype {datatype!r}; one of {', '.join([*DATATYPES, BYTES])}")
    if not isinstance(shape, list) or any(type(d) is not int or d < 0 for d in shape):
        raise ProtocolError(f'input {name!r}: "shape" must be a list of non-negative integers, got {shape!r}')
    return name, datatype, tuple(shape)


def _binary_size(tensor: dict[str, Any], name: str) -> int | None:
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError(f'input {name!r}: "parameters" must be an object')
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if type(size) is not int or size < 0:
        raise ProtocolError(f"input {name!r}: binary_data_size must be a non-negative integer, got {size!r}")
    if "data" in tensor:
        raise ProtocolError(f'input {name!r} has both "data" and binary_data_size')
    return size


def _flatten(data: Any, name: str) -> list[Any]:
    """The elements of a (possibly nested) JSON array, row-major."""
    if not isinstance(data, list):
        raise ProtocolError(f'input {name!r}: "data" must be an array, got {type(data).__name__}')
    flat = data
    while flat and type(flat[0]) is list:
        if any(type(row) is not list for row in flat):
            raise ProtocolError(f'input {name!r}: "data" mixes arrays and scalars at one nesting level')
        flat = list(itertools.chain.from_iterable(flat))
    return flat


def _from_json(data: Any, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    flat = _flatten(data, name)
    count = math.prod(shape)
    if len(flat) != count:
        raise ProtocolError(f"input {name!r}: shape {list(shape)} holds {count} elements, data has {len(flat)}")
    kinds = set(map(type, flat))
    if list in kinds:
        raise ProtocolError(f'input {name!r}: "data" mixes arrays and scalars at one nesting level')
    if datatype == BYTES:
        if not kinds <= {str}:
            raise ProtocolError(f"input {name!r}: BYTES data must be strings")
        try:
            return np.array([s.encode("utf-8") for s in flat], dtype=object).reshape(shape)
        except UnicodeEncodeError:  # a lone surrogate escape ("\ud800"), which JSON parsers let through
            bad = next(i for i, s in enumerate(flat) if not _encodable(s))
            raise ProtocolError(f"input {name!r}: element {bad} is not valid Unicode (a lone surrogate)") from None
    dtype = DATATYPES[datatype]
    if datatype == "BOOL":
        if not kinds <= {bool}:
            raise ProtocolError(f"input {name!r}: BOOL data must be true or false")
        return np.array(flat, dtype=np.bool_).reshape(shape)
    if bool in kinds:
        raise ProtocolError(f"input {name!r}: true/false where {datatype} numbers are expected")
    if not kinds <= {int, float}:
        other = sorted(k.__name__ for k in kinds - {int, float})
        raise ProtocolError(f"input {name!r}: {datatype} data must be numbers, got {', '.join(other)}")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if float in kinds:  # orjson reads integers beyond 64 bits as floats (-2**63 - 1 rounds to -2**63)
            if any(
                type(v) is float and v.is_integer() and (not info.min <= v <= info.max or v <= -(2.0**63)) for v in flat
            ):
                raise ProtocolError(f"input {name!r}: values outside the {datatype} range [{info.min}, {info.max}]")
            raise ProtocolError(f"input {name!r}: fractional numbers where {datatype} integers are expected")
        if flat and (min(flat) < info.min or max(flat) > info.max):
            raise ProtocolError(f"input {name!r}: values outside the {datatype} range [{info.min}, {info.max}]")
        return np.array(flat, dtype=dtype).reshape(shape)
    limit = _FLOAT_MAX[datatype]
    values = None
    if len(flat) <= 512:  # Python's min and max: faster than numpy's on small data, exact for integers of any size
        low, high = (min(flat), max(flat)) if flat else (0.0, 0.0)
    else:
        try:
            values = np.array(flat, dtype=np.float64)
        except OverflowError:  # an integer literal beyond float64
            raise ProtocolError(f"input {name!r}: a value overflows {datatype}") from None
        low, high = values.min(), values.max()
    if not (-limit <= low and high <= limit):  # also 1e400, which Python's parser reads as inf
        bad = next(i for i, v in enumerate(flat) if not -limit <= v <= limit)
        raise ProtocolError(
            f"input {name!r}: element {bad} ({flat[bad]!r}) overflows {datatype} (largest magnitude {limit:.6g})"
        )
    return (np.array(flat, dtype=dtype) if values is None else values.astype(dtype)).reshape(shape)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _from_binary(raw: memoryview, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    count = math.prod(shape)
    if datatype == BYTES:
        items, offset = [], 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise ProtocolError(f"input {name!r}: truncated BYTES element length at byte {offset}")
            (n,) = struct.unpack_from("<I", raw, offset)
            if offset + 4 + n > len(raw):
                raise ProtocolError(f"input {name!r}: BYTES element {len(items)} runs past its binary data")
            items.append(bytes(raw[offset + 4 : offset + 4 + n]))
            offset += 4 + n
        if len(items) != count:
            raise ProtocolError(
                f"input {name!r}: shape {list(shape)} holds {count} elements, binary data has {len(items)}"
            )
        return np.array(items, dtype=object).reshape(shape)
    dtype = DATATYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise ProtocolError(
            f"input {name!r}: shape {list(shape)} of {datatype} is {count * dtype.itemsize} bytes, "
            f"binary_data_size is {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def _requested_outputs(header: dict[str, Any]) -> tuple[list[str] | None, set[str] | bool]:
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError('"parameters" must be an object')
    every = parameters.get("binary_data_output", False)
    if not isinstance(every, bool):
        raise ProtocolError(f"parameters.binary_data_output must be true or false, got {every!r}")
    requested = header.get("outputs")
    if requested is None:
        return None, every
    if not isinstance(requested, list):
        raise ProtocolError('"outputs" must be a list of {"name": ...} objects')
    names, binary = [], set()
    for i, out in enumerate(requested):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise ProtocolError(f'outputs[{i}] must be an object with a "name"')
        names.append(out["name"])
        flag = (out.get("parameters") or {}).get("binary_data", False)
        if not isinstance(flag, bool):
            raise ProtocolError(f"outputs[{i}].parameters.binary_data must be true or false, got {flag!r}")
        if flag:
            binary.add(out["name"])
    return names, True if every else binary


def _json_data(array: np.ndarray) -> list[Any]:
    flat = array.reshape(-1)
    if flat.dtype == object:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        return [v if math.isfinite(v) else None for v in flat.tolist()]  # JSON has no NaN: null
    return flat.tolist()


def _binary_data(array: np.ndarray) -> bytes:
    if array.dtype == object:
        parts = []
        for v in array.reshape(-1):
            raw = v if isinstance(v, bytes) else str(v).encode("utf-8")
            parts += [struct.pack("<I", len(raw)), raw]
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def encode_response(
    model_name: str,
    outputs: list[tuple[str, np.ndarray]],
    *,
    request_id: str | None = None,
    binary: set[str] | bool = False,
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the length of its JSON header (else ``None``).

    Non-finite float values in JSON ``data`` are written as ``null``: the
    body is always valid JSON. Binary outputs carry them as they are.
    """
    parts, blobs = [], []
    for name, array in outputs:
        array = np.asarray(array)
        as_binary = binary is True or bool(binary and name in binary)
        fast = None if as_binary else _float_text(array)
        if fast is None:
            parts.append(_ENCODER.encode(_tensor(name, array, as_binary, blobs)))
        else:  # the entry without "data", then the numbers as text (the same JSON, about 2x faster to write)
            entry = _ENCODER.encode({"name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)})
            parts.append(entry[:-1] + ',"data":' + fast + "}")
    head = '{"model_name":' + _ENCODER.encode(model_name) + ',"outputs":[' + ",".join(parts) + "]"
    if request_id is not None:
        head += ',"id":' + _ENCODER.encode(request_id)
    header = (head + "}").encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


# Significant digits that bring a float of each width back exactly.
_ROUND_TRIP_FORMAT = {np.dtype(np.float16): "%.5g", np.dtype(np.float32): "%.9g", np.dtype(np.float64): "%.17g"}


def _float_text(array: np.ndarray) -> str | None:
    """A float array's values as a flat JSON list, each written with just enough digits to read it back exactly
    (NaN and infinity as ``null``), or ``None`` where the generic path must write it (other dtypes; without
    ``orjson``, non-finite values and -0.0 too).

    With ``orjson`` (the serve extra) the shortest text that reads back to the
    same value is written natively; without it each value is formatted with
    ``%g`` in Python, 9 significant digits for float32.

    Example:
        >>> [float(np.float32(v)) for v in json.loads(_float_text(np.array([0.1, 1e-7, 3.0], np.float32)))]
        [0.10000000149011612, 1.0000000116860974e-07, 3.0]
    """
    fmt = _ROUND_TRIP_FORMAT.get(array.dtype)
    if fmt is None:
        return None
    if orjson is not None:  # (a byte-swapped array has no format above: orjson writes native ones only)
        return orjson.dumps(np.ascontiguousarray(array.reshape(-1)), option=orjson.OPT_SERIALIZE_NUMPY).decode()
    if not np.isfinite(array).all() or (np.signbit(array) & (array == 0)).any():
        return None  # ("%g" writes -0.0 as "-0", which JSON readers take for the integer 0)
    return "[" + ",".join([fmt % v for v in array.reshape(-1).tolist()]) + "]"


def _tensor(name: str, array: np.ndarray, binary: bool, blobs: list[bytes]) -> dict[str, Any]:
    """One tensor entry of a v2 body: its data inline as JSON, or (``binary``) its bytes appended to ``blobs``."""
    tensor: dict[str, Any] = {"name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)}
    if binary:
        raw = _binary_data(array)
        tensor["parameters"] = {"binary_data_size": len(raw)}
        blobs.append(raw)
    else:
        tensor["data"] = _json_data(array)
    return tensor


def encode_request(
    inputs: list[tuple[str, Any]],
    *,
    binary: bool = False,
    binary_outputs: bool = False,
    request_id: str | None = None,
) -> tuple[bytes, int | None]:
    """A client's request body for named arrays (JSON, or JSON header + binary tensors with ``binary=True``).

    Returns the body and the ``Inference-Header-Content-Length`` value to send
    with a binary body (``None`` for JSON).

    Example:
        >>> body, n = encode_request([("x", np.zeros((1, 2), np.float32))])
        >>> n, json.loads(body)["inputs"][0]["datatype"]
        (None, 'FP32')
    """
    tensors, blobs = [], []
    for name, value in inputs:
        array = (
            np.asarray(value)
            if not isinstance(value, (list, tuple)) or not value or not isinstance(value[0], (str, bytes))
            else np.array([v.encode() if isinstance(v, str) else v for v in value], object)
        )
        tensors.append(_tensor(name, array, binary, blobs))
    head: dict[str, Any] = {"inputs": tensors}
    if request_id is not None:
        head["id"] = request_id
    if binary_outputs:
        head["parameters"] = {"binary_data_output": True}
    header = _ENCODER.encode(head).encode()
    return (header + b"".join(blobs), len(header)) if binary else (header, None)


def decode_response(body: bytes, header_length: int | None = None) -> dict[str, np.ndarray]:
    """A client's view of a response: the output arrays by name (binary or JSON ``data``; ``null`` reads as NaN).

    Example:
        >>> body, n = encode_response("m", [("y", np.arange(4, dtype=np.int32).reshape(2, 2))], binary=True)
        >>> decode_response(body, n)["y"].tolist()
        [[0, 1], [2, 3]]
    """
    head = json.loads(body[:header_length] if header_length is not None else body)
    binary = memoryview(body)[header_length:] if header_length is not None else memoryview(b"")
    out, offset = {}, 0
    for tensor in head["outputs"]:
        name, datatype, shape = tensor["name"], tensor["datatype"], tuple(tensor["shape"])
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            out[name] = _from_binary(binary[offset : offset + size], datatype, shape, name)
            offset += size
        elif datatype == BYTES:
            out[name] = np.array([s.encode() for s in tensor["data"]], dtype=object).reshape(shape)
        else:
            data = [np.nan if v is None else v for v in tensor["data"]]
            out[name] = np.array(data, dtype=DATATYPES[datatype]).reshape(shape)
    return out
