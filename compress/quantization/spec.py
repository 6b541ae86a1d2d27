"""How :func:`compress.quantize` makes a network INT8 (:class:`QuantizeSpec`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from compress.core.fields import ADDED_LATER, check, check_choices, choice

QUANT_TARGETS = ("onnxruntime-cpu", "tensorrt")


CALIBRATION_METHODS = ("minmax", "percentile", "mse")
# what `calibration` may name: a method, or auto (each method, the best on held-out images)
CALIBRATIONS = ("auto", *CALIBRATION_METHODS)


def weight_range_names() -> tuple[str, ...]:
    from compress.quantization.int8_kernels import WEIGHT_RANGES

    return ("auto", *WEIGHT_RANGES)


@dataclass(frozen=True)
class QuantizeSpec:
    """How :func:`compress.quantize` makes a network INT8: calibrated fake quantization (PTQ),
    with an optional accuracy budget.

    ``target`` fixes the activation type of the exported QDQ graph: uint8 for ONNX Runtime on CPU
    (its fast u8s8 kernels), symmetric int8 for TensorRT. Weights are always int8, symmetric,
    per output channel, with BatchNorm folded into the convolutions. ``weight_range`` chooses
    their scale (:data:`compress.quantization.int8_kernels.WEIGHT_RANGES`); ``auto`` is
    ``pair-limit`` for
    ONNX Runtime on CPU (the file computes the same on x86 CPUs with and without VNNI) and
    ``full`` for TensorRT. ``full`` on CPU is an opt-in for files that run only on VNNI CPUs.

    ``max_drop`` (top-1 points, None: off) is an accuracy budget: the layers quantization hurts
    most are put back in float, one at a time, until the exported file is within ``max_drop`` of
    the float network on held-out images (:mod:`compress.quantization.budget`); at most
    ``max_float_layers`` (None: all but one).

    ``float_where_slower`` leaves in float the convolutions whose integer kernel is measured
    slower than the float layer with its transitions (depthwise ones on ONNX Runtime's CPU
    kernels), if the whole network then measures faster at ``speed_batch_size``
    (:mod:`compress.quantization.speed`). Off by default: it times the network on this machine,
    so the file it writes depends on the CPU it ran on.

    ``integer_products`` (None: on for ``onnxruntime-cpu``) quantizes the products of two
    activations (a hard-swish written as ``x * hardsigmoid(x)``, a SiLU as ``x * sigmoid(x)``, a
    squeeze-excitation gate), both factors and the result, as ONNX Runtime's own quantizer does:
    ONNX Runtime runs them as ``QLinearMul`` (and sigmoids as ``QLinearSigmoid`` tables) with no
    layout changes between its integer kernels (MobileNetV3-Large at 224 px, batch 64: 1.3x
    faster; EfficientNet-B0, batch 16: 2.4x), while OpenVINO runs that pattern slower than float
    products (benchmarks/RESULTS.md): set it false for files deployed on OpenVINO.

    ``bias_correction`` moves each layer's bias by the per-channel mean shift INT8 put on its
    outputs, measured against the float network on the calibration images
    (:mod:`compress.quantization.bias_correction`; NNCF applies it by default). ``true``: always;
    ``false``: never; None: where held-out images decide (``calibration: auto`` or
    ``max_drop``), each PTQ candidate is tried with and without it, else off.
    """

    # the runtime the INT8 graph is for: uint8 activations for onnxruntime-cpu, int8 for tensorrt
    target: str = choice("onnxruntime-cpu", QUANT_TARGETS)
    # how activation ranges are set from the calibration images; auto: each method, the best
    # top-1 on the held-out images kept
    calibration: str = choice("percentile", CALIBRATIONS)
    # with calibration percentile: the share of values the range covers
    percentile: float = 99.99
    skip: tuple[str, ...] = ()  # module names or fnmatch patterns whose weights stay FP32
    # the integer range of the weights (`compress list weight-ranges`; auto: portable on CPUs
    # without VNNI)
    weight_range: str = choice("auto", weight_range_names)
    max_drop: float | None = field(default=None, metadata={ADDED_LATER: True})  # top-1 points
    max_float_layers: int | None = field(default=None, metadata={ADDED_LATER: True})  # None: n-1
    # leave in float the convolutions and linear layers measured slower in INT8 on ONNX
    # Runtime's CPU kernels, if the whole network then measures faster
    # (compress.quantization.speed)
    float_where_slower: bool = field(default=False, metadata={ADDED_LATER: True})
    # the batch size float_where_slower judges latency at
    speed_batch_size: int = field(default=1, metadata={ADDED_LATER: True})
    # quantize products of activations (hard-swish, SiLU, squeeze-excitation gates) so ONNX
    # Runtime runs them as integer QLinearMul; null: on for onnxruntime-cpu (OpenVINO runs them
    # slower)
    integer_products: bool | None = field(default=None, metadata={ADDED_LATER: True})
    # move each layer's bias by the mean error INT8 put on its outputs (calibration images);
    # null: each PTQ candidate tried with and without it where held-out images decide, else off
    bias_correction: bool | None = field(default=None, metadata={ADDED_LATER: True})

    def __post_init__(self):
        check_choices(self)
        check(
            50 < self.percentile <= 100,
            f"percentile: expected 50 < p <= 100, got {self.percentile}",
        )
        check(
            self.max_drop is None or 0 <= self.max_drop <= 100,
            f"max_drop: expected top-1 points in 0..100 or null (off), got {self.max_drop}",
        )
        check(
            not self.float_where_slower or self.target == "onnxruntime-cpu",
            f"float_where_slower: measured on ONNX Runtime's CPU kernels, so it needs target "
            f"onnxruntime-cpu, got {self.target}",
        )
        check(
            self.speed_batch_size > 0,
            f"speed_batch_size: expected a positive batch size, got {self.speed_batch_size}",
        )
        check(
            self.max_float_layers is None or self.max_float_layers > 0,
            f"max_float_layers: expected a positive integer or null, got {self.max_float_layers}",
        )
