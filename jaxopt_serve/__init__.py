"""jaxopt_serve: make Flax models smaller and faster to serve on XLA.

Start from your own model: ``Model.linen(module, variables, x)``, ``Model.nnx(module, x)`` or
``Model.function(f, params, x)`` (``jaxopt_serve.model``); every chapter takes that handle.
The public API is re-exported here (the ``prune`` and ``distill`` functions stay in their
packages, ``jaxopt_serve.prune.prune`` and ``jaxopt_serve.distill.distill``, so the package names are
not shadowed); implementation lives in topic packages
(``models``, ``data``, ``train``, ``quant``, ``prune``, ``distill``, ``engine``,
``serve``, ``hf``) and modules (``artifact``, ``timing``).
"""

from jaxopt_serve.artifact import Artifact, ArtifactError, load_artifact, save_artifact
from jaxopt_serve.data import Dataset, load_digits
from jaxopt_serve.distill import DistillConfig, distill_models
from jaxopt_serve.engine import InferenceEngine, export_model, make_mesh, model_parallel_rules
from jaxopt_serve.exported import load_exported
from jaxopt_serve.extras import MissingExtraError
from jaxopt_serve.model import Model, ModelSource, as_model
from jaxopt_serve.models import (
    CNN,
    MLP,
    NNXMLP,
    CNNConfig,
    MLPConfig,
    ModelConfig,
    NNXMLPConfig,
    TransformerConfig,
    TransformerEncoder,
    config_from_dict,
    count_params,
    init_variables,
    make_apply,
    nnx_module,
    nnx_variables,
    predict_fn,
)
from jaxopt_serve.prune import (
    PruneRule,
    deep_compress,
    gradual_pruning,
    model_prune_rules,
    prune_model,
    sparse_artifact,
    structured_prune,
)
from jaxopt_serve.quant import (
    QArray,
    QuantRule,
    QuantSpec,
    calibrate,
    execution_report,
    gptq_quantize,
    int4_rules,
    model_rules,
    qat_finetune,
    quantize,
    quantized_artifact,
    quantized_predict_fn,
    smooth_quantize,
)
from jaxopt_serve.serve import DynamicBatcher, InferenceServer, ServedModel
from jaxopt_serve.train import (
    FitResult,
    TrainState,
    accuracy,
    classification_loss,
    default_optimizer,
    fit,
    reestimate_batch_stats,
    train_classifier,
)

__version__ = "0.1.0"

__all__ = [
    "accuracy",
    "Artifact",
    "ArtifactError",
    "as_model",
    "calibrate",
    "classification_loss",
    "CNN",
    "CNNConfig",
    "config_from_dict",
    "count_params",
    "Dataset",
    "deep_compress",
    "default_optimizer",
    "distill_models",
    "DistillConfig",
    "DynamicBatcher",
    "execution_report",
    "export_model",
    "fit",
    "FitResult",
    "gptq_quantize",
    "gradual_pruning",
    "InferenceEngine",
    "InferenceServer",
    "init_variables",
    "int4_rules",
    "load_artifact",
    "load_digits",
    "load_exported",
    "make_apply",
    "make_mesh",
    "MissingExtraError",
    "MLP",
    "MLPConfig",
    "Model",
    "model_parallel_rules",
    "model_prune_rules",
    "model_rules",
    "ModelConfig",
    "ModelSource",
    "nnx_module",
    "nnx_variables",
    "NNXMLP",
    "NNXMLPConfig",
    "predict_fn",
    "prune_model",
    "PruneRule",
    "QArray",
    "qat_finetune",
    "quantize",
    "quantized_artifact",
    "quantized_predict_fn",
    "QuantRule",
    "QuantSpec",
    "reestimate_batch_stats",
    "save_artifact",
    "ServedModel",
    "smooth_quantize",
    "sparse_artifact",
    "structured_prune",
    "train_classifier",
    "TrainState",
    "TransformerConfig",
    "TransformerEncoder",
]
