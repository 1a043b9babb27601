"""Quantization: quantized arrays, rule-based quantization of variable trees, quantized execution, QAT."""

from jaxopt_serve.quant.qarray import BITS, QArray, QuantSpec, fake_quantize, pack, quantize_array, unpack
from jaxopt_serve.quant.rules import (
    QuantizeResult,
    QuantRule,
    UnusedRuleWarning,
    default_rules,
    dequantize_tree,
    quantize,
    tree_nbytes,
)

__all__ = [
    "BITS",
    "QArray",
    "QuantRule",
    "QuantSpec",
    "QuantizeResult",
    "UnusedRuleWarning",
    "default_rules",
    "dequantize_tree",
    "fake_quantize",
    "pack",
    "quantize",
    "quantize_array",
    "tree_nbytes",
    "unpack",
]
