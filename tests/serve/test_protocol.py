"""The v2 response encoder: every finite float comes back exactly, whatever path writes it."""

import json

import numpy as np
import pytest

from jaxopt_serve.serve.protocol import encode_response


@pytest.mark.parametrize("dtype,decades", [(np.float16, 3), (np.float32, 30), (np.float64, 200)])
@pytest.mark.parametrize("special", ["none", "negative_zero", "nan"])
def test_json_floats_read_back_exactly(dtype, decades, special):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3, 40)) * 10.0 ** rng.integers(-decades, decades, (3, 40))).astype(dtype)
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
