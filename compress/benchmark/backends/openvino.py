"""The "openvino" bench backend: an ONNX file in OpenVINO's CPU plugin.

A second, independent runtime for our files. Its ONNX frontend turns each QuantizeLinear /
DequantizeLinear pair into a FakeQuantize, and the CPU plugin runs the layers between them with
integer (u8 activations, i8 weights) kernels: a QDQ file computes in INT8 here too, through
other kernels (oneDNN) than ONNX Runtime's (MLAS). The compiled model's runtime graph says so
layer by layer (:func:`layer_precisions`), and every measurement records it.

Latency and memory are measured in a child process (see :mod:`compress.benchmark.backends.child` for
why) that imports only numpy and openvino. The model's dynamic batch axis is reshaped to each
measured batch size before it is compiled (static shapes are what the CPU plugin is fastest
with, and what a deployment that knows its batch compiles), with the same settings as
:func:`compile_settings`: the LATENCY performance hint, ``threads`` inference threads and FP32
inference precision.

Top-1 predictions for the bench's accuracy and agreement come from :func:`open_predictor`, in
the bench's own process, as ONNX Runtime's do: accuracy is not a memory measurement, the images
are already there (no copy of the test set to a child), and OpenVINO reports a broken file as
an exception, which becomes the row's error.

This module must stay import-light (no openvino at import time): the parent imports it to start
the child, and ``compress list backends`` must work without the extra.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from compress.benchmark.backends.child import measure_in_child
from compress.errors import StageError

WORKER_MODULE = "compress.benchmark.backends._ov_worker"
INSTALL_HINT = "pip install -e '.[openvino]'"
MISSING = f"the openvino backend needs the openvino package, which is not installed; {INSTALL_HINT}"
DEVICE = "CPU"
# Layers that multiply matrices, as the CPU plugin's runtime graph names them: in an INT8 file
# each should run in u8/i8, in an FP32 file in f32.
MATMUL_LAYERS = ("Convolution", "Deconvolution", "FullyConnected", "MatMul")
INTEGER_PRECISIONS = ("u8", "i8")
# What the compiled model is asked for its settings, for the record.
RECORDED_PROPERTIES = (
    "PERFORMANCE_HINT",
    "INFERENCE_NUM_THREADS",
    "NUM_STREAMS",
    "INFERENCE_PRECISION_HINT",
    "EXECUTION_MODE_HINT",
    "ENABLE_CPU_PINNING",
    "ENABLE_HYPER_THREADING",
)
_LOCATION_LINES = ("Exception from ", "Check '", "FrontEnd API failed")


def measure(
    path: Path,
    *,
    batch_sizes: list[int],
    warmup: int,
    iterations: int,
    time_budget_s: float | None,
    threads: int,
    timeout_s: float | None = None,
) -> dict:
    """Measure latency, throughput and memory of an ONNX model in OpenVINO, in a fresh process.

    Per batch size: the model reshaped to that batch and compiled for the CPU
    (:func:`compile_settings`), a random normal input, ``warmup`` untimed runs, then timed runs
    (``time.perf_counter`` around each synchronous ``InferRequest.infer``, the input shared
    with the request as ONNX Runtime reads a numpy input in place, the output copied out as
    ONNX Runtime returns a new array) until ``iterations`` runs or, after at least 5 runs,
    ``time_budget_s`` is spent. Compiling is not timed.

    Args:
        path: the ``.onnx`` file.
        batch_sizes: batch sizes to measure, in order (a static batch axis allows only its own).
        warmup: untimed runs before timing each batch size.
        iterations: most timed runs per batch size.
        time_budget_s: seconds after which timing a batch size stops early; None: no limit.
        threads: OpenVINO inference threads (``INFERENCE_NUM_THREADS``); 0 keeps its default.
        timeout_s: wall-clock limit for the whole child process; None: derived from the budget.

    Returns:
        The keys every backend returns (see :func:`compress.benchmark.backends.onnxruntime.measure`:
        ``status``, ``error``, ``batches``, ``peak_rss_mb``, ``baseline_rss_mb``,
        ``model_rss_mb``, ``gpu_peak_mb`` (None), ``device`` ("cpu"), ``threads``) plus
        ``"openvino"`` (its version), ``"cpu"`` (the plugin's name for the CPU),
        ``"properties"`` (the compiled model's :data:`RECORDED_PROPERTIES`, as it reports
        them), ``"layer_precisions"`` ({runtime layer type: {precision: count}}, see
        :func:`layer_precisions`) and ``"matmul_layers"`` ({"integer": n, "total": n}, see
        :func:`integer_layers`), read from the first batch size's compiled model. Without
        openvino, for a file it cannot read or a crashed child, only ``status`` and ``error``.
        Never raises for a broken model.
    """
    return measure_in_child(
        WORKER_MODULE,
        path,
        batch_sizes=batch_sizes,
        warmup=warmup,
        iterations=iterations,
        time_budget_s=time_budget_s,
        threads=threads,
        timeout_s=timeout_s,
    )


def import_openvino():
    """The openvino module.

    Raises:
        StageError: it is not installed (the message says how to install it).
    """
    try:
        import openvino
    except ImportError:
        raise StageError(MISSING) from None
    return openvino


def compile_settings(ov, threads: int) -> dict:
    """The CPU plugin's settings for every compile, measuring and predicting alike.

    - ``PERFORMANCE_HINT=LATENCY``: one stream, one request at a time, as the bench times it
      (the THROUGHPUT hint would run several requests in parallel, which the bench does not).
    - ``INFERENCE_NUM_THREADS=threads`` (unless 0), like ONNX Runtime's intra-op threads.
    - ``INFERENCE_PRECISION_HINT=f32``: on CPUs with AVX-512 BF16 or AMX the plugin's default
      is bf16, which would run an FP32 file's float layers in bfloat16: another model than the
      file, with another accuracy. INT8 layers are integer either way.
    """
    import openvino.properties as props
    import openvino.properties.hint as hints

    settings = {
        hints.performance_mode: hints.PerformanceMode.LATENCY,
        hints.inference_precision: ov.Type.f32,
    }
    if threads > 0:
        settings[props.inference_num_threads] = int(threads)
    return settings


def static_batch(model) -> int | None:
    """The batch a model's first input is fixed to; None when its batch axis is dynamic."""
    batch = model.input(0).get_partial_shape()[0]
    return batch.get_length() if batch.is_static else None


def with_batch(ov, model, batch_size: int):
    """``model`` (read by ``Core.read_model``) with its batch axis set to ``batch_size``.

    Raises:
        ValueError: an input is not float, has dynamic axes besides the batch, or has a static
            batch other than ``batch_size``.
    """
    shapes = {}
    for index, value in enumerate(model.inputs):
        shape = value.get_partial_shape()
        name = value.get_any_name() if value.get_names() else f"#{index}"
        if not value.get_element_type().is_real():
            raise ValueError(
                f"input {name!r} has type {value.get_element_type()}; only float inputs are "
                "supported"
            )
        if shape.rank.is_dynamic or any(d.is_dynamic for d in list(shape)[1:]):
            raise ValueError(f"input {name!r} has dynamic axes besides the batch: {shape}")
        batch = shape[0]
        if batch.is_static and batch.get_length() != batch_size:
            raise ValueError(
                f"input {name!r} has a static batch of {batch.get_length()}; export with a "
                f"dynamic batch to measure {batch_size}"
            )
        shapes[value] = ov.PartialShape([batch_size, *[d.get_length() for d in list(shape)[1:]]])
    model.reshape(shapes)
    return model


def layer_precisions(compiled) -> dict[str, dict[str, int]]:
    """How the CPU plugin runs a compiled model: {layer type: {runtime precision: count}}.

    Read from the runtime graph (``CompiledModel.get_runtime_model()``), whose nodes carry the
    executed layer's ``layerType`` and ``runtimePrecision``. An INT8 QDQ file shows its
    convolutions as ``{"Convolution": {"u8": n}}``; an FP32 file as ``{"f32": n}``.
    """
    counts: Counter[tuple[str, str]] = Counter()
    for node in compiled.get_runtime_model().get_ordered_ops():
        info = node.get_rt_info()
        counts[(info["layerType"].astype(str), info["runtimePrecision"].astype(str))] += 1
    found: dict[str, dict[str, int]] = {}
    for (layer, precision), count in sorted(counts.items()):
        found.setdefault(layer, {})[precision] = count
    return found


def integer_layers(precisions: dict[str, dict[str, int]]) -> dict[str, int]:
    """How many of the matrix-multiplying layers (:data:`MATMUL_LAYERS`) of a runtime graph
    run in integer precision: ``{"integer": n, "total": n}``.

    Args:
        precisions: :func:`layer_precisions`' result (a measurement's ``layer_precisions``).
    """
    layers = [precisions.get(layer, {}) for layer in MATMUL_LAYERS]
    return {
        "integer": sum(n for by in layers for p, n in by.items() if p in INTEGER_PRECISIONS),
        "total": sum(n for by in layers for n in by.values()),
    }


def recorded_properties(compiled) -> dict[str, str | int | bool]:
    """The compiled model's :data:`RECORDED_PROPERTIES` as JSON values: numbers and flags as
    they are, an element type by its short name (``"f32"``), a mode by its name
    (``"LATENCY"``); those it does not report are left out."""
    found: dict[str, str | int | bool] = {}
    for name in RECORDED_PROPERTIES:
        try:
            value = compiled.get_property(name)
        except RuntimeError:
            continue
        if hasattr(value, "get_type_name"):
            value = value.get_type_name()
        elif not isinstance(value, bool | int | str):
            value = getattr(value, "name", str(value))
        found[name] = value
    return found


def ov_message(exc: BaseException) -> str:
    """``Type: first line`` of an OpenVINO exception, past the source locations it starts with
    (``Exception from src/...``), at most 300 characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = next((line for line in lines if not line.startswith(_LOCATION_LINES)), "")
    return f"{type(exc).__name__}: {text}"[:300]


def open_predictor(path: Path, *, batch_size: int, threads: int):
    """A function from a normalised float32 batch of images to the logits OpenVINO computes
    for them, with the settings the latency was measured with.

    The model is compiled once at ``batch_size`` (at its static batch, if it has one); the
    images are run in batches of that size, a shorter last one padded with copies of its last
    image, whose logits are dropped.

    Raises:
        StageError: openvino is not installed, or it cannot read or compile the file (one
            line).
    """
    ov = import_openvino()
    import numpy as np

    core = ov.Core()
    try:
        model = core.read_model(str(path))
        batch = static_batch(model) or batch_size
        compiled = core.compile_model(
            with_batch(ov, model, batch), DEVICE, compile_settings(ov, threads)
        )
    except (RuntimeError, ValueError) as exc:
        raise StageError(f"OpenVINO cannot run {Path(path).name}: {ov_message(exc)}") from None
    request = compiled.create_infer_request()
    dtype = compiled.input(0).get_element_type().to_dtype()

    def run(images: np.ndarray) -> np.ndarray:
        logits = []
        for start in range(0, len(images), batch):
            chunk = images[start : start + batch]
            count = len(chunk)
            if count < batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - count, axis=0)])
            logits.append(request.infer({0: chunk.astype(dtype)})[0][:count])
        return np.concatenate(logits)

    return run


__all__ = [
    "INSTALL_HINT",
    "MATMUL_LAYERS",
    "compile_settings",
    "import_openvino",
    "integer_layers",
    "layer_precisions",
    "measure",
    "open_predictor",
    "ov_message",
    "recorded_properties",
    "static_batch",
    "with_batch",
]
