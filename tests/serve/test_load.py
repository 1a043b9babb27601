import asyncio

import numpy as np
import pytest

from jaxopt_serve.engine import InferenceEngine
from jaxopt_serve.models import MLPConfig, init_variables
from jaxopt_serve.serve import DynamicBatcher
from jaxopt_serve.serve.load import closed_loop_async

CONFIG = MLPConfig(features=(8,))


@pytest.fixture(scope="module")
def batcher():
    with DynamicBatcher(InferenceEngine(CONFIG, init_variables(CONFIG, 0), max_batch=4).warmup()) as b:
        yield b


def check(report):
    assert report["requests"] > 0 and report["requests/s"] > 0
    assert 0 < report["p50 ms"] <= report["p99 ms"]


def test_closed_loop_counts_requests_and_latencies(batcher):
    check(closed_loop_async(batcher, np.zeros((1, 8, 8, 1), np.float32), 3, 0.2))


def test_closed_loop_inside_a_running_event_loop(batcher):
    """As in a Jupyter or Colab cell, where an event loop is already running (asyncio.run would refuse)."""

    async def cell():
        return closed_loop_async(batcher, np.zeros((1, 8, 8, 1), np.float32), 2, 0.2)

    check(asyncio.run(cell()))


def test_closed_loop_rejects_bad_arguments(batcher):
    with pytest.raises(ValueError, match="clients and seconds"):
        closed_loop_async(batcher, np.zeros((1, 8, 8, 1), np.float32), 0, 1.0)
