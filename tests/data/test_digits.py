import sys

import numpy as np
import pytest

from jaxopt_serve import MissingExtraError
from jaxopt_serve.data import load_digits


def test_digits_shapes_and_ranges(digits):
    assert digits.x_train.shape == (1438, 8, 8, 1) and digits.x_test.shape == (359, 8, 8, 1)
    assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int32
    assert 0.0 <= digits.x_train.min() and digits.x_train.max() <= 1.0
    assert digits.num_classes == 10 and digits.input_shape == (8, 8, 1)


def test_split_is_deterministic_disjoint_and_stratified(digits):
    again = load_digits()
    np.testing.assert_array_equal(again.x_test, digits.x_test)
    np.testing.assert_array_equal(again.y_train, digits.y_train)
    train_rows = {row.tobytes() for row in digits.x_train}
    assert sum(row.tobytes() in train_rows for row in digits.x_test) <= 2  # the raw data has a few duplicate images
    counts = np.bincount(digits.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


def test_other_seed_gives_other_split(digits):
    assert not np.array_equal(load_digits(seed=1).y_test, digits.y_test)


def test_bad_test_fraction():
    with pytest.raises(ValueError, match="test_fraction must be in"):
        load_digits(test_fraction=1.0)


def test_missing_data_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'jaxopt_serve\[data\]'"):
        load_digits()
