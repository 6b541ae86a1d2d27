"""Float where INT8 is slower: which layers of an INT8 network to leave in float for speed.

INT8 is not faster everywhere. On ONNX Runtime's CPU kernels a depthwise convolution runs
slower in INT8 than in FP32 (benchmarks/RESULTS.md, the latency table), and a network made of
them (MobileNetV2, MobileNetV3, EfficientNet) gains little or nothing from INT8. A layer left in
float inside an INT8 network pays its own transitions (its input dequantised, its output
quantised again, the layout changes between the integer kernels' NHWC and the float ones'), so
the decision compares like with like: the layer as an integer kernel against the layer in float
*with* those transitions, each timed alone on the target runtime
(:func:`compress.pruning.latency_table.layer_model`, forms ``int8`` and ``fp32-in-int8``). The
layers whose float form is faster by more than :data:`MARGIN` stay float; then the whole network
is exported both ways and measured (fresh processes, interleaved), and the mixed network is
kept only if it is faster by at least :data:`MIN_GAIN`: what the cells cannot see (neighbouring
float layers sharing one transition, fusions across layers) is settled by measurement.

A transformer's linear layers are judged the same way, on their tokens: on a CPU an INT8 linear
layer of a small hybrid (MobileViT, EfficientViT: 64-240 channels) can cost more in its
quantiser than its integer product saves, and its float form pays no transition (its output is
float in an INT8 network too).

:func:`compress.api.float_where_slower` does the measuring; this module holds the rule and the
record.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

# a layer stays float when its float form (transitions included) is this much faster than INT8
MARGIN = 0.05
# the mixed network is kept when the whole network measures at least this much faster
MIN_GAIN = 0.02


@dataclass(frozen=True)
class LayerSpeed:
    """One layer timed alone: as an integer kernel, and in float between INT8 layers."""

    name: str
    int8_ms: float
    float_ms: float

    @property
    def float_is_faster(self) -> bool:
        return self.float_ms < (1 - MARGIN) * self.int8_ms


@dataclass(frozen=True)
class FloatWhereSlower:
    """What the search measured and decided.

    Attributes:
        backend, batch_size, threads: where and how it was timed.
        layers: every INT8 layer's two timings (convolutions and linear layers).
        float_layers: the layers that were faster in float alone (tried together).
        int8_ms, mixed_ms: the whole network's p50 latency per process, all INT8 and with
            ``float_layers`` in float (interleaved fresh processes; empty when no layer was
            faster in float, so nothing was measured).
        kept: whether the mixed network is the result.
    """

    backend: str
    batch_size: int
    threads: int
    layers: tuple[LayerSpeed, ...]
    float_layers: tuple[str, ...]
    int8_ms: tuple[float, ...] = ()
    mixed_ms: tuple[float, ...] = ()
    kept: bool = False

    @property
    def ratio(self) -> float | None:
        """Median over processes of mixed / all-INT8 latency (below 1: the mixed one is faster)."""
        if not self.int8_ms:
            return None
        return statistics.median(m / i for m, i in zip(self.mixed_ms, self.int8_ms, strict=True))

    @property
    def pays(self) -> bool:
        """Whether the mixed network measured faster by :data:`MIN_GAIN` (the median of
        per-process ratios: the processes were interleaved, so each pair shares the machine's
        state)."""
        return self.ratio is not None and self.ratio <= 1 - MIN_GAIN

    def to_json(self) -> dict:
        return asdict(self) | {"ratio": self.ratio}


def faster_in_float(layers: list[LayerSpeed]) -> tuple[str, ...]:
    """The layers whose float form beats their integer kernel by more than :data:`MARGIN`."""
    return tuple(layer.name for layer in layers if layer.float_is_faster)
