"""Quantization: quantized arrays, rule-based quantization of variable trees, quantized execution, QAT."""

from jaxopt_serve.quant.calibrate import calibrate
from jaxopt_serve.quant.gptq import gptq_quantize
from jaxopt_serve.quant.qarray import BITS, QArray, QuantSpec, fake_quantize, has_qarrays, pack, quantize_array, unpack
from jaxopt_serve.quant.qat import (
    fake_quantize_tree,
    qat_apply,
    qat_finetune,
    reestimate_batch_stats,
    selected_specs,
    ternary_rules,
)
from jaxopt_serve.quant.rules import (
    QuantizeResult,
    QuantRule,
    UnusedRuleWarning,
    default_rules,
    dequantize_tree,
    grouped_rules,
    quantize,
    tree_nbytes,
)
from jaxopt_serve.quant.runtime import (
    MODES,
    UnsupportedUse,
    execution_report,
    leading_contractions,
    mark_asymmetric,
    quantized_conv,
    quantized_dot,
    quantized_predict_fn,
    serving_layout,
)
from jaxopt_serve.quant.select import int4_rules, model_rules, weight_paths
from jaxopt_serve.quant.serialize import check_qvariables, decode_qtree, encode_qtree, quantized_artifact
from jaxopt_serve.quant.smooth import smooth_quantize

__all__ = [
    "MODES",
    "UnsupportedUse",
    "execution_report",
    "int4_rules",
    "leading_contractions",
    "mark_asymmetric",
    "model_rules",
    "weight_paths",
    "calibrate",
    "quantized_conv",
    "quantized_dot",
    "quantized_predict_fn",
    "serving_layout",
    "smooth_quantize",
    "gptq_quantize",
    "BITS",
    "QArray",
    "QuantRule",
    "QuantSpec",
    "QuantizeResult",
    "UnusedRuleWarning",
    "check_qvariables",
    "decode_qtree",
    "default_rules",
    "dequantize_tree",
    "grouped_rules",
    "has_qarrays",
    "encode_qtree",
    "fake_quantize",
    "fake_quantize_tree",
    "pack",
    "qat_apply",
    "qat_finetune",
    "quantize",
    "quantize_array",
    "quantized_artifact",
    "reestimate_batch_stats",
    "selected_specs",
    "ternary_rules",
    "tree_nbytes",
    "unpack",
]
