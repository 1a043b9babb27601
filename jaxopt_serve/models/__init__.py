"""Reference models: an MLP, a CNN, a BERT-style Transformer encoder (Linen) and an NNX MLP."""

from jaxopt_serve.models.cnn import CNN, CNNConfig
from jaxopt_serve.models.config import ModelConfig, config_from_dict, register_config, registered_configs
from jaxopt_serve.models.functional import (
    ApplyFn,
    Variables,
    count_params,
    example_input,
    init_variables,
    make_apply,
    nnx_module,
    nnx_variables,
    predict_fn,
)
from jaxopt_serve.models.mlp import MLP, MLPConfig
from jaxopt_serve.models.nnx_mlp import NNXMLP, NNXMLPConfig
from jaxopt_serve.models.transformer import TransformerConfig, TransformerEncoder

__all__ = [
    "CNN",
    "CNNConfig",
    "MLP",
    "MLPConfig",
    "NNXMLP",
    "NNXMLPConfig",
    "TransformerConfig",
    "TransformerEncoder",
    "ModelConfig",
    "ApplyFn",
    "Variables",
    "config_from_dict",
    "register_config",
    "registered_configs",
    "count_params",
    "example_input",
    "init_variables",
    "make_apply",
    "nnx_module",
    "nnx_variables",
    "predict_fn",
]
