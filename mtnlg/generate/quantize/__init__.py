"""Inference weight formats for the Linear layers (attention, MLP and the output layer).

Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth: the
formats trade bytes per weight against accuracy, each kernel chosen by measurement (the tables
are in the modules). ``fp32``: the same weights laid out once for the CPU's GEMM kernel (the
default). ``int8``: fbgemm's dynamic int8 linear, one scale per output row (1 byte per weight,
~1.5-2 % error per layer). ``int4``: weight-only 4-bit in groups of 128 input columns with a
scale and offset each (asymmetric), torch's int4 CPU kernel (~0.56 byte per weight); both pack
their weights for the kernel on first use (``packed``). ``experts`` holds a MoE layer's quantized
experts; ``store`` converts a model and writes and reads quantized checkpoints. All are CPU
formats: on a GPU, run the plain model (bf16).

May import: ``mtnlg.util``, ``mtnlg.config``, ``mtnlg.model``, ``mtnlg.data``, ``mtnlg.checkpoint``.
"""

from mtnlg.checkpoint.directory import INT4_WEIGHTS_FILE, INT8_WEIGHTS_FILE
from mtnlg.generate.quantize.experts import QuantizedExperts
from mtnlg.generate.quantize.fp32 import ONEDNN_MAX_ROWS, FP32Linear, onednn_linear_available, row_bucket
from mtnlg.generate.quantize.int4 import DEFAULT_GROUP_SIZE, GROUP_SIZES, Int4Linear, quantize_int4
from mtnlg.generate.quantize.int8 import Int8Linear, check_backend, quantize_weight
from mtnlg.generate.quantize.store import (
    FORMATS,
    QUANTIZATIONS,
    check_quantization,
    is_quantized,
    load_quantized,
    prepare_for_inference,
    quantization_of,
    quantize_checkpoint,
    quantize_model,
    save_quantized,
    stored_format,
)

__all__ = [
    "DEFAULT_GROUP_SIZE", "FORMATS", "GROUP_SIZES", "INT4_WEIGHTS_FILE", "INT8_WEIGHTS_FILE", "ONEDNN_MAX_ROWS",
    "QUANTIZATIONS", "FP32Linear", "Int4Linear", "Int8Linear", "QuantizedExperts", "check_backend",
    "check_quantization", "is_quantized", "load_quantized", "onednn_linear_available", "prepare_for_inference",
    "quantization_of", "quantize_checkpoint", "quantize_int4", "quantize_model", "quantize_weight", "row_bucket",
    "save_quantized", "stored_format",
]
