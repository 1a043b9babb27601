"""The dynamic batcher with pytree requests: concatenated and split leaf by leaf, lengths padded and cut back."""

from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest

from jaxopt_serve.engine import InferenceEngine
from jaxopt_serve.serve import DynamicBatcher
from tiny_pytree_models import dict_inputs, dict_model, pooled_model, token_inputs


@pytest.fixture(scope="module")
def engine():
    return InferenceEngine(dict_model(), max_batch=8).warmup()


def test_pytree_requests_get_their_own_rows_of_every_output(engine):
    requests = [dict_inputs(1 + i % 3, seed=i) for i in range(40)]
    with DynamicBatcher(engine, max_wait_ms=5) as batcher, ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(batcher.predict, requests))
        snapshot = batcher.metrics.snapshot()
    assert max(int(k) for k in snapshot["batch_rows"]) > 3  # requests really were grouped
    for x, (logits, ids) in zip(requests, outputs):
        want_logits, want_ids = engine(x)
        assert ids.dtype == np.int32 and len(ids) == len(x["x"])
        np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(ids, want_ids)


def test_bad_pytree_requests_fail_at_submit(engine):
    with DynamicBatcher(engine, max_request_rows=4) as batcher:
        with pytest.raises(ValueError, match=r"inputs\[0\]\['mask'\]: expected shape \(batch, 4\), got \(1, 2\)"):
            batcher.submit({"x": np.zeros((1, 6), np.float32), "mask": np.zeros((1, 2), bool)})
        with pytest.raises(ValueError, match="at most 4 examples, got 5"):
            batcher.submit(dict_inputs(5))


def test_requests_of_several_lengths_share_a_batch():
    model = pooled_model()
    engine = InferenceEngine(
        model,
        max_batch=8,
        length_buckets=(4, 16),
        length_axes={"input_ids": 1, "attention_mask": 1},
        output_length_axes=(None, 1),
    )
    requests = [token_inputs(1 + i % 2, length, seed=i) for i, length in enumerate([3, 9, 4, 14, 2, 7])]
    with DynamicBatcher(engine, max_wait_ms=50) as batcher:
        futures = [batcher.submit(x) for x in requests]
        outputs = [f.result() for f in futures]
        assert max(int(k) for k in batcher.metrics.snapshot()["batch_rows"]) > 2  # lengths mixed in one batch
    for x, (pooled, scores) in zip(requests, outputs):
        want_pooled, want_scores = jax.jit(model)(model.variables, x)
        assert scores.shape == x["input_ids"].shape  # per-token outputs cut back to each request's length
        np.testing.assert_allclose(pooled, want_pooled, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
