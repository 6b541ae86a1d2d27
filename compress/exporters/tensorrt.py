"""TensorRT engines from our ONNX files, with the ``tensorrt`` Python API (extra ``[tensorrt]``).

The engine is built from the exported ONNX file, so it inherits everything the export stage
proved about that file: an FP32 file gives an FP32 (or, with ``fp16``, mixed FP16) engine, and
an INT8 QDQ file exported for ``target: tensorrt`` (int8 activations, zero point 0) gives an
explicitly quantized INT8 engine, TensorRT reading the scales from the Q/DQ nodes. The batch
axis gets one optimisation profile (``min``/``opt``/``max`` batch), and a timing cache file is
read before and written after the build, so rebuilding on the same GPU is fast.

tensorrt is imported only inside :func:`build_engine`: without it (or without a GPU) the rest of
the pipeline runs, and asking for an engine fails with a message saying how to get one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compress.core.fileio import not_a_file, write_bytes_atomic
from compress.errors import ExportError
from compress.exporters.spec import ExportConfig

INSTALL_HINT = "install the extra on a machine with an NVIDIA GPU: pip install -e '.[tensorrt]'"


class TensorRTUnavailable(ExportError):
    """No tensorrt package or no CUDA device: an engine cannot be built here. The export stage
    treats this as "skip the engine, warn, go on"; every other ExportError fails it."""


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    fp16: bool = False,
    int8: bool = False,
    batch: tuple[int, int, int] = (1, 32, 64),
    workspace_mib: int = 2048,
    timing_cache: str | Path | None = None,
) -> Path:
    """Build and write a serialized TensorRT engine (``.engine``) from an ONNX file.

    Args:
        onnx_path: a file written by the export stage (input ``input``, dynamic batch axis).
        engine_path: where the engine goes (written atomically).
        fp16: allow FP16 kernels.
        int8: allow INT8 kernels; needed for a QDQ file (explicit quantization).
        batch: (min, opt, max) batch size of the optimisation profile.
        workspace_mib: builder workspace limit.
        timing_cache: a cache file to start from and update (created if missing).

    Returns:
        ``engine_path``.

    Raises:
        ExportError: tensorrt is not installed, no CUDA device is usable, the parser rejects
            the file, or the build fails (one line each).
    """
    trt = _import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    problem = not_a_file(onnx_path)
    if problem is not None:
        raise ExportError(f"{onnx_path}: {problem}; expected an ONNX file")
    if not 1 <= batch[0] <= batch[1] <= batch[2]:
        raise ExportError(f"batch: expected 1 <= min <= opt <= max, got {batch}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch: the only mode of TensorRT 10
    parser = trt.OnnxParser(network, logger)
    # the path: where the parser finds the weights of a file over 2 GiB (its sidecar)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors or 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        rest = tuple(tensor.shape)[1:]
        profile.set_shape(tensor.name, (batch[0], *rest), (batch[1], *rest), (batch[2], *rest))
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache = config.create_timing_cache(
        cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    )
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(
            f"TensorRT could not build an engine from {onnx_path.name} (see the TensorRT log above)"
        )
    if cache_path is not None:
        write_bytes_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    return write_bytes_atomic(engine_path, bytes(serialized))


def _import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise TensorRTUnavailable(
            f"TensorRT engines need the tensorrt package, which is not installed; {INSTALL_HINT}"
        ) from None
    try:
        import torch

        if not torch.cuda.is_available():
            raise TensorRTUnavailable(
                "TensorRT engines are built on an NVIDIA GPU, and this machine has no usable CUDA "
                "device"
            )
    except ImportError:
        pass
    return tensorrt


def build_from_onnx(
    onnx_path: Path,
    target: Path,
    model,
    images,
    cfg: ExportConfig,
    *,
    int8: bool,
    timing_cache: Path | None = None,
) -> dict:
    """The ``tensorrt`` format of :data:`compress.exporters.FORMATS`: an engine built from a proven
    ONNX file (INT8 from a QDQ file) and verified against the PyTorch network."""
    batch = (cfg.batch,) * 3 if cfg.batch is not None else cfg.engine_batch
    build_engine(
        onnx_path,
        target,
        fp16=cfg.engine_fp16,
        int8=int8,
        batch=batch,
        workspace_mib=cfg.engine_workspace_mib,
        timing_cache=timing_cache,
    )
    return verify_engine(target, model, images, cfg, int8=int8) | {
        "fp16": cfg.engine_fp16,
        "int8": int8,
        "batch": list(batch),
    }


def convert_onnx(source: Path, target: Path, cfg: ExportConfig) -> dict:
    """``compress export model.onnx --format tensorrt``: INT8 when the file is a QDQ export, its
    static batch or ``cfg.engine_batch``; the timing cache lives beside the source."""
    from compress.exporters.onnx.graph import read_onnx_info

    info = read_onnx_info(source)
    int8 = "compress.quantization.fake_quant" in info["metadata"]
    batch = (
        tuple([info["input_shape"][0]] * 3)
        if isinstance(info["input_shape"][0], int)
        else cfg.engine_batch
    )
    build_engine(
        source,
        target,
        fp16=cfg.engine_fp16,
        int8=int8,
        batch=batch,
        workspace_mib=cfg.engine_workspace_mib,
        timing_cache=source.parent / "tensorrt.cache",
    )
    return {"fp16": cfg.engine_fp16, "int8": int8, "batch": list(batch)}


def verify_engine(path: Path, model, images: np.ndarray, cfg: ExportConfig, *, int8: bool) -> dict:
    """An engine against its PyTorch model on the check images, with the bounds of its
    precision (INT8: the ``int8_*`` bounds; FP16 kernels: the ``fp16_*`` ones; else FP32's)."""
    import torch

    from compress.exporters.onnx.verify import compare_logits
    from compress.exporters.tensorrt_engine import infer

    try:
        ours = infer(path, images)
    except Exception as exc:
        raise ExportError(f"{path.name}: TensorRT cannot run the engine it built: {exc}") from exc
    with torch.no_grad():
        theirs = model.eval()(torch.from_numpy(images)).numpy()
    tolerance, agreement = (
        (cfg.int8_tolerance, cfg.int8_min_agreement)
        if int8
        else (cfg.fp16_tolerance, cfg.fp16_min_agreement)
        if cfg.engine_fp16
        else (cfg.tolerance, cfg.min_agreement)
    )
    return compare_logits(
        ours,
        theirs,
        path,
        tolerance=tolerance,
        min_agreement=agreement,
        relative=int8 or cfg.engine_fp16,
    )
