"""Which block format each ggml type is, and whole-tensor dequantization through it."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as GGMLType

from worker_orcd.quant import floats, kquants, legacy, mxfp4

BlockDequantizer = Callable[[torch.Tensor], torch.Tensor]  # uint8 [n, type_size] -> float32 [n, block_size]

DEQUANTIZERS: dict[GGMLType, BlockDequantizer] = {
    GGMLType.F32: floats.dequantize_f32,
    GGMLType.F16: floats.dequantize_f16,
    GGMLType.BF16: floats.dequantize_bf16,
    GGMLType.Q4_0: legacy.dequantize_q4_0,
    GGMLType.Q4_1: legacy.dequantize_q4_1,
    GGMLType.Q5_0: legacy.dequantize_q5_0,
    GGMLType.Q5_1: legacy.dequantize_q5_1,
    GGMLType.Q8_0: legacy.dequantize_q8_0,
    GGMLType.Q4_K: kquants.dequantize_q4_k,
    GGMLType.Q5_K: kquants.dequantize_q5_k,
    GGMLType.Q6_K: kquants.dequantize_q6_k,
    GGMLType.MXFP4: mxfp4.dequantize_mxfp4,
}

SUPPORTED_TYPES: frozenset[GGMLType] = frozenset(DEQUANTIZERS)


def _type_name(ggml_type: object) -> str:
    return getattr(ggml_type, "name", repr(ggml_type))


def block_sizes(ggml_type: GGMLType) -> tuple[int, int]:
    """(elements per block, bytes per block) of a supported type; ValueError otherwise."""
    if ggml_type not in DEQUANTIZERS:
        raise ValueError(f"ggml type {_type_name(ggml_type)} is not supported (have: {supported_names()})")
    return GGML_QUANT_SIZES[GGMLType(ggml_type)]


def supported_names() -> str:
    return ", ".join(sorted(t.name for t in SUPPORTED_TYPES))


def row_bytes(ggml_type: GGMLType, shape: tuple[int, ...]) -> int:
    """Bytes per row (last dim of `shape`); ValueError when the row is not whole blocks."""
    block, size = block_sizes(ggml_type)
    if not shape or any(d < 0 for d in shape):
        raise ValueError(f"shape {tuple(shape)} is not a tensor shape")
    if shape[-1] % block:
        raise ValueError(
            f"{_type_name(ggml_type)}: row length {shape[-1]} of shape {tuple(shape)} "
            f"is not a multiple of the block size {block}"
        )
    return shape[-1] // block * size


def tensor_bytes(ggml_type: GGMLType, shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-1]) * row_bytes(ggml_type, shape)


def dequantize(raw: torch.Tensor, ggml_type: GGMLType, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw uint8 bytes of a whole tensor -> float32 tensor of `shape` (torch order) on raw.device."""
    shape = tuple(int(d) for d in shape)
    if raw.dtype != torch.uint8:
        raise ValueError(f"raw bytes must be uint8, got {raw.dtype}")
    expected = tensor_bytes(ggml_type, shape)
    if raw.numel() != expected:
        raise ValueError(
            f"{_type_name(ggml_type)} tensor of shape {shape} needs {expected} bytes, got {raw.numel()}"
        )
    _, size = block_sizes(ggml_type)
    blocks = raw.contiguous().reshape(-1, size)
    return DEQUANTIZERS[ggml_type](blocks).reshape(shape)
