"""What a stored weight costs, in bytes: each backend's arithmetic, as plain numbers.

Every ``Format.tensor_bytes`` (``models/formats/``) returns what this module computes, and
``pytest-lora estimate`` computes it here without importing torch or the quantization libraries
(importing torch alone takes longer than an estimate may). The layouts behind the numbers are
each backend's own, checked against the bytes a quantized layer really holds
(``tests/test_memory_accounting.py``, ``tests/test_formats.py``).
"""

from __future__ import annotations

import math
from typing import Any

from ..specs import QuantSpec

DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes an element of each floating dtype a base may be built in."""

NESTED_BLOCK = 256  # bitsandbytes' double quantization: the blocksize over the absmax values
CODE_4BIT, CODE_NESTED = 16, 256  # entries of bitsandbytes' fp32 code tables
INT4_PADDING = (8, 1024)  # torchao's int4 (tinygemm) pads (out, in) to these multiples


def config_dtype(config_dict: dict[str, Any]) -> str:
    """The dtype the published checkpoint is stored in (float32 when the config doesn't say)."""
    return config_dict.get("torch_dtype") or config_dict.get("dtype") or "float32"


def build_dtype(quant: QuantSpec, config_dict: dict[str, Any]) -> str:
    """The dtype a base is built in: the quantization's (its compute dtype), else the model's own."""
    return quant.dtype or config_dtype(config_dict)


def quantized_bytes(rows: int, columns: int, quant: QuantSpec) -> int:
    """Bytes of a (rows = out, columns = in) weight stored in the quantized format ``quant``,
    its constants included: the built-in backends' arithmetic here, without torch; a backend
    added since (``models/formats/``) is asked through its ``Format``."""
    arithmetic = _BACKENDS.get(quant.backend)
    if arithmetic is None:
        from . import formats

        return formats.of(quant).tensor_bytes(rows, columns, quant)
    return arithmetic(rows, columns, quant)


def bitsandbytes_bytes(rows: int, columns: int, quant: QuantSpec) -> int:
    """LLM.int8(): an int8 weight and an fp32 scale per row; 4-bit: ``four_bit_bytes``."""
    if quant.scheme == "int8":
        return rows * columns + 4 * rows
    return four_bit_bytes(rows * columns, quant)


def four_bit_bytes(weights: int, quant: QuantSpec) -> int:
    """Bytes of ``weights`` 4-bit weights (bitsandbytes' nf4 and fp4): two to a byte, an fp32
    absmax per block and the code table; with double quantization (QLoRA §3) the absmax values
    are themselves quantized to 8 bits in blocks of 256, each with an fp32 absmax, plus an fp32
    offset and the nested code table."""
    blocks = math.ceil(weights / quant.group_size)
    packed = math.ceil(weights / 2)
    if not quant.double_quant:
        return packed + 4 * blocks + 4 * CODE_4BIT
    nested_blocks = math.ceil(blocks / NESTED_BLOCK)
    return packed + blocks + 4 * nested_blocks + 4 * CODE_NESTED + 4 * CODE_4BIT + 4


def torchao_bytes(rows: int, columns: int, quant: QuantSpec) -> int:
    """int8: the int8 data, an fp32 scale and an int8 zero point per row; int4: two weights a
    byte over the padded shape and, per group, a scale and a zero point in bf16."""
    if quant.scheme == "int8":
        return rows * columns + (4 + 1) * rows
    padded_rows = -(-rows // INT4_PADDING[0]) * INT4_PADDING[0]
    padded_columns = -(-columns // INT4_PADDING[1]) * INT4_PADDING[1]
    groups = padded_columns // quant.group_size
    return padded_rows * padded_columns // 2 + 4 * padded_rows * groups


def hqq_bytes(rows: int, columns: int, quant: QuantSpec) -> int:
    """HQQ: the bit width's share of a byte per weight, and a scale and a zero point per group
    in the compute dtype."""
    weights = rows * columns
    groups = math.ceil(weights / quant.group_size)
    return weights * hqq_bits(quant) // 8 + 2 * groups * DTYPE_BYTES[quant.dtype]


def hqq_bits(quant: QuantSpec) -> int:
    """The bit width an HQQ scheme names (``4bit``: 4)."""
    return int(quant.scheme.removesuffix("bit"))


_BACKENDS = {"bitsandbytes": bitsandbytes_bytes, "torchao": torchao_bytes, "hqq": hqq_bytes}
