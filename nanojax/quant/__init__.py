"""Quantized inference: int8 / int4 weight records, `quantize`, and their (de)serialisation.

    qparams = nj.quantize(params, cfg, "int4", group_size=32)
    logits = nj.forward(qparams, tokens, cfg)

arrays.py holds the records and the layout (shared with the C++ kernels of ffi.py, when those
are present); quantize.py the rounding; io.py saving and loading a quantized model directory.
See docs/quantization.md.
"""

from nanojax.quant.arrays import QuantizedMatrix, QuantizedTable, is_quantized
from nanojax.quant.io import load_quantized, save_quantized
from nanojax.quant.quantize import QuantizeError, dequantize, quantize, quantize_matrix, weight_bytes

__all__ = ["QuantizedMatrix", "QuantizedTable", "QuantizeError", "is_quantized", "quantize",
           "quantize_matrix", "dequantize", "weight_bytes", "save_quantized", "load_quantized"]
