"""What x86 CPUs without VNNI do to INT8 convolutions, and the weight ranges that survive it.

ONNX Runtime runs a QDQ graph's convolutions and matrix products on its u8s8 integer kernels
(MLAS: QLinearConv, QGemm, MatMulInteger): uint8 activations times int8 weights.

* With VNNI (AVX512-VNNI, AVX-VNNI) one instruction, ``vpdpbusd``, multiplies four byte pairs
  and adds them into a 32-bit accumulator: exact.
* Without it (AVX2, AVX-512 without VNNI, SSE4.1) the kernels use ``vpmaddubsw``: it multiplies
  adjacent byte pairs and adds each *pair* into a 16-bit lane **with saturation**, before
  ``vpmaddwd`` widens to 32 bits. 255 * 127 + 255 * 127 = 64,770 does not fit in 32,767, so a
  file whose weights use the full int8 range computes wrong sums on those CPUs only (ONNX
  Runtime issues #5849, #6004, #14642; its session option ``session.x64quantprecision`` is the
  slow way out).
* Depthwise convolutions (one input and one output channel per group) run other kernels
  (``MlasConvDepthwiseKernelAvx2``, ``ConvSymDepthwiseKernelAvx2``) that widen both operands to
  16 or 32 bits before multiplying: exact on every CPU. ARM kernels add products in 32 bits.

Which two products a kernel pairs depends on how it packs the reduction axis (input channel
order, im2col layout, ONNX Runtime version), so we bound *every* pair: in each output channel,
the two largest positive weights add up to at most :data:`PAIR_LIMIT` (128), and so do the
magnitudes of the two most negative ones; 255 * 128 = 32,640 fits the 16-bit lane whatever the
activations and the packing. :func:`worst_pair_sums` checks it on a file's integer weights and
:func:`emulate_pairwise_int16` reproduces the saturating kernel in numpy, so both can be proven
on a CPU that has VNNI.

:data:`WEIGHT_RANGES` are the schemes that pick a weight scale per output channel. Only the
portable ones give files that compute the same on every CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# the largest uint8 activation the kernels multiply (zero points are applied afterwards)
U8_MAX = 255
INT16_MIN, INT16_MAX = -32768, 32767
PAIR_LIMIT = INT16_MAX // U8_MAX  # 128: a weight pair whose |sum| stays within this never saturates
INT8_QMAX = 127
SEVEN_BIT_QMAX = 63  # 2 * 63 = 126 <= PAIR_LIMIT


def worst_pair_sums(q: np.ndarray, axis: int = 0) -> np.ndarray:
    """Per output channel, the largest |sum| of two same-signed integer weights.

    Products of a non-negative activation with weights of opposite signs partly cancel, so the
    largest 16-bit pair a kernel can form in a channel is 255 times this number, whatever pairs
    it forms.

    Args:
        q: integer weights.
        axis: the output-channel axis (0 for Conv and transposed Gemm weights, 1 for MatMul's).

    Returns:
        int64 array, one value per output channel.
    """
    q = np.moveaxis(np.asarray(q, dtype=np.int64), axis, 0).reshape(q.shape[axis], -1)
    if q.shape[1] < 2:
        q = np.pad(q, ((0, 0), (0, 2 - q.shape[1])))
    positive = np.sort(np.maximum(q, 0), axis=1)[:, -2:].sum(axis=1)
    negative = np.sort(np.maximum(-q, 0), axis=1)[:, -2:].sum(axis=1)
    return np.maximum(positive, negative)


def emulate_pairwise_int16(activations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The sums a non-VNNI x86 u8s8 kernel computes: ``activations @ weights`` with each pair of
    adjacent products (k = 2i, 2i + 1) added in a saturating 16-bit lane, then in 32 bits.

    Args:
        activations: (M, K) uint8 values, in the kernel's packing order.
        weights: (K, N) int8 values, in the same order.

    Returns:
        (M, N) int64 sums; equal to the exact product only where no pair saturated.
    """
    a = np.asarray(activations, dtype=np.int64)
    w = np.asarray(weights, dtype=np.int64)
    if a.shape[1] % 2:  # the kernels pad the reduction axis with zeros
        a, w = np.pad(a, ((0, 0), (0, 1))), np.pad(w, ((0, 1), (0, 0)))
    products = a[:, :, None] * w[None, :, :]  # (M, K, N)
    pairs = products[:, 0::2, :] + products[:, 1::2, :]
    return np.clip(pairs, INT16_MIN, INT16_MAX).sum(axis=1)


def exact_product(activations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``activations @ weights`` in 64-bit integers: what a VNNI or ARM kernel computes."""
    return np.asarray(activations, dtype=np.int64) @ np.asarray(weights, dtype=np.int64)


# --- weight ranges: how each output channel's scale is chosen ---------------------------------


def _amax(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().flatten(1).amax(dim=1)


def _pair_amax(weight: torch.Tensor) -> torch.Tensor:
    """Per channel, the larger of (two largest positive weights) and (two most negative,
    negated)."""
    import torch

    flat = weight.detach().flatten(1)
    if flat.shape[1] < 2:
        flat = torch.nn.functional.pad(flat, (0, 2 - flat.shape[1]))
    positive = flat.clamp_min(0).topk(2, dim=1).values.sum(dim=1)
    negative = (-flat).clamp_min(0).topk(2, dim=1).values.sum(dim=1)
    return torch.maximum(positive, negative)


def _full(weight: torch.Tensor, depthwise: bool) -> torch.Tensor:
    return _amax(weight) / INT8_QMAX


def _seven_bit(weight: torch.Tensor, depthwise: bool) -> torch.Tensor:
    return _amax(weight) / SEVEN_BIT_QMAX


def _seven_bit_where_needed(weight: torch.Tensor, depthwise: bool) -> torch.Tensor:
    """7-bit for a whole layer whose full-range weights could overflow, else full range."""
    import torch

    full = _full(weight, depthwise)
    if depthwise:
        return full
    q = torch.round(weight.detach().flatten(1) / full.clamp_min(1e-12)[:, None])
    return _seven_bit(weight, depthwise) if bool((_pair_amax(q) > PAIR_LIMIT).any()) else full


def _pair_limit(weight: torch.Tensor, depthwise: bool) -> torch.Tensor:
    import torch

    if depthwise:
        return _full(weight, depthwise)
    # scale >= (w1 + w2) / 127 gives round(w1/s) + round(w2/s) <= 127 + 1 = PAIR_LIMIT
    return torch.maximum(_amax(weight), _pair_amax(weight)) / (PAIR_LIMIT - 1)


@dataclass(frozen=True)
class WeightRange:
    """How a layer's per-channel INT8 weight scale is chosen.

    ``scale(weight, depthwise)`` returns one scale per output channel (weights are rounded to
    ``round(w / scale)``); ``portable`` says the resulting files compute the same on x86 CPUs with
    and without VNNI.
    """

    name: str
    portable: bool
    summary: str
    scale: Callable[[torch.Tensor, bool], torch.Tensor]


WEIGHT_RANGES: dict[str, WeightRange] = {
    r.name: r
    for r in (
        WeightRange(
            "pair-limit",
            True,
            "per channel, the two largest same-signed weights add up to <= 128; depthwise layers "
            "8-bit",
            _pair_limit,
        ),
        WeightRange(
            "7bit-where-needed",
            True,
            "7-bit weights (|q| <= 63) in layers whose 8-bit weights could overflow; others 8-bit",
            _seven_bit_where_needed,
        ),
        WeightRange(
            "7bit", True, "7-bit weights everywhere (ONNX Runtime's reduce_range)", _seven_bit
        ),
        WeightRange(
            "full",
            False,
            "8-bit weights everywhere: exact only on CPUs with VNNI (and ARM, GPUs)",
            _full,
        ),
    )
}
PORTABLE_DEFAULT = "pair-limit"  # the most precise portable scheme (benchmarks/int8_portability.py)


def resolve_weight_range(name: str, target: str) -> str:
    """``auto`` -> the portable default for ONNX Runtime on CPU, ``full`` for TensorRT (GPU
    integer kernels accumulate in 32 bits); any other name as given."""
    if name != "auto":
        return name
    return "full" if target == "tensorrt" else PORTABLE_DEFAULT


def is_depthwise(in_channels: int, out_channels: int, groups: int) -> bool:
    """One input and one output channel per group: ONNX Runtime's exact depthwise kernels."""
    return groups > 1 and in_channels == groups and out_channels == groups
