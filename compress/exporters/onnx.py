"""ONNX export of an image classifier, the proof that it matches PyTorch, and what the file holds.

Three steps, each usable alone:

* :func:`export_onnx` writes one self-contained ``.onnx`` file with a dynamic (or fixed) batch
  axis and our preprocessing (mean/std/image size/classes) in its ``metadata_props``, so the file
  alone is enough to run it correctly;
* :func:`verify_onnx` runs ONNX Runtime and PyTorch on the same images and fails loudly when they
  disagree (STYLE habit 6: every export proves itself);
* :func:`read_onnx_info` reads size, parameters, MACs and metadata back from any ONNX file, so the
  report and the benchmark describe the exported artifact, not the PyTorch model it came from.

torch is imported inside the functions that need it: reading and benchmarking a file does not
pay for it.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from compress.config import EXPORTERS
from compress.errors import ExportError
from compress.fileio import write_bytes_atomic

if TYPE_CHECKING:
    import onnxruntime
    from torch import nn

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
VERIFY_CHUNK = 64

# Keys of the preprocessing we store in the file's metadata_props (see preprocessing_metadata).
META_MEAN = "compress.mean"
META_STD = "compress.std"
META_IMAGE_SIZE = "compress.image_size"
META_CLASSES = "compress.classes"
META_PRECISION = "compress.precision"  # set by converters that change it (fp16.py); absent = fp32

_PROTOBUF_LIMIT = 2**31 - 1  # a single-file ONNX model is one protobuf message
_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}
_INT8_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
_INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}  # ORT type -> numpy
_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# --- export ---------------------------------------------------------------------------------


def export_onnx(
    model: nn.Module,
    path: Path,
    *,
    image_size: int,
    in_channels: int = 3,
    opset: int = 18,
    exporter: str = "dynamo",
    metadata: dict[str, str] | None = None,
    transform: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None,
    simplify: bool = False,
    batch: int | None = None,
) -> Path:
    """Export a classifier to a single ONNX file with a dynamic (or fixed) batch axis.

    The model is exported in eval mode on CPU and left afterwards in the mode and on the device
    it came in. The graph has one input ``"input"`` (N, C, H, W float32) and one output
    ``"logits"``; N is dynamic unless ``batch`` fixes it. The file is checked with
    ``onnx.checker`` and written atomically: on any failure, Ctrl-C included, ``path`` is
    untouched and no temporary file is left.

    Args:
        model: the PyTorch classifier.
        path: destination ``.onnx`` file; its folder is created if missing.
        image_size: height and width of the example input used for tracing.
        in_channels: channels of the input.
        opset: ONNX opset to target.
        exporter: ``"dynamo"`` (``torch.export``, the default of current torch) or
            ``"torchscript"`` (the legacy tracer; a fallback for models torch.export rejects).
        metadata: string key/values for the model's ``metadata_props``; use
            :func:`preprocessing_metadata` for the preprocessing keys we read back.
        transform: rewrites the exported graph before it is checked and written (e.g.
            :func:`compress.exporters.qdq.store_int8_weights`, which stores quantized weights
            as INT8 initializers).
        simplify: run onnxslim's graph simplification (constant folding, dead and identity node
            removal, fusion of shape arithmetic) after ``transform``; the caller verifies the
            result against PyTorch as for any export.
        batch: None for a dynamic batch axis; an int fixes input and output to that batch size,
            for runtimes and compilers that plan memory or pick kernels for one shape (TensorRT
            without profiles, some NPUs). The file then rejects any other batch size: feed it
            exactly ``batch`` images (:func:`verify_onnx` does).

    Returns:
        ``path``.

    Raises:
        ExportError: the exporter failed (the message is the root cause in one line), the model
            is over the 2 GiB single-file limit, the ONNX checker rejected the result, or
            ``batch`` is not a positive int.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown ONNX exporter {exporter!r}; known: {', '.join(EXPORTERS)}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ExportError(f"batch: expected None (dynamic) or a positive int, got {batch!r}")
    path = Path(path)
    proto = _run_exporter(model, exporter, opset, (batch, in_channels, image_size), path)
    if transform is not None:
        proto = transform(proto)
    if simplify:
        proto = _simplified(proto, path)
    set_metadata(proto, metadata or {})
    data = _checked_bytes(proto, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(path, data)


def preprocessing_metadata(
    mean: Sequence[float], std: Sequence[float], image_size: int, classes: Sequence[str] | int
) -> dict[str, str]:
    """The metadata entries that let a consumer preprocess images for the exported model.

    Args:
        mean: per-channel mean of pixels scaled to [0, 1].
        std: per-channel standard deviation of pixels scaled to [0, 1].
        image_size: the side of the (square) input image.
        classes: class names (without commas), or just their number.

    Returns:
        ``{"compress.mean": "0.485,0.456,0.406", "compress.std": ..., "compress.image_size":
        "32", "compress.classes": "cat,dog,..."}``, ready for ``export_onnx(metadata=...)``.
    """
    names = [str(i) for i in range(classes)] if isinstance(classes, int) else [str(c) for c in classes]
    if any("," in name for name in names):
        raise ValueError(f"class names are stored comma-separated and cannot contain commas: {names}")
    return {
        META_MEAN: ",".join(repr(float(m)) for m in mean),
        META_STD: ",".join(repr(float(s)) for s in std),
        META_IMAGE_SIZE: str(int(image_size)),
        META_CLASSES: ",".join(names),
    }


def _run_exporter(model, exporter, opset, shape, path) -> onnx.ModelProto:
    """Run one exporter; ``shape`` is (batch or None for dynamic, channels, image size)."""
    import torch

    batch, in_channels, image_size = shape
    # Dynamic: batch 2, not 1, as torch.export specialises a size-1 dimension to a constant.
    # Static: an example of exactly that batch and no dynamic axis; both exporters fix it.
    example = torch.randn(batch or 2, in_channels, image_size, image_size)
    export = _export_dynamo if exporter == "dynamo" else _export_torchscript
    with _eval_on_cpu(model), _quiet():
        try:
            return export(model, example, opset, dynamic=batch is None)
        except Exception as exc:
            raise ExportError(f"{exporter} ONNX exporter failed for {path.name}: {_root_cause(exc)}") from exc


def _export_dynamo(model, example, opset, dynamic: bool) -> onnx.ModelProto:
    import torch

    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        model,
        (example,),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},) if dynamic else None,  # a tuple: forward's arg has any name
        opset_version=opset,
        dynamo=True,
        optimize=True,
        verbose=False,
    )
    return program.model_proto


def _export_torchscript(model, example, opset, dynamic: bool) -> onnx.ModelProto:
    import torch

    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        (example,),
        buffer,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None,
        opset_version=opset,
        do_constant_folding=True,
        dynamo=False,
    )
    return onnx.load_model_from_string(buffer.getvalue())


def _simplified(proto: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    import onnxslim

    try:
        with _quiet():
            return onnxslim.slim(proto)
    except Exception as exc:
        raise ExportError(f"onnxslim could not simplify {path.name}: {_root_cause(exc)}") from exc


def set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """Add or replace ``metadata_props`` entries (string keys and values), keeping the others."""
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"ONNX metadata must map str to str, got {key!r}: {value!r}")
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    for key, value in chain(kept, metadata.items()):
        proto.metadata_props.add(key=key, value=value)


def add_metadata(path: Path | str, metadata: dict[str, str]) -> Path:
    """Rewrite an ONNX file with ``metadata`` added to its ``metadata_props`` (atomically)."""
    path = Path(path)
    proto = load_onnx(path)
    set_metadata(proto, metadata)
    return write_bytes_atomic(path, _checked_bytes(proto, path))


def _checked_bytes(proto: onnx.ModelProto, path: Path) -> bytes:
    size = proto.ByteSize()
    if size > _PROTOBUF_LIMIT:
        raise ExportError(
            f"{path.name}: the exported model is {size / 2**30:.1f} GiB, over ONNX's 2 GiB "
            "single-file limit (external-data export is not supported yet)"
        )
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ExportError(f"{path.name}: the ONNX checker rejected the export: {_one_line(exc)}") from exc
    return proto.SerializeToString()


@contextlib.contextmanager
def _eval_on_cpu(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode on CPU inside the block; every submodule's mode and the device restored after."""
    modes = [(module, module.training) for module in model.modules()]
    first = next(chain(model.parameters(), model.buffers()), None)
    device = first.device if first is not None else None
    model.eval().to("cpu")
    try:
        yield model
    finally:
        if device is not None:
            model.to(device)
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' stdout progress and deprecation chatter; our CLI reports progress."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _root_cause(exc: BaseException) -> str:
    """The innermost exception of a chain, as ``Type: first line``: the exporters wrap the real
    reason (an unsupported op, a data-dependent branch) in several layers of advice."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {_one_line(exc)}"


def _one_line(exc: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- verification ---------------------------------------------------------------------------


def verify_onnx(
    path: Path, model: nn.Module, images: np.ndarray, *, tolerance: float, min_agreement: float, relative: bool = False,
    exact_int8: bool = False,
) -> dict:
    """Prove an exported file reproduces the PyTorch model on real inputs (STYLE habit 6).

    Both run on CPU: ONNX Runtime's CPUExecutionProvider and the model in float32, in eval mode
    under ``no_grad`` (its mode and device are restored afterwards). ONNX Runtime is fed the
    file's own input type (float32, or float16 for an FP16 file) and both outputs are compared in
    float64. Images go in chunks of 64; a file with a static batch size B gets chunks of exactly
    B images: only whole chunks are used, and fewer than B images are repeated to fill one.

    Args:
        path: the exported ``.onnx`` file.
        model: the PyTorch model it was exported from.
        images: float32 (N, C, H, W) batch, already normalised as the model expects.
        tolerance: largest acceptable absolute difference of any logit, multiplied by the
            largest |logit| of the PyTorch model when that exceeds 1 (:func:`allowed_abs_diff`).
        min_agreement: smallest acceptable fraction of images with the same top-1 class.
        relative: ``tolerance`` bounds the difference divided by the largest |logit| of the
            PyTorch model instead (an INT8 graph's rounding error scales with its output range,
            so an absolute bound would depend on how confident the model is).
        exact_int8: run ONNX Runtime's exact u8u8 integer kernels (``session.x64quantprecision``)
            instead of its u8s8 ones: what a VNNI CPU computes, proven on a CPU without VNNI
            (see :func:`open_session`).

    Returns:
        ``{"max_abs_diff", "mean_abs_diff", "max_abs_logit", "max_rel_diff", "top1_agreement",
        "samples", "tolerance", "relative", "min_agreement"}`` (``samples``: images compared,
        repeats included); worth writing into the export artifact.

    Raises:
        ExportError: the file cannot be run, its input type is neither float32 nor float16, its
            output shape differs from PyTorch's, or the difference/agreement is out of bounds
            (the message states both numbers). In the last case the error's ``result`` attribute
            holds the dict above.
    """
    path = Path(path)
    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ExportError(f"verify {path.name}: expected a non-empty (N, C, H, W) batch, got shape {images.shape}")
    import torch

    session = open_session(path, exact_int8=exact_int8)
    chunks = _verify_chunks(images, session.get_inputs()[0].shape[0])
    with _eval_on_cpu(model), torch.no_grad():
        diffs = [_chunk_diff(session, model, chunk, path) for chunk in chunks]
    max_abs_diff, max_abs_logit = max(d[0] for d in diffs), max(d[4] for d in diffs)
    samples = sum(len(chunk) for chunk in chunks)
    result = {
        "max_abs_diff": max_abs_diff,
        "mean_abs_diff": sum(d[1] for d in diffs) / sum(d[2] for d in diffs),
        "max_abs_logit": max_abs_logit,
        "max_rel_diff": max_abs_diff / max_abs_logit if max_abs_logit > 0 else max_abs_diff,
        "top1_agreement": sum(d[3] for d in diffs) / samples,
        "samples": samples,
        "tolerance": tolerance,
        "relative": relative,
        "min_agreement": min_agreement,
    }
    _raise_if_out_of_bounds(result, path)
    return result


def open_session(path: Path, threads: int = 0, *, exact_int8: bool = False) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session for ``path``; any loading failure becomes one-line ExportError.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads; 0 keeps ONNX Runtime's default (one per physical core).
        exact_int8: on x86 CPUs without VNNI, convert int8 weights to uint8 at load time
            (``session.x64quantprecision``) so no product pair saturates: slower, but the
            sums a VNNI CPU computes. No effect elsewhere.

    Returns:
        The session, with all graph optimisations enabled.

    Raises:
        ExportError: the file is missing or ONNX Runtime cannot load it.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        options.intra_op_num_threads = threads
    if exact_int8:
        options.add_session_config_entry("session.x64quantprecision", "1")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"{path}: ONNX Runtime cannot load it: {_one_line(exc)}") from exc


def _verify_chunks(images: np.ndarray, batch: Any) -> list[np.ndarray]:
    """VERIFY_CHUNK-sized chunks for a dynamic batch axis (``batch`` is its name or None); for a
    static one, whole chunks of exactly ``batch`` images, repeating them if there are fewer."""
    if not isinstance(batch, int) or batch < 1:
        return [images[i : i + VERIFY_CHUNK] for i in range(0, len(images), VERIFY_CHUNK)]
    if len(images) < batch:
        images = np.resize(images, (batch, *images.shape[1:]))  # repeats the images cyclically
    return [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]


def _chunk_diff(session, model, chunk: np.ndarray, path: Path) -> tuple[float, float, int, int, float]:
    """(max |diff|, sum |diff|, number of logits, top-1 agreements, max |PyTorch logit|) of one
    chunk; the model is already in eval mode on CPU under no_grad."""
    import torch

    feed = session.get_inputs()[0]
    if feed.type not in _INPUT_DTYPES:
        raise ExportError(f"{path.name}: cannot verify an input of type {feed.type} (float or float16 only)")
    ours = session.run(None, {feed.name: chunk.astype(_INPUT_DTYPES[feed.type])})[0]
    theirs = model(torch.from_numpy(chunk))
    theirs = (theirs[0] if isinstance(theirs, (tuple, list)) else theirs).numpy()
    if ours.shape != theirs.shape:
        raise ExportError(f"{path.name}: ONNX output shape {ours.shape} differs from PyTorch's {theirs.shape}")
    diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
    agree = int((ours.argmax(axis=1) == theirs.argmax(axis=1)).sum())
    return float(diff.max()), float(diff.sum()), diff.size, agree, float(np.abs(theirs).max())


def compare_logits(ours: np.ndarray, theirs: np.ndarray, path: Path, *, tolerance: float, min_agreement: float, relative: bool) -> dict:
    """The verification record of logits from another runtime (a TensorRT engine, a converted
    file) against reference logits on the same inputs, with :func:`verify_onnx`'s keys and bounds.

    Raises:
        ExportError: different shapes, or out of bounds (the error's ``result`` holds the record).
    """
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if ours.shape != theirs.shape:
        raise ExportError(f"{Path(path).name}: output shape {ours.shape} differs from the reference's {theirs.shape}")
    diff = np.abs(ours - theirs)
    max_abs_logit = float(np.abs(theirs).max())
    result = {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_logit": max_abs_logit,
        "max_rel_diff": float(diff.max()) / max_abs_logit if max_abs_logit > 0 else float(diff.max()),
        "top1_agreement": float(np.mean(ours.argmax(axis=1) == theirs.argmax(axis=1))),
        "samples": len(ours),
        "tolerance": tolerance,
        "relative": relative,
        "min_agreement": min_agreement,
    }
    _raise_if_out_of_bounds(result, Path(path))
    return result


def allowed_abs_diff(result: dict) -> float:
    """The absolute bound an FP32 check applies: ``tolerance`` for logits up to 1 in magnitude,
    ``tolerance`` times the largest |logit| beyond (float rounding grows with the values: an
    undertrained network with logits of 10^4 differs by 10^-2 between two correct runtimes)."""
    return result["tolerance"] * max(1.0, result["max_abs_logit"])


def _raise_if_out_of_bounds(result: dict, path: Path) -> None:
    bad_diff = result["max_rel_diff"] > result["tolerance"] if result["relative"] else result["max_abs_diff"] > allowed_abs_diff(result)
    bad_agreement = result["top1_agreement"] < result["min_agreement"]
    if bad_diff or bad_agreement:
        error = ExportError(
            f"{path.name} does not reproduce the PyTorch model on {result['samples']} images: "
            f"max |diff| {_diff_text(result)}, "
            f"top-1 agreement {result['top1_agreement']:.2%} (minimum {result['min_agreement']:.2%})"
        )
        error.result = result
        raise error


def _diff_text(result: dict) -> str:
    if result["relative"]:
        return (f"{result['max_abs_diff']:.3g} = {result['max_rel_diff']:.2%} of the largest logit "
                f"{result['max_abs_logit']:.3g} (tolerance {result['tolerance']:.2%})")
    if result["max_abs_logit"] > 1:
        return (f"{result['max_abs_diff']:.3g} (tolerance {result['tolerance']:g} x the largest logit "
                f"{result['max_abs_logit']:.3g} = {allowed_abs_diff(result):.3g})")
    return f"{result['max_abs_diff']:.3g} (tolerance {result['tolerance']:g})"


# --- reading back ---------------------------------------------------------------------------


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
        "file_bytes": path.stat().st_size,
        "input_shape": _input_shape(model),
        "metadata": {p.key: p.value for p in model.metadata_props},
        "opset": _opset(model),
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
    if not path.is_file():
        raise ExportError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(path)
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ExportError(f"{path}: not a valid ONNX model ({_one_line(exc)})") from exc
    if not model.graph.node:
        raise ExportError(f"{path}: not a valid ONNX model (its graph has no nodes)")
    return model


def count_params(model: onnx.ModelProto) -> int:
    """Elements of the floating-point initializers of rank >= 1, and of the 8-bit ones that a
    DequantizeLinear turns into weights (see :func:`read_onnx_info`)."""
    qdq = [node for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")]
    dequantized = {node.input[0] for node in qdq if node.op_type == "DequantizeLinear"}
    scales = {name for node in qdq for name in node.input[1:]}  # per-channel scales are not weights
    return sum(
        math.prod(init.dims)
        for init in model.graph.initializer
        if len(init.dims) >= 1
        and init.name not in scales
        and (init.data_type in _FLOAT_TYPES or (init.data_type in _INT8_TYPES and init.name in dequantized))
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


def _opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
