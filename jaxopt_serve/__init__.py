"""jaxopt_serve: make Flax models smaller and faster to serve on XLA.

The public API is re-exported here (the ``prune`` and ``distill`` functions stay in their
packages, ``jaxopt_serve.prune.prune`` and ``jaxopt_serve.distill.distill``, so the package names are
not shadowed); implementation lives in topic packages
(``models``, ``data``, ``train``, ``quant``, ``prune``, ``distill``, ``engine``,
``serve``, ``hf``) and modules (``artifact``, ``timing``).
"""

from jaxopt_serve.artifact import Artifact, ArtifactError, load_artifact, save_artifact
from jaxopt_serve.data import Dataset, load_digits
from jaxopt_serve.distill import DistillConfig
from jaxopt_serve.engine import InferenceEngine, export_model, make_mesh, model_parallel_rules
from jaxopt_serve.extras import MissingExtraError
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
    sparse_artifact,
    structured_prune,
)
from jaxopt_serve.quant import (
    QArray,
    QuantRule,
    QuantSpec,
    calibrate,
    qat_finetune,
    quantize,
    quantized_artifact,
    quantized_predict_fn,
)
from jaxopt_serve.serve import DynamicBatcher, PredictServer
from jaxopt_serve.train import (
    FitResult,
    TrainState,
    accuracy,
    classification_loss,
    default_optimizer,
    fit,
    train_classifier,
)

__version__ = "0.1.0"

__all__ = [
    "Artifact",
    "ArtifactError",
    "CNN",
    "CNNConfig",
    "Dataset",
    "DynamicBatcher",
    "DistillConfig",
    "FitResult",
    "InferenceEngine",
    "MLP",
    "MLPConfig",
    "MissingExtraError",
    "ModelConfig",
    "NNXMLP",
    "NNXMLPConfig",
    "PredictServer",
    "PruneRule",
    "QArray",
    "QuantRule",
    "QuantSpec",
    "TrainState",
    "TransformerConfig",
    "TransformerEncoder",
    "accuracy",
    "calibrate",
    "deep_compress",
    "export_model",
    "gradual_pruning",
    "sparse_artifact",
    "structured_prune",
    "qat_finetune",
    "quantize",
    "quantized_artifact",
    "quantized_predict_fn",
    "classification_loss",
    "config_from_dict",
    "count_params",
    "default_optimizer",
    "fit",
    "init_variables",
    "load_artifact",
    "load_digits",
    "make_apply",
    "make_mesh",
    "model_parallel_rules",
    "nnx_module",
    "nnx_variables",
    "predict_fn",
    "save_artifact",
    "train_classifier",
]
