"""PyTorch to one self-contained ``.onnx`` file (over 2 GiB, with its weights in a sidecar:
:mod:`compress.exporters.onnx.files`): the dynamo or TorchScript exporter, a dynamic (or fixed)
batch axis, optional onnxslim simplification, and our preprocessing (mean/std/image
size/classes) in ``metadata_props``, so the file alone is enough to run it correctly."""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from compress.errors import ExportError, first_line
from compress.exporters.onnx.files import over_limit, write_onnx
from compress.exporters.onnx.graph import load_onnx, opset_of
from compress.exporters.spec import EXPORTERS
from compress.nets.modes import evaluating

if TYPE_CHECKING:
    from torch import nn

INPUT_NAME = "input"


OUTPUT_NAME = "logits"


# Keys of the preprocessing we store in the file's metadata_props (see preprocessing_metadata).
META_MEAN = "compress.mean"


META_STD = "compress.std"


META_IMAGE_SIZE = "compress.image_size"


META_CLASSES = "compress.classes"


META_PRECISION = "compress.precision"  # set by converters that change it (fp16.py); absent = fp32


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
    """Export a classifier to one ONNX file with a dynamic (or fixed) batch axis; over 2 GiB,
    its weights go to ``<name>.onnx.data`` beside it (:mod:`compress.exporters.onnx.files`).

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
            is over 2 GiB with ``simplify``, the ONNX checker rejected the result, or
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
    return write_onnx(proto, path)


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
    names = (
        [str(i) for i in range(classes)] if isinstance(classes, int) else [str(c) for c in classes]
    )
    if any("," in name for name in names):
        raise ValueError(
            f"class names are stored comma-separated and cannot contain commas: {names}"
        )
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
            # torch.export writes opset 18 and up; below that we convert (quietly) ourselves.
            asked = max(opset, DYNAMO_MIN_OPSET) if exporter == "dynamo" else opset
            proto = export(model, example, asked, dynamic=batch is None)
        except Exception as exc:
            raise ExportError(
                f"{exporter} ONNX exporter failed for {path.name}: {_root_cause(exc)}"
            ) from exc
        return _at_opset(proto, opset, exporter, path)


DYNAMO_MIN_OPSET = 18  # the oldest opset torch.onnx's dynamo exporter has implementations for


def _at_opset(proto: onnx.ModelProto, opset: int, exporter: str, path: Path) -> onnx.ModelProto:
    """``proto`` at exactly ``opset``, converted down if needed, or ExportError.

    The file must be what the record says: the dynamo exporter keeps opset 18 when its own
    down-conversion fails (with a warning and tracebacks on stderr), so a run asked for 17
    would have recorded 17 beside a file at 18.
    """
    if opset_of(proto) == opset:
        return proto
    try:  # the converter can also write a graph its own checker rejects (ReduceMean 18 at 17)
        converted = onnx.version_converter.convert_version(proto, opset)
        onnx.checker.check_model(converted)
    except Exception as exc:
        raise ExportError(
            f"{path.name}: the {exporter} exporter wrote opset {opset_of(proto)} and ONNX's "
            f"version converter cannot take this network to opset {opset} "
            f"({_root_cause(exc)}); use opset >= {opset_of(proto)}"
            + (" or exporter: torchscript" if exporter == "dynamo" else "")
        ) from exc
    if opset_of(converted) != opset:
        raise ExportError(
            f"{path.name}: asked for opset {opset}, the converter wrote {opset_of(converted)}"
        )
    return converted


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
    """Exported to a scratch folder, not to memory: over 2 GiB, the exporter writes the weights
    as files beside the graph, which it can only do for a path."""
    import torch

    with tempfile.TemporaryDirectory(prefix="compress-export-") as folder:
        scratch = Path(folder) / "model.onnx"
        torch.onnx.export(
            model,
            (example,),
            str(scratch),  # a str: the exporter writes weights beside it only for one
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
        return onnx.load(scratch)  # the weights read into memory, whichever way they were written


def _simplified(proto: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    import onnxslim

    if over_limit(proto):
        raise ExportError(
            f"{path.name}: simplify works on models up to 2 GiB and this one is larger; set "
            "export.simplify: false"
        )

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
    return write_onnx(proto, path)


@contextlib.contextmanager
def _eval_on_cpu(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode on CPU inside the block; every submodule's mode and the device restored after."""
    first = next(chain(model.parameters(), model.buffers()), None)
    device = first.device if first is not None else None
    with evaluating(model.to("cpu")):
        try:
            yield model
        finally:
            if device is not None:
                model.to(device)


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
    return f"{type(exc).__name__}: {first_line(exc)}"
