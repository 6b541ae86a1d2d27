"""What an ONNX file holds, read back from the file: size, parameters, MACs, input shape, opset
and metadata, so the report and the bench describe the exported artifact, not the PyTorch
model it came from."""

from __future__ import annotations

import math
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from compress.core.fileio import content_bytes, not_a_file, sidecar
from compress.errors import ExportError, first_line

if TYPE_CHECKING:
    pass

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}


_INT8_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}


_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def read_onnx_info(path: Path | str) -> dict:
    """Size, parameters, MACs, input shape, metadata and opset of an ONNX file.

    Parameters are the elements of the floating-point initializers of rank >= 1 (weights and
    biases; scalar constants such as Clip bounds are not parameters), each stored tensor once.
    This counts what the file holds, which differs from PyTorch's ``parameters()`` in known ways:

    * BatchNorm after a convolution is folded into it by both exporters in eval mode, so its
      2*C scale/shift become the convolution's C-element bias: a conv->BN pair counts C fewer
      parameters than in PyTorch (C = BN channels). An unfolded BatchNormalization node would
      count its running mean and variance too.
    * Exporters may drop all-zero biases or share identical tensors (freshly initialised
      models have many); trained models rarely do.
    * Quantized weights (8-bit initializers read by a DequantizeLinear) count like float ones,
      and quantization scales and zero points do not, so an INT8 model has the parameter count
      of the float model it came from.

    MACs are counted for one image after ONNX shape inference (a static batch of B is counted
    whole and divided by B: its graph may reshape with B baked in), for Conv (output elements *
    Cin/groups * kH * kW), ConvTranspose (input elements * Cout/groups * kH * kW), Gemm and
    MatMul (M * N * K). Everything else (bias adds, BatchNorm, activations, pooling, elementwise
    ops) is ignored: it is a few percent of a CNN's work at most. Nodes inside subgraphs
    (If/Loop) are not visited. Nodes whose shapes cannot be inferred are counted in
    ``"macs_skipped"``.

    Args:
        path: the ``.onnx`` file.

    Returns:
        ``{"params", "macs", "macs_skipped", "file_bytes", "input_shape", "metadata", "opset"}``;
        ``input_shape`` has the dynamic axes as their names (e.g. ``["batch", 3, 32, 32]``) and
        fixed ones as ints (``[8, 3, 32, 32]`` for a static batch of 8).

    Raises:
        ExportError: the file is missing, empty, corrupt or not an ONNX model (one line naming
            the file).
    """
    path = Path(path)
    model = load_onnx(path)
    macs, skipped = count_macs(model)
    return {
        "params": count_params(model),
        "macs": macs,
        "macs_skipped": skipped,
        "file_bytes": content_bytes(path),  # its sidecar's too
        "input_shape": _input_shape(model),
        "metadata": {p.key: p.value for p in model.metadata_props},
        "opset": opset_of(model),
    }


def load_onnx(path: Path | str) -> onnx.ModelProto:
    """Load and check an ONNX file, turning every way it can be broken into one ExportError.

    Args:
        path: the ``.onnx`` file.

    Returns:
        The checked model.

    Raises:
        ExportError: missing, unreadable, not a protobuf, or rejected by ``onnx.checker``.
    """
    path = Path(path)
    problem = not_a_file(path)
    if problem is not None:
        raise ExportError(f"{path}: {problem}; expected an ONNX file")
    try:
        model = onnx.load(path)  # with its sidecar's weights, if it has one
        # the checker cannot serialise a model over 2 GiB: it reads one with a sidecar from disk
        onnx.checker.check_model(str(path) if sidecar(path).is_file() else model)
    except Exception as exc:
        raise ExportError(f"{path}: not a valid ONNX model ({first_line(exc)})") from exc
    if not model.graph.node:
        raise ExportError(f"{path}: not a valid ONNX model (its graph has no nodes)")
    return model


def count_params(model: onnx.ModelProto) -> int:
    """Elements of the floating-point initializers of rank >= 1, and of the 8-bit ones that a
    DequantizeLinear turns into weights (see :func:`read_onnx_info`)."""
    qdq = [
        node for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
    ]
    dequantized = {node.input[0] for node in qdq if node.op_type == "DequantizeLinear"}
    scales = {name for node in qdq for name in node.input[1:]}  # per-channel scales are not weights
    return sum(
        math.prod(init.dims)
        for init in model.graph.initializer
        if len(init.dims) >= 1
        and init.name not in scales
        and (
            init.data_type in _FLOAT_TYPES
            or (init.data_type in _INT8_TYPES and init.name in dequantized)
        )
    )


def count_macs(model: onnx.ModelProto) -> tuple[int, int]:
    """(MACs per image, nodes skipped for unknown shapes); the rules are in read_onnx_info."""
    shapes = _shapes_at_batch_1(model)
    total, skipped = 0, 0
    for node in model.graph.node:
        if node.op_type not in _MAC_OPS:
            continue
        macs = _node_macs(node, shapes)
        if macs is None:
            skipped += 1
        else:
            total += macs
    batch = next(iter(_input_shape(model)), None)
    return (total // batch if isinstance(batch, int) and batch > 1 else total), skipped


def _shapes_at_batch_1(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Every value's inferred shape once a dynamic batch axis is fixed to 1 (None: unknown dim)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]  # the exporter's symbolic shapes; inference recomputes them
    weights = {init.name for init in fixed.graph.initializer}
    for value in chain(fixed.graph.input, fixed.graph.output):
        if value.name in weights:
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value"):
                dim.Clear()
                if axis == 0:
                    dim.dim_value = 1
    inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    graph = inferred.graph
    for value in chain(graph.input, graph.output, graph.value_info):
        if value.type.tensor_type.HasField("shape"):
            shapes.setdefault(value.name, [_dim(d) for d in value.type.tensor_type.shape.dim])
    return shapes


def _node_macs(node: onnx.NodeProto, shapes: dict[str, list[int | None]]) -> int | None:
    def shape(i: int) -> list[int | None] | None:
        return shapes.get(node.input[i]) if len(node.input) > i else None

    out = shapes.get(node.output[0])
    if node.op_type == "Conv":  # weight: (Cout, Cin/groups, *kernel)
        return _prod(out, _tail(shape(1)))
    if node.op_type == "ConvTranspose":  # weight: (Cin, Cout/groups, *kernel)
        return _prod(shape(0), _tail(shape(1)))
    if node.op_type == "Gemm":
        a = shape(0)
        trans_a = any(attr.name == "transA" and attr.i for attr in node.attribute)
        return _prod(out, None if a is None or len(a) != 2 else [a[0] if trans_a else a[1]])
    a = shape(0)  # MatMul: (..., M, K) x (..., K, N)
    return _prod(out, None if not a else [a[-1]])


def _tail(shape: list[int | None] | None) -> list[int | None] | None:
    return None if not shape else shape[1:]


def _prod(*shapes: list[int | None] | None) -> int | None:
    dims = [d for s in shapes if s is not None for d in s]
    if any(s is None for s in shapes) or any(d is None for d in dims):
        return None
    return math.prod(dims)


def _dim(dim: onnx.TensorShapeProto.Dimension) -> int | None:
    return dim.dim_value if dim.HasField("dim_value") else None


def _input_shape(model: onnx.ModelProto) -> list[Any]:
    weights = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in weights]
    if not inputs:
        return []
    dims = inputs[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]


def opset_of(model: onnx.ModelProto) -> int | None:
    """The default-domain (``ai.onnx``) opset a graph imports; None if it imports none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
