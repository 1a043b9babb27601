"""Serving: a dynamic batcher with metrics, an HTTP endpoint, and resumable batch inference over files."""

from jaxopt_serve.serve.batch_infer import open_input, open_inputs, run_batch_inference
from jaxopt_serve.serve.batcher import Closed, DynamicBatcher, Overloaded, RequestTimeout
from jaxopt_serve.serve.http import PredictServer
from jaxopt_serve.serve.metrics import ServingMetrics

__all__ = [
    "Closed",
    "DynamicBatcher",
    "Overloaded",
    "PredictServer",
    "RequestTimeout",
    "ServingMetrics",
    "open_input",
    "open_inputs",
    "run_batch_inference",
]
