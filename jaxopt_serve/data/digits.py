"""The handwritten-digits dataset that ships inside scikit-learn's wheel (no download)."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxopt_serve.extras import require


@dataclasses.dataclass(frozen=True)
class Dataset:
    """An in-memory classification dataset split into train and test arrays.

    Images are float32 NHWC in [0, 1]; labels are int32.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example (no batch axis)."""
        return tuple(self.x_train.shape[1:])


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 8x8 handwritten digits, split deterministically.

    The split is stratified: each class contributes ``test_fraction`` of its
    examples to the test set, chosen by a permutation seeded with ``seed``.
    Pixel values 0..16 are scaled to [0, 1]; images are ``(N, 8, 8, 1)``.

    Raises:
        MissingExtraError: scikit-learn (the ``data`` extra) is not installed.

    Example:
        >>> ds = load_digits()
        >>> ds.x_train.shape, ds.x_test.shape, ds.num_classes
        ((1438, 8, 8, 1), (359, 8, 8, 1), 10)
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    datasets = require("sklearn.datasets", extra="data", purpose="The bundled digits dataset")
    raw = datasets.load_digits()
    images = (raw.images.astype(np.float32) / 16.0)[..., None]
    labels = raw.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    test_mask = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        test_mask[members[: int(round(len(members) * test_fraction))]] = True
    return Dataset(
        name="digits",
        x_train=images[~test_mask],
        y_train=labels[~test_mask],
        x_test=images[test_mask],
        y_test=labels[test_mask],
        num_classes=int(labels.max()) + 1,
    )


CLS_TOKEN = 17


def load_digit_tokens(*, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The digits as token sequences, for the Transformer encoder: a real task from bundled data.

    Each 8x8 image becomes 65 int32 tokens: a ``[CLS]`` token (id 17) then the
    64 pixel intensities 0..16 in row-major order (vocabulary size 18). The
    split is the same as ``load_digits`` with the same arguments.

    Example:
        >>> ds = load_digit_tokens()
        >>> ds.x_train.shape, ds.x_train.dtype, int(ds.x_train.max()) <= CLS_TOKEN
        ((1438, 65), dtype('int32'), True)
    """
    images = load_digits(test_fraction=test_fraction, seed=seed)

    def tokens(x: np.ndarray) -> np.ndarray:
        pixels = np.round(x.reshape(len(x), -1) * 16.0).astype(np.int32)
        return np.concatenate([np.full((len(x), 1), CLS_TOKEN, np.int32), pixels], axis=1)

    return dataclasses.replace(
        images, name="digit_tokens", x_train=tokens(images.x_train), x_test=tokens(images.x_test)
    )
