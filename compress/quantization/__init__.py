"""INT8: the spec, fake quantization with BatchNorm folded (torch.fx), the integer weight
ranges that keep a file portable across CPUs, transformers' linear layers, and the accuracy
budget that puts the most sensitive layers back in float.

:data:`WEIGHT_RANGES` is the table of weight ranges (``compress list weight-ranges``).
"""

from compress.quantization.int8_kernels import WEIGHT_RANGES

__all__ = ["WEIGHT_RANGES"]
