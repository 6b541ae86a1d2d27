"""One network to one proven file: the ONNX export, its verification against PyTorch, the INT8
portability proof, and the formats built from it (FP16 ONNX, TensorRT engines).

The export stage, ``compress export`` and the library's :func:`compress.export` all call
:func:`export_network`; nothing here knows about recipes or runs.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from compress.core.fileio import sidecar, write_text_atomic
from compress.core.records import QuantSpec
from compress.errors import ExportError
from compress.exporters.formats import FORMATS
from compress.exporters.onnx.export import export_onnx
from compress.exporters.onnx.files import move_onnx, remove_onnx
from compress.exporters.onnx.verify import NOISE_FLOOR_EPSILON, verify_onnx
from compress.exporters.spec import ExportConfig

QUANTIZED_EXPORTER = "torchscript"
FAILED_SUFFIX = ".failed-check"  # what a file that failed its proof is renamed to


@contextmanager
def proven(path: Path) -> Iterator[Path]:
    """The name to write ``path`` under until its proof passes: the file appears at ``path``
    (the deliverable a user benches and deploys) only when the block succeeds.

    When the block raises an ExportError after writing (the file does not reproduce the model,
    or is not the graph it should be), the file is kept for inspection as
    ``<name>.failed-check`` with the reason in ``<name>.failed-check.txt``, and a ``path`` left
    by an earlier run is removed: it belongs to other inputs. Interrupted, the pending file is
    removed. A file over 2 GiB moves with its sidecar (:mod:`compress.exporters.onnx.files`);
    failed, the two are kept in a folder ``<name>.failed-check/`` under their own names (the
    graph names its sidecar).
    """
    path = Path(path)
    # the same name in a hidden folder: messages name the file as it will be
    folder = path.parent / f".{path.name}.unverified"
    pending, failed = folder / path.name, path.with_name(path.name + FAILED_SUFFIX)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield pending
    except ExportError as exc:
        if not pending.exists():  # nothing was written (a format that cannot be built here)
            raise
        _remove_failed(failed)
        if sidecar(pending).is_file():
            failed.mkdir()
            move_onnx(pending, failed / path.name)
        else:
            os.replace(pending, failed)
        write_text_atomic(failed.with_name(failed.name + ".txt"), f"{exc}\n")
        remove_onnx(path)
        raise ExportError(
            f"{exc} (not written as {path.name}; the file that failed is kept as {failed.name})"
        ) from None
    else:
        move_onnx(pending, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    _remove_failed(failed)  # an earlier failure of this file is superseded
    failed.with_name(failed.name + ".txt").unlink(missing_ok=True)


def _remove_failed(failed: Path) -> None:
    """An earlier failed file: one file, or the folder of a file with a sidecar."""
    if failed.is_dir() and not failed.is_symlink():
        shutil.rmtree(failed)
    else:
        failed.unlink(missing_ok=True)


def export_network(
    model,
    path: Path,
    cfg: ExportConfig,
    images: np.ndarray,
    metadata: dict,
    quantization: QuantSpec | None,
    *,
    image_size: int,
    in_channels: int,
    warn: bool = True,
) -> dict:
    """One network to one proven ONNX file: FP32, or a QDQ graph for a quantized network.

    Multi-branch blocks (RepVGG, MobileOne, FastViT...) are written in their inference form,
    one convolution each (:mod:`compress.quantization.reparameterized`), as a quantized
    network's are; the file is proven against the network as it was trained.

    A quantized network goes through the TorchScript exporter (``torch.export`` has no
    fake-tensor kernels for the fake-quantize ops), gets its weights stored as INT8
    initializers, is checked against its fake-quantized PyTorch model with the INT8 bounds
    (ONNX Runtime's integer kernels round differently) and has its graph verified (Q/DQ nodes,
    INT8 weights with zero point 0, the target's activation type, no FP32 convolution left after
    ONNX Runtime's optimisation).

    Args:
        images: normalised check inputs (what the model takes), float32 NCHW.
        quantization: how a fake-quantized model was quantized (None: a float model).
        image_size, in_channels: the input the file declares.

    The file appears at ``path`` only once its proof passed (see :func:`proven`).

    Returns:
        The verification record (see :func:`compress.exporters.onnx.verify_onnx`), with
        ``"qdq"`` for a quantized network and ``"batch"`` (None: dynamic).
    """
    with proven(path) as pending:
        return _export_and_verify(
            model,
            pending,
            cfg,
            images,
            metadata,
            quantization,
            image_size=image_size,
            in_channels=in_channels,
            warn=warn,
        )


def _export_and_verify(
    model, path: Path, cfg, images, metadata, quantization, *, image_size, in_channels, warn
) -> dict:
    common = dict(
        image_size=image_size,
        in_channels=in_channels,
        opset=cfg.opset,
        batch=cfg.batch,
        simplify=cfg.simplify,
    )
    if quantization is None:
        import torch

        from compress.quantization.reparameterized import with_reparameterized_branches

        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        deployed = with_reparameterized_branches(model, torch.from_numpy(images[:2]).to(device))
        export_onnx(deployed, path, exporter=cfg.exporter, metadata=metadata, **common)
        return verify_onnx(  # against the network as trained: the fold is proven with the file
            path, model, images, tolerance=cfg.tolerance, min_agreement=cfg.min_agreement
        ) | {"batch": cfg.batch}
    from compress.exporters.qdq import QDQ_TRANSFORMS, check_qdq
    from compress.quantization.fake_quant import float_convs

    metadata = metadata | {
        "compress.quantization.fake_quant": quantization.target,
        "compress.int8_weight_range": quantization.weight_range,
    }
    export_onnx(
        model,
        path,
        exporter=QUANTIZED_EXPORTER,
        metadata=metadata,
        transform=QDQ_TRANSFORMS[quantization.target],
        **common,
    )
    portability, exact = prove_portability(
        path, quantization.weight_range, quantization.target, warn=warn
    )
    result = verify_onnx(
        path,
        model,
        images,
        tolerance=cfg.int8_tolerance,
        min_agreement=cfg.int8_min_agreement,
        relative=True,
        exact_int8=exact,
        noise_floor=True,  # one code rounded the other way can cascade through an INT8 network
    )
    if result.get("proof") == "reference noise" and warn:
        print(
            f"warning: {path.name} is proven only as far as the PyTorch model reproduces itself "
            f"(its logits move by up to {result['reference_noise_max']:.3g} and its top-1 on "
            f"{result['unstable_samples']} of {result['samples']} images when inputs and layers "
            f"change by {NOISE_FLOOR_EPSILON:g}; the file: {result['max_abs_diff']:.3g}, "
            f"{result['flips']} images): train the network further for a sharper proof.",
            file=sys.stderr,
        )
    result["portability"] = portability
    result["qdq"] = check_qdq(path, target=quantization.target, float_convs=float_convs(model))
    requantized = result["qdq"].get("skipped_but_quantized_by_onnxruntime")
    if requantized and warn:
        print(
            f"warning: ONNX Runtime quantizes {requantized} of the layers kept in float "
            f"(quantize.skip) anyway (per tensor) when it loads {path.name}.",
            file=sys.stderr,
        )
    return result | {"batch": cfg.batch}


def prove_portability(
    path: Path, weight_range: str, target: str, *, warn: bool
) -> tuple[dict, bool]:
    """Check an INT8 file against the overflow bound of x86 kernels without VNNI and write the
    verdict into its metadata (:func:`compress.exporters.qdq.int8_portability`).

    A file that is not portable cannot be verified with ONNX Runtime's default kernels on a CPU
    that saturates it: there it is verified with the exact u8u8 kernels instead, which compute
    what a VNNI CPU does, and a warning says so.

    Returns:
        ``(record for the export metrics, whether to verify with exact_int8)``.

    Raises:
        ExportError: a portable ``weight_range`` produced a file that is not portable.
    """
    from compress.core.cpu_features import cpu_features
    from compress.exporters.onnx.export import add_metadata
    from compress.exporters.onnx.graph import load_onnx
    from compress.exporters.qdq import int8_portability
    from compress.quantization.int8_kernels import WEIGHT_RANGES

    report = int8_portability(load_onnx(path))
    add_metadata(path, report.metadata())
    if WEIGHT_RANGES[weight_range].portable and not report.portable:
        raise ExportError(
            f"{path.name}: weight_range {weight_range} should stay within the 16-bit lanes of CPUs "
            f"without VNNI, but layer {report.worst_layer} pairs weights summing to "
            f"{report.worst_pair_sum} (limit {report.limit})"
        )
    cpu = cpu_features()
    exact = cpu.saturates_u8s8 and not report.portable
    if exact and warn and target == "onnxruntime-cpu":
        print(
            f"warning: {path.name} has full-range INT8 weights (quantize.weight_range: "
            f"{weight_range}), which this CPU ({cpu.summary()}) saturates; it was verified with "
            "ONNX Runtime's exact u8u8 kernels and gives these answers only on CPUs with VNNI (or "
            "ARM). Use weight_range: auto for a file that is right everywhere.",
            file=sys.stderr,
        )
    verified_with = "u8u8 (session.x64quantprecision)" if exact else "u8s8"
    return report.to_dict() | {
        "weight_range": weight_range,
        "cpu": cpu.summary(),
        "verified_with": verified_with,
    }, exact


def export_derived_formats(
    onnx_path: Path,
    model,
    cfg: ExportConfig,
    images: np.ndarray,
    quantization: QuantSpec | None,
    *,
    warn: bool,
    timing_cache: Path | None,
) -> dict[str, tuple[dict, Path | None]]:
    """Every format of ``cfg.formats`` but ONNX, built from the proven ONNX file.

    Returns:
        ``{format: (outcome, file or None)}``; outcome is ``{"status": "ok", "file", ...the
        verification}`` or ``{"status": "skipped", "reason"}`` (a float-only format for an INT8
        model, TensorRT absent).
    """
    derived = {}
    for name in cfg.formats:
        fmt = FORMATS.get(name)
        if fmt.build is None:  # ONNX itself: the file everything is built from
            continue
        target = onnx_path.with_name(onnx_path.name.removesuffix(".onnx") + fmt.suffix)
        reason = fmt.not_applicable(quantization)
        if reason is None:
            try:
                with proven(target) as pending:
                    outcome = fmt.builder(
                        onnx_path,
                        pending,
                        model,
                        images,
                        cfg,
                        int8=quantization is not None,
                        timing_cache=timing_cache,
                    )
            except ExportError as exc:
                if not _is_unavailable(exc):
                    raise
                reason = str(exc)
        if reason is not None:
            if warn and fmt.needs_gpu:
                print(f"warning: no {fmt.title} for {onnx_path.name}: {reason}", file=sys.stderr)
            derived[name] = ({"status": "skipped", "reason": reason}, None)
        else:
            derived[name] = ({"status": "ok", "file": target.name, **outcome}, target)
    return derived


def _is_unavailable(exc: ExportError) -> bool:
    from compress.exporters.tensorrt import TensorRTUnavailable

    return isinstance(exc, TensorRTUnavailable)


# A file the accuracy budget measures is not certified (the export stage proves the file it
# writes): the bounds only catch a file that has nothing to do with its network. A network that
# INT8 has ruined has logits near zero, where the integer kernels' rounding is a large fraction.
MEASURED_EXPORT = ExportConfig(check_samples=256, int8_tolerance=10.0, int8_min_agreement=0.0)
_CHUNK = 256  # images per session.run


def run_exported(network, images: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """``network`` exported as the export stage writes it, into a temporary file, and that file
    run by ONNX Runtime on ``images``: ``(logits, the convolutions ONNX Runtime's optimized
    graph runs in float)``. How :func:`compress.quantization.budget.keep_float` judges a
    candidate: by its file, never in PyTorch."""
    import tempfile

    from compress.exporters.onnx.verify import open_session

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "candidate.onnx"
        check = export_network(
            network,
            path,
            MEASURED_EXPORT,
            images[: MEASURED_EXPORT.check_samples],
            {},
            getattr(network, "quant_spec", None),
            image_size=images.shape[-1],
            in_channels=images.shape[1],
            warn=False,
        )
        session = open_session(path)
        name = session.get_inputs()[0].name
        logits = np.concatenate(
            [
                session.run(None, {name: images[start : start + _CHUNK]})[0]
                for start in range(0, len(images), _CHUNK)
            ]
        )
    return logits, tuple(check.get("qdq", {}).get("fp32_conv_layers") or ())
