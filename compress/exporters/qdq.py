"""The INT8 (QDQ) ONNX graph of a fake-quantized model: weights stored as INT8, and proof that it is
fast.

A fake-quantized model (:mod:`compress.quantization.fake_quant`) exports as
QuantizeLinear/DequantizeLinear
pairs, with each weight still a float initializer that a QuantizeLinear rounds at run time.
:func:`store_int8_weights` rounds those weights once and stores the INT8 result (a ~4x smaller
file, and the form ONNX Runtime and TensorRT expect); :func:`check_qdq` proves the graph is what
the target's integer kernels need, which a wrong quantizer placement silently breaks (the model
still runs, only slower than FP32). :func:`keep_float_layers` gives a layer kept in float (the
``skip`` list, the accuracy budget's choice) the form in which ONNX Runtime leaves it in float;
:data:`QDQ_TRANSFORMS` names the whole rewrite per target.

Only the ``torchscript`` exporter handles the fake-quantize ops: ``torch.export`` (the
``dynamo`` exporter) has no fake-tensor kernel for ``fake_quantize_per_tensor_affine``.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from compress.errors import ExportError
from compress.quantization.int8_kernels import PAIR_LIMIT, U8_MAX, is_depthwise, worst_pair_sums
from compress.quantization.spec import QUANT_TARGETS

_QLINEAR_CONVS = ("QLinearConv", "NhwcQLinearConv")
_FLOAT_CONVS = ("Conv", "FusedConv", "NhwcConv", "NhwcFusedConv")
_INT8 = onnx.TensorProto.INT8
_UINT8 = onnx.TensorProto.UINT8
_FLOAT = onnx.TensorProto.FLOAT
_WEIGHTED = ("Conv", "ConvTranspose", "Gemm")  # the layers ONNX Runtime quantizes on its own


def store_int8_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every QuantizeLinear of a constant FP32 tensor by the INT8 tensor it computes.

    The DequantizeLinear after it then reads an INT8 initializer directly (same scale, zero
    point and per-channel ``axis``); float weights no longer used are removed. Rounding is
    ONNX's (half to even), the same as ``torch.fake_quantize_*``, so outputs do not change.
    Usable as ``export_onnx(..., transform=store_int8_weights)``.

    Args:
        proto: the exported model; modified in place.

    Returns:
        ``proto``.
    """
    graph = proto.graph
    _bypass_identities(graph)
    _fold_constant_arithmetic(graph)
    constants = _constants(graph)
    kept = []
    taken = {init.name for init in graph.initializer}
    for node in graph.node:
        stored = _int8_weight(node, constants)
        if stored is None:
            kept.append(node)
            continue
        # equal weights share one constant in the exporter's graph (zero-initialised layers of
        # an untrained network): a second QuantizeLinear of it gets an INT8 name of its own
        if stored.name in taken:
            stored.name = f"{node.output[0]}_int8"
        taken.add(stored.name)
        graph.initializer.append(stored)
        for user in graph.node:
            for i, name in enumerate(user.input):
                if name == node.output[0]:
                    user.input[i] = stored.name
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    return proto


_FOLDED = {
    "Div": np.divide,
    "Mul": np.multiply,
    "Add": np.add,
    "Sub": np.subtract,
    "Round": np.rint,  # half to even, as ONNX's Round
}


def _fold_constant_arithmetic(graph: onnx.GraphProto) -> None:
    """Replace arithmetic on constants by its result (float32, as ONNX Runtime would fold it):
    the int32 rounding of a bias
    (:meth:`compress.quantization.fake_quant.WeightQuant.quantized_bias`) is
    exported as Div/Round/Clip/Mul of initializers, which the TorchScript exporter leaves in."""
    constants = {name: numpy_helper.to_array(t) for name, t in _constants(graph).items()}
    kept = []
    for node in graph.node:
        inputs = [constants.get(name) if name else None for name in node.input]
        value = None
        if node.op_type in _FOLDED and node.input and all(v is not None for v in inputs):
            value = _FOLDED[node.op_type](*inputs)
        # a missing bound has an empty name
        elif node.op_type == "Clip" and all(
            v is not None for v, name in zip(inputs, node.input, strict=True) if name
        ):
            low, high = (inputs + [None, None])[1:3]
            bounded = low is not None or high is not None
            value = np.clip(inputs[0], low, high) if bounded else inputs[0]
        if value is None or len(node.output) != 1:
            kept.append(node)
            continue
        value = np.asarray(value, dtype=inputs[0].dtype)
        constants[node.output[0]] = value
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
    used = {name for node in kept for name in node.input} | {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(n for n in kept if n.op_type != "Constant" or n.output[0] in used)


def _bypass_identities(graph: onnx.GraphProto) -> None:
    """Drop Identity nodes of initializers (the torchscript exporter shares zero points through
    them)."""
    inits = {init.name for init in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {
        n.output[0]: n.input[0]
        for n in graph.node
        if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs
    }
    kept = [n for n in graph.node if n.output[0] not in alias or n.op_type != "Identity"]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = alias.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)


def _int8_weight(node: onnx.NodeProto, constants: dict) -> onnx.TensorProto | None:
    """The INT8 initializer a QuantizeLinear of a float constant computes; None for other nodes."""
    if (
        node.op_type != "QuantizeLinear"
        or len(node.input) < 3
        or not all(n in constants for n in node.input[:3])
    ):
        return None
    weight, scale, zero_point = (numpy_helper.to_array(constants[n]) for n in node.input[:3])
    if weight.dtype != np.float32 or weight.ndim < 2 or zero_point.dtype != np.int8:
        return None
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    shape = [1] * weight.ndim
    if scale.ndim == 1:
        shape[axis] = -1
    q = np.rint(weight / scale.reshape(shape)) + zero_point.reshape(shape).astype(np.float32)
    return numpy_helper.from_array(np.clip(q, -128, 127).astype(np.int8), f"{node.input[0]}_int8")


def keep_float_layers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Give every float layer that reads a dequantized activation its own per-channel
    DequantizeLinear, so that ONNX Runtime runs it in float.

    A layer kept in float between quantized ones exports as ``DequantizeLinear -> Conv (FP32
    weight initializer) [-> Relu] -> QuantizeLinear``. ONNX Runtime (1.32 here; since about
    1.21) quantizes that convolution itself when it loads the file: its level-1
    ``WeightBiasQuantization`` optimizer rounds the float weight to per-tensor INT8 whenever
    the input comes from a DequantizeLinear with a per-tensor scale and the output leads to a
    QuantizeLinear, and the layer then runs as a QLinearConv, with coarser weights than our
    per-channel ones. The
    optimizer leaves a layer whose input DequantizeLinear has a per-axis scale alone; so the
    float layer reads the same uint8 tensor through a DequantizeLinear with ``axis=1`` and the
    per-tensor scale and zero point repeated once per channel. It computes exactly the same
    values (no extra node, no extra rounding), the quantized neighbours stay QLinearConv, and
    :func:`check_qdq` proves the result on ONNX Runtime's optimized graph.

    Only activations read by float layers change; a DequantizeLinear shared with other nodes
    is kept for them. Usable as an ``export_onnx`` transform after :func:`store_int8_weights`
    (:data:`QDQ_TRANSFORMS`); not for TensorRT, which wants per-tensor activation scales.

    Args:
        proto: the exported model; modified in place.

    Returns:
        ``proto``.
    """
    graph = proto.graph
    constants = _constants(graph)
    producer = {output: node for node in graph.node for output in node.output}
    made: dict[tuple[str, int, int], str] = {}
    nodes = []
    for node in graph.node:
        rewired = _per_axis_input(node, producer, constants, made, graph)
        nodes.extend(rewired)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return proto


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers and the values of Constant nodes, by name."""
    constants = {init.name: init for init in graph.initializer}
    for node in graph.node:  # exporters may emit scalars as Constant nodes
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants.setdefault(node.output[0], node.attribute[0].t)
    return constants


def _per_axis_input(
    node: onnx.NodeProto, producer: dict, constants: dict, made: dict, graph: onnx.GraphProto
) -> list[onnx.NodeProto]:
    """Rewire a float layer's input to a per-axis DequantizeLinear; the nodes to add before it."""
    if node.op_type not in _WEIGHTED or len(node.input) < 2:
        return []
    weight = constants.get(node.input[1])
    dequantize = producer.get(node.input[0])
    if (
        weight is None
        or weight.data_type != _FLOAT
        or dequantize is None
        or dequantize.op_type != "DequantizeLinear"
        or len(dequantize.input) < 3
        or not all(name in constants for name in dequantize.input[1:3])
    ):
        return []
    scale, zero_point = (numpy_helper.to_array(constants[n]) for n in dequantize.input[1:3])
    if scale.size != 1:
        return []  # already per axis: ONNX Runtime leaves the layer alone
    axis, channels = _activation_channels(node, list(weight.dims))
    key = (dequantize.input[0], axis, channels)
    if key in made:
        node.input[0] = made[key]
        return []
    name = f"{dequantize.input[0]}_float_layer_dq{len(made)}"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.full(channels, scale.item(), np.float32), f"{name}_scale"),
            numpy_helper.from_array(
                np.full(channels, zero_point.item(), zero_point.dtype), f"{name}_zero_point"
            ),
        ]
    )
    per_axis = onnx.helper.make_node(
        "DequantizeLinear",
        [dequantize.input[0], f"{name}_scale", f"{name}_zero_point"],
        [name],
        name=name,
        axis=axis,
    )
    made[key] = node.input[0] = name
    return [per_axis]


def _activation_channels(node: onnx.NodeProto, weight_shape: list[int]) -> tuple[int, int]:
    """(axis, size) of the channel axis of a layer's input, read off its weight."""
    attributes = {a.name: a.i for a in node.attribute}
    if node.op_type == "Conv":  # weight (Cout, Cin / groups, *kernel)
        return 1, weight_shape[1] * attributes.get("group", 1)
    if node.op_type == "ConvTranspose":  # weight (Cin, Cout / groups, *kernel)
        return 1, weight_shape[0]
    in_features = weight_shape[1] if attributes.get("transB", 0) else weight_shape[0]
    return (0 if attributes.get("transA", 0) else 1), in_features  # Gemm: A is (M, K) or (K, M)


def onnxruntime_qdq(proto: onnx.ModelProto) -> onnx.ModelProto:
    """:func:`store_int8_weights`, then :func:`keep_float_layers`: the file for ONNX Runtime."""
    return keep_float_layers(store_int8_weights(proto))


# Quantization target -> the rewrite of its exported fake-quantized graph (an export_onnx
# transform). TensorRT takes per-tensor activation scales only, and its builder decides each
# layer's precision itself.
QDQ_TRANSFORMS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "onnxruntime-cpu": onnxruntime_qdq,
    "tensorrt": store_int8_weights,
}


def check_qdq(path: Path | str, *, target: str, float_convs: Collection[str] = ()) -> dict:
    """Prove an exported INT8 file is what ``target``'s integer kernels need.

    Checks: the graph has QuantizeLinear/DequantizeLinear nodes; every DequantizeLinear of a
    weight reads an INT8 initializer with zero point 0 (no float weight is quantized at run
    time); activations are uint8 (``onnxruntime-cpu``) or int8 with zero point 0
    (``tensorrt``). For ``onnxruntime-cpu`` the file is also optimised by ONNX Runtime (at the
    extended level: QDQ fusion without the NCHWc layout rewrite, whose ops would hide FP32
    convs) and every convolution must have become a QLinearConv, except the ``float_convs``
    kept in FP32; which convolutions stayed float is read off that optimized graph.

    Args:
        path: the exported ``.onnx`` file.
        target: ``"onnxruntime-cpu"`` or ``"tensorrt"``.
        float_convs: names of the convolutions deliberately kept FP32 (see
            :func:`compress.quantization.fake_quant.float_convs`).

    Returns:
        ``{"quantize_nodes", "dequantize_nodes", "int8_weights", "int8_weight_bytes",
        "activation_type", "qlinear_conv", "fp32_conv", "fp32_conv_layers",
        "skipped_but_quantized_by_onnxruntime", "float_ops"}``: ``float_ops`` counts the op
        types of the optimized graph that run in float (:func:`float_ops`: where an INT8 file
        pays for Q/DQ and layout changes), ``fp32_conv_layers`` names the float
        convolutions of ONNX Runtime's optimized graph (by their weight, ``layer1.0.conv1``),
        ``skipped_but_quantized_by_onnxruntime`` counts those of ``float_convs`` it quantized
        anyway (0 for a file written with :func:`keep_float_layers`). The convolution entries
        are None or absent for TensorRT, whose fusion happens at engine build time.

    Raises:
        ExportError: any check fails (one line naming the file and the first problem).
    """
    if target not in QUANT_TARGETS:
        raise ExportError(
            f"unknown quantization target {target!r}; known: {', '.join(QUANT_TARGETS)}"
        )
    path = Path(path)
    try:
        proto = onnx.load(path)
    except Exception as exc:
        raise ExportError(f"{path}: cannot be read as ONNX ({type(exc).__name__})") from exc
    _bypass_identities(proto.graph)
    inits = {init.name: init for init in proto.graph.initializer}
    ops = Counter(node.op_type for node in proto.graph.node)
    if not ops["QuantizeLinear"] or not ops["DequantizeLinear"]:
        raise ExportError(
            f"{path.name}: no QuantizeLinear/DequantizeLinear nodes: the model was not quantized"
        )
    weights = _check_weights(proto, inits, path)
    activation_type = _check_activations(proto, inits, target, path)
    result = {
        "quantize_nodes": ops["QuantizeLinear"],
        "dequantize_nodes": ops["DequantizeLinear"],
        "int8_weights": len(weights),
        "int8_weight_bytes": sum(int(np.prod(inits[name].dims)) for name in weights),
        "activation_type": activation_type,
        "qlinear_conv": None,
        "fp32_conv": None,
    }
    if target == "onnxruntime-cpu":
        result |= _fused_convs(path, len(float_convs))
    return result


def _check_weights(proto: onnx.ModelProto, inits: dict, path: Path) -> list[str]:
    """Names of the INT8 weights; raises on a float weight quantized at run time or a nonzero
    zero point."""
    weights = []
    for node in proto.graph.node:
        source = inits.get(node.input[0]) if node.input else None
        if (
            source is None
            or node.op_type not in ("QuantizeLinear", "DequantizeLinear")
            or len(source.dims) < 2
        ):
            continue
        if node.op_type == "QuantizeLinear" or source.data_type != _INT8:
            raise ExportError(
                f"{path.name}: weight {source.name} is not stored as INT8 (export with "
                "transform=store_int8_weights)"
            )
        zero_point = _zero_point(node, inits)
        if zero_point is not None and np.any(zero_point != 0):
            raise ExportError(
                f"{path.name}: weight {source.name} has a nonzero zero point; weights must be "
                "symmetric"
            )
        weights.append(source.name)
    if not weights:
        raise ExportError(f"{path.name}: no INT8 weight feeds a DequantizeLinear")
    return weights


def _check_activations(proto: onnx.ModelProto, inits: dict, target: str, path: Path) -> str:
    want = _UINT8 if target == "onnxruntime-cpu" else _INT8
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        zero_point = inits.get(node.input[2]) if len(node.input) > 2 else None
        if zero_point is None or zero_point.data_type != want:
            kind = (
                "missing"
                if zero_point is None
                else onnx.TensorProto.DataType.Name(zero_point.data_type).lower()
            )
            raise ExportError(
                f"{path.name}: activation QuantizeLinear {node.name or node.output[0]} has a "
                f"{kind} zero point; {target} needs {onnx.TensorProto.DataType.Name(want).lower()}"
            )
        if target == "tensorrt" and np.any(numpy_helper.to_array(zero_point) != 0):
            raise ExportError(
                f"{path.name}: activation QuantizeLinear {node.name or node.output[0]} has a "
                "nonzero zero point; tensorrt needs symmetric int8"
            )
    return onnx.TensorProto.DataType.Name(want).lower()


def _zero_point(node: onnx.NodeProto, inits: dict) -> np.ndarray | None:
    if len(node.input) < 3 or not node.input[2]:
        return None
    return numpy_helper.to_array(inits[node.input[2]]) if node.input[2] in inits else None


def optimized_nodes(path: Path) -> list[onnx.NodeProto]:
    """The nodes ONNX Runtime's CPU provider runs for ``path`` after its graph optimisation
    (extended level: its fusions into integer kernels, no CPU-specific layout).

    Raises:
        ExportError: ONNX Runtime cannot load the file.
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        optimized = Path(folder) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized)
        try:
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ExportError(
                f"{path}: ONNX Runtime cannot load it: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from exc
        return list(onnx.load(optimized).graph.node)


def _fused_convs(path: Path, skip_count: int) -> dict:
    """QLinearConv and FP32 Conv counts, and the ops that run in float (:func:`float_ops`),
    after ONNX Runtime's graph optimisation."""
    nodes = optimized_nodes(path)
    ops = Counter(node.op_type for node in nodes)
    counts = {
        "qlinear_conv": sum(ops[op] for op in _QLINEAR_CONVS),
        "fp32_conv": sum(ops[op] for op in _FLOAT_CONVS),
        "fp32_conv_layers": sorted(
            node.input[1].removesuffix(".weight") for node in nodes if node.op_type in _FLOAT_CONVS
        ),
    }
    # ONNX Runtime quantizes a float-weight conv itself (per tensor) when its input comes from a
    # per-tensor DequantizeLinear and its output goes to a QuantizeLinear (keep_float_layers
    # says why and how the file avoids it). Recorded, so the export can say so.
    counts["skipped_but_quantized_by_onnxruntime"] = max(skip_count - counts["fp32_conv"], 0)
    counts["float_ops"] = float_ops(ops)
    if counts["fp32_conv"] > skip_count:
        raise ExportError(
            f"{path.name}: {counts['fp32_conv']} convolutions stay FP32 after ONNX Runtime's "
            f"optimisation ({skip_count} kept in float, {counts['qlinear_conv']} QLinearConv): the "
            "Q/DQ placement defeats the INT8 kernels"
        )
    return counts


def float_ops(ops: Counter) -> dict[str, int]:
    """The op types of an optimized graph that run in float, with their counts: all but Q/DQ
    and the integer kernels (``QLinear*``, ``*Integer``, ``QGemm``, ``QAttention``...). Layout
    ops (Transpose, Reshape) count too: between integer kernels they are work INT8 adds."""
    return {
        op: count
        for op, count in sorted(ops.items())
        if op not in ("QuantizeLinear", "DequantizeLinear") and not _integer_kernel(op)
    }


def _integer_kernel(op: str) -> bool:
    name = op.removeprefix("Nhwc")
    return name.startswith(("QLinear", "QGemm", "QAttention", "QOrdered")) or name.endswith(
        "Integer"
    )


# --- portability: does the file compute the same on CPUs with and without VNNI? -------------

META_PORTABLE = "compress.int8_portable"
META_WORST_PAIR = "compress.int8_worst_pair_sum"
META_WORST_LAYER = "compress.int8_worst_layer"
_INTEGER_LAYERS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class Int8Portability:
    """Whether every integer layer of a file stays within the 16-bit lanes of non-VNNI x86
    kernels (see :mod:`compress.quantization.int8_kernels`), and its worst layer.

    ``worst_pair_sum``: the largest |sum| of two same-signed integer weights of one output
    channel, over the layers whose kernels pair products (not depthwise); the file is portable
    when it is at most ``limit`` (128: 255 * 128 fits in 16 bits).
    """

    portable: bool
    layers: int
    paired_layers: int
    layers_at_risk: int
    worst_layer: str | None
    worst_pair_sum: int
    limit: int = PAIR_LIMIT

    @property
    def worst_lane(self) -> int:
        """The largest 16-bit value the worst pair can reach (saturation above 32,767)."""
        return self.worst_pair_sum * U8_MAX

    def to_dict(self) -> dict:
        return asdict(self) | {"worst_lane": self.worst_lane}

    def metadata(self) -> dict[str, str]:
        """The ``metadata_props`` entries that let a reader (``compress bench``) know without
        re-reading the weights."""
        return {
            META_PORTABLE: str(self.portable).lower(),
            META_WORST_PAIR: str(self.worst_pair_sum),
            META_WORST_LAYER: self.worst_layer or "",
        }


def int8_portability(proto: onnx.ModelProto) -> Int8Portability:
    """Check every integer convolution and matrix product of a QDQ graph against the overflow
    bound of x86 u8s8 kernels without VNNI.

    A layer is one Conv, Gemm or MatMul whose weight input is a DequantizeLinear of an INT8
    initializer (through a Transpose, as a linear layer's weight reaches a MatMul). Depthwise
    convolutions are exact on every CPU and counted, not checked.

    Returns:
        The :class:`Int8Portability` record; a file with no integer layer is portable.
    """
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    dequantized = {
        node.output[0]: numpy_helper.to_array(inits[node.input[0]])
        for node in graph.node
        if node.op_type == "DequantizeLinear"
        and node.input[0] in inits
        and inits[node.input[0]].data_type == _INT8
    }
    for node in graph.node:  # a linear layer's weight reaches its MatMul transposed
        if node.op_type == "Transpose" and node.input[0] in dequantized:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            dequantized[node.output[0]] = np.transpose(dequantized[node.input[0]], perm)
    layers = paired = at_risk = worst = 0
    worst_layer = None
    for node in graph.node:
        if (
            node.op_type not in _INTEGER_LAYERS
            or len(node.input) < 2
            or node.input[1] not in dequantized
        ):
            continue
        layers += 1
        weight = dequantized[node.input[1]]
        if node.op_type == "Conv":
            groups = next((a.i for a in node.attribute if a.name == "group"), 1)
            if is_depthwise(weight.shape[1] * groups, weight.shape[0], groups):
                continue
        transposed = node.op_type == "Gemm" and any(
            a.name == "transB" and a.i for a in node.attribute
        )
        axis = 0 if node.op_type == "Conv" or transposed else weight.ndim - 1
        paired += 1
        pair_sum = int(worst_pair_sums(weight, axis=axis).max())
        at_risk += pair_sum > PAIR_LIMIT
        if pair_sum > worst:
            worst, worst_layer = pair_sum, node.name or node.output[0]
    return Int8Portability(worst <= PAIR_LIMIT, layers, paired, at_risk, worst_layer, worst)


def portable_from_metadata(metadata: dict[str, str]) -> bool | None:
    """What a file's metadata says of its portability; None when it says nothing (not ours, or
    exported before the check existed)."""
    value = metadata.get(META_PORTABLE)
    return None if value is None else value == "true"
