"""Compiled inference: bucketed AOT engine, device meshes and sharding rules, pmap, multi-host, export."""

from jaxopt_serve.engine.engine import InferenceEngine, default_buckets, enable_compilation_cache
from jaxopt_serve.engine.export import export_model
from jaxopt_serve.engine.host_memory import retain_host_memory
from jaxopt_serve.engine.parallel import pmap_predict_fn
from jaxopt_serve.engine.sharding import ShardingRule, make_mesh, model_parallel_rules, shard_variables, variable_specs

__all__ = [
    "InferenceEngine",
    "ShardingRule",
    "default_buckets",
    "enable_compilation_cache",
    "export_model",
    "make_mesh",
    "model_parallel_rules",
    "pmap_predict_fn",
    "retain_host_memory",
    "shard_variables",
    "variable_specs",
]
