"""Fake quantization: the GDFQ-family quantizer, quantized layers and model conversion."""

from dfq.quant.convert import quant_summary, quantize
from dfq.quant.modules import (
    ActQuant,
    QuantConv2d,
    QuantLayer,
    QuantLinear,
    activation_ranges,
    set_calibration,
)

__all__ = [
    "ActQuant",
    "QuantConv2d",
    "QuantLayer",
    "QuantLinear",
    "activation_ranges",
    "quant_summary",
    "quantize",
    "set_calibration",
]
