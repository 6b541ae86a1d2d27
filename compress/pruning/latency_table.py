"""What each layer of a network costs on the target runtime, at the widths pruning may give it.

A latency-targeted prune (:mod:`compress.pruning.latency`) must know, before it cuts, how much
latency each choice of widths saves. MACs do not say it: on ONNX Runtime an INT8 depthwise
convolution is slower than its FP32 one, and widths off a multiple of 16 cost more than their
MACs (benchmarks/RESULTS.md). So each convolution and linear layer is timed alone, as a one-layer
ONNX file in the deployed precision, at every (input, output) width pair it can end up with,
all in one process of the bench runtime itself (NetAdapt's and HALP's lookup table, Yang et al.
2018, Shen et al. 2022).

A network's latency is then predicted from a measured one by the table's differences::

    predicted(widths) = measured(base) + sum of [cell(layer, widths) - cell(layer, base)]

Only differences enter, so what every one-layer file pays alike (the runtime's call overhead)
cancels. What the table does not hold (additions, pooling, requantisation between layers) is the
error that the prune stage's re-measurement of each exported candidate corrects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from compress.core.fileio import read_json, write_json_atomic
from compress.errors import StageError
from compress.nets.modes import evaluating

PRECISIONS = ("fp32", "int8")
# a float convolution between INT8 layers (uint8 NHWC in and out, dequantised, computed in float,
# quantised again): what a layer costs that stays float inside an INT8 network
FLOAT_IN_INT8 = "fp32-in-int8"
CELL_PRECISIONS = (*PRECISIONS, FLOAT_IN_INT8)
OPSET = 18
# the form of the one-layer files (layer_model); a table timed in another form is not reused
# (2: INT8 convolutions with uint8 NHWC ends; 3: the runtime's cost of one call taken out)
CELL_FORM = 3


@dataclass(frozen=True)
class LayerSite:
    """One convolution or linear layer of a network, as the table times it.

    Attributes:
        name: the module's name in the network.
        kind: "conv" or "linear".
        in_channels: its input width in the unpruned network.
        out_channels: its output width in the unpruned network.
        kernel, stride, padding, dilation: the convolution's geometry ((1, 1), (1, 1), (0, 0),
            (1, 1) for a linear layer).
        groups: the convolution's groups; a depthwise one has ``depthwise`` set instead (its
            groups follow its width).
        depthwise: groups == in_channels == out_channels.
        input_hw: the spatial size of its input ((1, 1) for a linear layer).
        tokens: the rows a linear layer multiplies per image (a transformer's tokens, all of a
            MobileViT block's patches; 1 for a classifier).
    """

    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    depthwise: bool = False
    input_hw: tuple[int, int] = (1, 1)
    tokens: int = 1


Cell = tuple[str, int, int]  # (layer name, input width, output width)


@dataclass(frozen=True)
class LatencyTable:
    """Milliseconds of each layer alone at each width pair, timed in one process of ``backend``.

    Attributes:
        backend: the bench backend that timed it.
        batch_size: the batch every cell ran at.
        threads: the runtime's threads (0: its default).
        precision: "fp32" or "int8" (QDQ, as :mod:`compress.exporters.qdq` writes it).
        cells: ``(layer, in, out) -> ms``: the layer's own time, the call's taken out.
        spread: ``(layer, in, out) -> (max - min) / median`` of the cell's rounds.
        cpu: the CPU it was timed on (a table never travels between machines).
        call_ms: what one run of a file costs the runtime whatever it computes
            (:func:`call_model`), taken out of every cell.
    """

    backend: str
    batch_size: int
    threads: int
    precision: str
    cells: dict[Cell, float]
    spread: dict[Cell, float] = field(default_factory=dict)
    cpu: str = ""
    call_ms: float = 0.0

    def cost(self, layer: str, in_channels: int, out_channels: int) -> float:
        """The cell's milliseconds.

        Raises:
            StageError: the table has no such cell (widths the table was not built for).
        """
        try:
            return self.cells[(layer, in_channels, out_channels)]
        except KeyError:
            raise StageError(
                f"latency table: no cell for {layer} at {in_channels} -> {out_channels} channels"
            ) from None

    def network_cost(self, widths: dict[str, tuple[int, int]]) -> float:
        """Sum of the cells of every layer at ``widths`` (``layer -> (in, out)``)."""
        return sum(self.cost(name, cin, cout) for name, (cin, cout) in widths.items())

    def scaled_to(self, measured_ms: float, widths: dict[str, tuple[int, int]]) -> LatencyTable:
        """This table with every cell scaled so that the network at ``widths`` costs
        ``measured_ms``, its measured latency.

        Why: the cells time the convolutions and linear layers; what else the network runs
        (additions, pooling, requantisation) the table does not hold, and most of it shrinks
        with the same widths. So the layers' shares come from the table and the total from the
        measurement: on the CIFAR-10 ResNet-8 (INT8, batch 64) the layers are 92% of the
        network, and the raw cells predicted 10-25% less than four cuts measured to save.
        """
        total = self.network_cost(widths)
        return self.scaled(measured_ms / total if total > 0 else 1.0)

    def scaled(self, factor: float) -> LatencyTable:
        """This table with every cell (so every predicted saving) times ``factor``."""
        return dataclasses.replace(
            self, cells={cell: ms * factor for cell, ms in self.cells.items()}
        )

    def to_json(self) -> dict:
        return {
            "backend": self.backend,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "precision": self.precision,
            "cpu": self.cpu,
            "call_ms": self.call_ms,
            "cells": [[*cell, ms, self.spread.get(cell)] for cell, ms in self.cells.items()],
        }

    @classmethod
    def from_json(cls, data: dict) -> LatencyTable:
        cells = {(name, cin, cout): ms for name, cin, cout, ms, _ in data["cells"]}
        spread = {(name, cin, cout): s for name, cin, cout, _, s in data["cells"] if s is not None}
        return cls(
            backend=data["backend"],
            batch_size=data["batch_size"],
            threads=data["threads"],
            precision=data["precision"],
            cells=cells,
            spread=spread,
            cpu=data.get("cpu", ""),
            call_ms=data.get("call_ms", 0.0),
        )


def layer_sites(model: nn.Module, example_inputs: torch.Tensor) -> list[LayerSite]:
    """Every Conv2d and Linear of ``model`` that runs on ``example_inputs``, in call order, with
    the input size it sees."""
    sites: list[LayerSite] = []
    names = {module: name for name, module in model.named_modules()}
    handles = []

    def record(module, inputs, _output):
        x = inputs[0]
        name = names[module]
        if isinstance(module, nn.Conv2d):
            groups = module.groups
            depthwise = groups > 1 and groups == module.in_channels == module.out_channels
            sites.append(
                LayerSite(
                    name=name,
                    kind="conv",
                    in_channels=module.in_channels,
                    out_channels=module.out_channels,
                    kernel=tuple(module.kernel_size),
                    stride=tuple(module.stride),
                    padding=_pair_padding(module),
                    dilation=tuple(module.dilation),
                    groups=1 if depthwise else groups,
                    depthwise=depthwise,
                    input_hw=(int(x.shape[-2]), int(x.shape[-1])),
                )
            )
        else:
            sites.append(
                LayerSite(
                    name=name,
                    kind="linear",
                    in_channels=module.in_features,
                    out_channels=module.out_features,
                    tokens=max(1, x.numel() // module.in_features),  # one image: batch of 1
                )
            )

    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            handles.append(module.register_forward_hook(record))
    try:
        with evaluating(model), torch.no_grad():
            model(example_inputs[:1])
    finally:
        for handle in handles:
            handle.remove()
    seen: set[str] = set()
    unique = [s for s in sites if not (s.name in seen or seen.add(s.name))]  # shared modules once
    return unique


def layer_model(site: LayerSite, in_channels: int, out_channels: int, precision: str):
    """The one-layer ONNX model a cell times: the layer at the given widths with random weights,
    in FP32 or in the QDQ INT8 form our exporter writes (uint8 activations, per-channel int8
    weights, float bias), which ONNX Runtime fuses into one integer kernel.

    A convolution is timed with a ReLU and (INT8) the quantiser of its output, the pattern of
    nearly every convolution of a CNN and what the runtime fuses with it; a linear layer alone,
    on its tokens as a transformer's (``MatMul``, then the bias ``Add``, as torch exports it) or
    on one vector as a classifier (``Gemm``). The batch axis is dynamic; the spatial size and
    the tokens are the layer's own. A linear layer's output stays float in an INT8 network (only
    its input is quantized), so in float it pays no transition: its ``fp32-in-int8`` cell is its
    FP32 one.

    An INT8 convolution takes and gives uint8 NHWC tensors, transposed to NCHW and back inside
    the file: ONNX Runtime runs its integer convolutions in NHWC, cancels those transposes
    against its own and keeps one QLinearConv, as inside a network. With float NCHW ends the
    file also timed a quantiser and two transposes of the whole input and output, costs a
    network pays once, not per layer; they shrink with the width, so the table overstated what
    narrowing a layer saves, most at large images (the CIFAR-10 ResNet-8's 32x32 stage: a
    plan measured 10% slower than predicted).
    """
    if precision not in CELL_PRECISIONS:
        raise ValueError(f"precision: expected one of {CELL_PRECISIONS}, got {precision!r}")
    rng = np.random.default_rng(0)
    int8 = precision == "int8"
    conv = site.kind == "conv"
    groups = in_channels if site.depthwise else site.groups
    weight_shape = (
        (out_channels, in_channels // groups, *site.kernel) if conv else (out_channels, in_channels)
    )
    weight = rng.standard_normal(weight_shape).astype(np.float32) * 0.1
    initializers = [
        numpy_helper.from_array(rng.standard_normal(out_channels).astype(np.float32), "b")
    ]
    if precision == FLOAT_IN_INT8 and conv:
        return _int8_conv_model(
            site, in_channels, out_channels, groups, weight, initializers, integer_weight=False
        )
    if int8 and conv:
        return _int8_conv_model(site, in_channels, out_channels, groups, weight, initializers)
    tokens = _token_axis(site)
    shape = ["batch", in_channels, *site.input_hw] if conv else ["batch", *tokens, in_channels]
    nodes, x = [], "input"
    if int8:
        initializers += [
            numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
            numpy_helper.from_array(np.array(128, np.uint8), "x_zero"),
            *_int8_weight(weight),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", [x, "x_scale", "x_zero"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
            helper.make_node("DequantizeLinear", ["w_int8", "w_scale", "w_zero"], ["w"], axis=0),
        ]
        x = "xd"
    else:
        initializers.append(numpy_helper.from_array(weight, "w"))
    if conv:
        nodes += [_conv_node(site, x, groups), helper.make_node("Relu", ["y"], ["yr"])]
        y = "yr"
    elif tokens:
        nodes += [
            helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
            helper.make_node("MatMul", [x, "wt"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
        ]
        y = "y"
    else:
        nodes.append(helper.make_node("Gemm", [x, "w", "b"], ["y"], transB=1))
        y = "y"
    graph = helper.make_graph(
        nodes,
        f"{site.name}_{in_channels}_{out_channels}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, _output_shape(site, out_channels))],
        initializers,
    )
    return _model(graph)


def _int8_conv_model(
    site, in_channels, out_channels, groups, weight, initializers, integer_weight: bool = True
):
    """uint8 NHWC in -> transpose -> DequantizeLinear -> Conv -> Relu -> QuantizeLinear ->
    transpose -> uint8 NHWC out: one QLinearConv once ONNX Runtime has optimised it. With a
    float weight (``integer_weight`` False) the Conv stays float between its dequantiser and
    quantiser: a float layer inside an INT8 network, its transitions included."""
    # after a ReLU the zero point is 0: ONNX Runtime then drops the ReLU into the quantiser
    initializers += [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "x_zero"),
    ]
    nodes = [
        helper.make_node("Transpose", ["input"], ["xq"], perm=[0, 3, 1, 2]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
    ]
    if integer_weight:
        initializers += _int8_weight(weight)
        nodes.append(
            helper.make_node("DequantizeLinear", ["w_int8", "w_scale", "w_zero"], ["w"], axis=0)
        )
    else:
        initializers.append(numpy_helper.from_array(weight, "w"))
    nodes += [
        _conv_node(site, "xd", groups),
        helper.make_node("Relu", ["y"], ["yr"]),
        helper.make_node("QuantizeLinear", ["yr", "x_scale", "x_zero"], ["yq"]),
        helper.make_node("Transpose", ["yq"], ["output"], perm=[0, 2, 3, 1]),
    ]
    batch, channels, *hw = _output_shape(site, out_channels)
    graph = helper.make_graph(
        nodes,
        f"{site.name}_{in_channels}_{out_channels}",
        [
            helper.make_tensor_value_info(
                "input", TensorProto.UINT8, ["batch", *site.input_hw, in_channels]
            )
        ],
        [helper.make_tensor_value_info("output", TensorProto.UINT8, [batch, *hw, channels])],
        initializers,
    )
    return _model(graph)


def call_model():
    """A file that computes next to nothing (one ReLU of one value per image): timed beside the
    cells, it is what a run of any file costs the runtime (dispatch, binding, allocating the
    output).

    Why: a network pays that once, a table of one-layer files once per layer. Left in the
    cells, it is a width-independent share of each that :meth:`LatencyTable.scaled_to` then
    shrinks together with the width-dependent rest: on MobileNetV2 at batch 1 (53 layers, a
    median INT8 layer of 12 us beside a call of 5 us on ONNX Runtime) the table understated
    what cuts save by 24-41%.
    """
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["output"])],
        "call",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1])],
    )
    return _model(graph)


def _int8_weight(weight: np.ndarray) -> list:
    """Per-output-channel symmetric int8 weights with their scales and zero points."""
    out_channels = weight.shape[0]
    scale = np.abs(weight).reshape(out_channels, -1).max(axis=1) / 127.0
    quantized = np.round(weight / scale.reshape(-1, *[1] * (weight.ndim - 1))).astype(np.int8)
    return [
        numpy_helper.from_array(quantized, "w_int8"),
        numpy_helper.from_array(scale.astype(np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(out_channels, np.int8), "w_zero"),
    ]


def _conv_node(site: LayerSite, x: str, groups: int):
    return helper.make_node(
        "Conv",
        [x, "w", "b"],
        ["y"],
        kernel_shape=list(site.kernel),
        strides=list(site.stride),
        pads=[site.padding[0], site.padding[1], site.padding[0], site.padding[1]],
        dilations=list(site.dilation),
        group=groups,
    )


def _model(graph):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def measure_table(sites, cells, backend, *, precision: str, **settings) -> LatencyTable:
    """:func:`measure_tables` for one precision (one of :data:`CELL_PRECISIONS`)."""
    return measure_tables(sites, cells, backend, precisions=(precision,), **settings)[0]


def measure_tables(
    sites: list[LayerSite],
    cells: dict[str, set[tuple[int, int]]],
    backend,
    *,
    batch_size: int,
    threads: int,
    precisions: tuple[str, ...],
    cpu: str = "",
    rounds: int = 5,
    runs: int = 20,
) -> list[LatencyTable]:
    """Time every wanted cell on ``backend`` in each of ``precisions``, one table each, in one
    child process (``backend.measure_each``), with :func:`call_model` first: its time, the cost
    of a call, is taken out of every cell. Every file of every precision is visited in the same
    rounds of the same process, so two precisions of a layer compare without a process's bias.

    Args:
        sites: the network's layers (:func:`layer_sites`).
        cells: ``layer name -> {(in, out), ...}``: the width pairs to time.
        backend: a :class:`compress.benchmark.backend_table.Backend` with a ``table_entry``.
        batch_size: the batch of the target latency.
        threads: the runtime's threads.
        precisions: each one of :data:`CELL_PRECISIONS`.
        cpu: the CPU, recorded with the tables.
        rounds: visits per cell (median of round medians).
        runs: timed runs per visit.

    Raises:
        StageError: the backend cannot time single layers, or a cell failed.
    """
    by_name = {site.name: site for site in sites}
    order = [(name, cin, cout) for name in cells for cin, cout in sorted(cells[name])]
    with tempfile.TemporaryDirectory(prefix="compress-table-") as folder:
        paths = [Path(folder) / "call.onnx"]
        onnx.save(call_model(), paths[0])
        for precision in precisions:
            for index, (name, cin, cout) in enumerate(order):
                path = Path(folder) / f"{precision}-cell{index}.onnx"
                onnx.save(layer_model(by_name[name], cin, cout, precision), path)
                paths.append(path)
        result = backend.measure_each(
            paths, batch_size=batch_size, threads=threads, rounds=rounds, runs=runs
        )
    if result.get("status") != "ok":
        raise StageError(f"latency table on {backend.name}: {result.get('error')}")
    call_ms, *cell_ms = result["ms"]
    spreads = result["spread"][1:]
    tables = []
    for index, precision in enumerate(precisions):
        own = slice(index * len(order), (index + 1) * len(order))
        tables.append(
            LatencyTable(
                backend=backend.name,
                batch_size=batch_size,
                threads=threads,
                precision=precision,
                cells={
                    cell: max(ms - call_ms, 0.0)
                    for cell, ms in zip(order, cell_ms[own], strict=True)
                },
                spread=dict(zip(order, spreads[own], strict=True)),
                cpu=cpu,
                call_ms=call_ms,
            )
        )
    return tables


def cached_table(folder: Path, sites, cells, backend, **settings) -> LatencyTable:
    """:func:`measure_table`, read back from ``folder`` when the same table (same layers, cells,
    backend, settings and CPU) was measured before: a resumed or repeated prune stage of a run
    does not time its layers again."""
    identity = {
        "sites": [asdict(site) for site in sites],
        "cells": {name: sorted(pairs) for name, pairs in sorted(cells.items())},
        "backend": backend.name,
        "form": CELL_FORM,
        **settings,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(folder) / f"latency_table-{digest}.json"
    if path.is_file():
        return LatencyTable.from_json(read_json(path))
    table = measure_table(sites, cells, backend, **settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, table.to_json())
    return table


def _pair_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if isinstance(conv.padding, str):  # "same"/"valid": the explicit pads of that mode
        if conv.padding == "valid":
            return (0, 0)
        return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size, strict=True))
    return tuple(conv.padding)


def _token_axis(site: LayerSite) -> list[int]:
    """A linear layer's token axis, between the batch and the features: none for a classifier."""
    return [site.tokens] if site.tokens > 1 else []


def _output_shape(site: LayerSite, out_channels: int) -> list:
    if site.kind == "linear":
        return ["batch", *_token_axis(site), out_channels]
    size = [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, p, d, k, s in zip(
            site.input_hw, site.padding, site.dilation, site.kernel, site.stride, strict=True
        )
    ]
    return ["batch", out_channels, *size]
