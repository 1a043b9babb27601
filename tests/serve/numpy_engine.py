"""A duck-typed engine in plain numpy (no JAX, no compile): what the server tests need from an engine.

``y = x.reshape(n, -1)[:, :4] * 2 + 1`` per row, with an optional sleep per
batch (a slow model for overload and deadline tests). It starts in
milliseconds, so the SIGTERM trials can fork a fresh server per trial.
"""

from __future__ import annotations

import time

import numpy as np


class NumpyEngine:
    length_buckets = None
    length_axes = None
    output_length_axes = None
    nan_policy = "propagate"

    def __init__(self, shape=(2, 3), *, max_batch: int = 8, delay_s: float = 0.0, fail: bool = False) -> None:
        self.example = (np.zeros((1, *shape), np.float32),)
        self.input_dtype = np.dtype(np.float32)
        self.max_batch = max_batch
        self.buckets = (max_batch,)
        self.delay_s = delay_s
        self.fail = fail
        self.compile_count = 1
        self.calls = 0

    def pack(self, inputs):
        return inputs[0]

    def check_input(self, x):
        x = np.asarray(x)
        if x.shape[1:] != self.example[0].shape[1:] or x.dtype != np.float32:
            raise ValueError(f"expected a batch of shape (batch, 2, 3) float32, got {x.shape} {x.dtype}")
        return x

    def bucket_for(self, n: int) -> int:
        return self.max_batch

    def __call__(self, x):
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail and self.calls > 1:
            raise RuntimeError("the model broke")
        x = np.asarray(x, np.float32)
        return x.reshape(len(x), -1)[:, :4] * 2 + 1


def expected(x):
    return np.asarray(x, np.float32).reshape(len(x), -1)[:, :4] * 2 + 1
