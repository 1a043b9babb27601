"""The v2 response encoder: every finite float comes back exactly, whatever path writes it."""

import json

import numpy as np
import pytest

from jaxopt_serve.serve import protocol
from jaxopt_serve.serve.protocol import encode_response


@pytest.mark.parametrize("dtype,decades", [(np.float16, 3), (np.float32, 30), (np.float64, 200)])
@pytest.mark.parametrize("special", ["none", "negative_zero", "nan"])
@pytest.mark.parametrize("writer", ["orjson", "python"])
def test_json_floats_read_back_exactly(dtype, decades, special, writer, monkeypatch):
    if writer == "python":
        monkeypatch.setattr(protocol, "orjson", None)
    elif protocol.orjson is None:
        pytest.skip("orjson is not installed (the serve extra)")
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(40, 3)) * 10.0 ** rng.integers(-decades, decades, (40, 3))).astype(dtype).T  # not C-order
    x[0, 0], x[0, 1] = np.finfo(dtype).max, np.finfo(dtype).tiny
    if special == "negative_zero":
        x[0, 2] = -0.0
    if special == "nan":
        x[0, 3] = np.nan
    body, header_length = encode_response("m", [("out", x), ("n", np.arange(3))], request_id='a"b')
    doc = json.loads(body)
    assert header_length is None and doc["model_name"] == "m" and doc["id"] == 'a"b'
    assert doc["outputs"][1] == {"name": "n", "datatype": "INT64", "shape": [3], "data": [0, 1, 2]}
    data = doc["outputs"][0]["data"]
    if special == "nan":
        assert data[3] is None  # JSON has no NaN
        data[3] = float("nan")
    back = np.array(data, dtype=dtype).reshape(x.shape)
    np.testing.assert_array_equal(back, x)
    assert (np.signbit(back) == np.signbit(x)).all()


def _body(data: str, datatype: str = "FP32", shape: str = "[2]") -> bytes:
    return f'{{"inputs": [{{"name": "x", "shape": {shape}, "datatype": "{datatype}", "data": {data}}}]}}'.encode()


DECODE_CASES = {
    "floats": _body("[0.1, -2.5e-3]"),
    "nested": _body("[[1], [2]]", "INT32", "[2, 1]"),
    "NaN": _body("[NaN, 1]"),
    "Infinity": _body("[1, -Infinity]"),
    "1e400": _body("[1e400, 1]"),
    "integer beyond float64": _body("[1" + "0" * 400 + ", 1]"),
    "integer beyond INT64": _body("[18446744073709551616, 1]", "INT64"),
    "integer just below INT64": _body("[-9223372036854775809, 1]", "INT64"),
    "smallest INT64": _body("[-9223372036854775808, 1]", "INT64"),
    "many floats": _body(str([i / 7 for i in range(600)]), "FP32", "[600]"),
    "many floats, one 1e400": _body(str([i / 7 for i in range(599)] + [1e400]).replace("inf", "1e400"), shape="[600]"),
    "many floats, one integer beyond float64": _body("[" + "1" + "0" * 400 + ", 0.5" * 599 + "]", shape="[600]"),
    "fraction for INT32": _body("[0.5, 1]", "INT32"),
    "lone surrogate": _body('["\\ud800", "a"]', "BYTES"),
    "byte order mark": b"\xef\xbb\xbf" + _body("[1, 2]"),
    "not UTF-8": _body('["\xff", "a"]', "BYTES").replace(b"\xc3\xbf", b"\xff"),
    "nested too deeply": b"[" * 100_000,
    "trailing garbage": _body("[1, 2]") + b"x",
}


@pytest.mark.parametrize("case", DECODE_CASES)
def test_orjson_and_the_standard_parser_give_the_same_request_or_the_same_error(case, monkeypatch):
    if protocol.orjson is None:
        pytest.skip("orjson is not installed (the serve extra)")

    def outcome():
        try:
            request = protocol.decode_request(DECODE_CASES[case])
        except protocol.ProtocolError as err:
            return str(err)
        return {k: (v.dtype, v.tolist()) for k, v in request.inputs.items()}

    fast = outcome()
    monkeypatch.setattr(protocol, "orjson", None)
    assert outcome() == fast
    if case in ("floats", "nested", "smallest INT64", "many floats"):
        assert isinstance(fast, dict)
    else:
        assert isinstance(fast, str)
