"""Serving: a dynamic batcher with metrics, an Open Inference Protocol (KServe v2) server, and resumable batch
inference over files.

``InferenceServer`` and ``ServedModel`` need the ``serve`` extra (Starlette, uvicorn, prometheus_client),
imported when a server is built.
"""

from jaxopt_serve.serve.batch_infer import open_input, open_inputs, run_batch_inference
from jaxopt_serve.serve.batcher import Closed, DynamicBatcher, Overloaded, RequestTimeout
from jaxopt_serve.serve.metrics import ServingMetrics
from jaxopt_serve.serve.server import InferenceServer, ServedModel

__all__ = [
    "Closed",
    "DynamicBatcher",
    "InferenceServer",
    "Overloaded",
    "RequestTimeout",
    "ServedModel",
    "ServingMetrics",
    "open_input",
    "open_inputs",
    "run_batch_inference",
]
