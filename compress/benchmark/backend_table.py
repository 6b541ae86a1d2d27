"""The table of benchmark backends: how a model's latency and memory are measured, all behind one
call. A new backend is one ``register_backend`` call below plus its module in
:mod:`compress.benchmark.backends`.

Every backend's ``measure(path, *, batch_sizes, warmup, iterations, time_budget_s, threads,
**options) -> dict`` runs in a fresh child process and returns the same keys (see
:func:`compress.benchmark.backends.onnxruntime.measure`). It never raises for a model that fails to
load or run: the result then has ``"status": "error"`` and a one-line ``"error"`` (CONTRIBUTING.md,
habit 7).

What a backend measures is its ``artifact``: an exported ``.onnx`` file (ONNX Runtime), a
TensorRT ``.engine``, or a stage folder of a run holding a PyTorch checkpoint (eager PyTorch and
``torch.compile``, for networks before export). Measuring functions are named as
``"module:function"`` and imported on first use, so listing backends imports no runtime.

A backend that runs ONNX files also says whose top-1 predictions the bench's accuracy and
agreement are (``predictor``): ONNX Runtime's on the CPU by default, OpenVINO's own for
``openvino``, so a file that computes differently there shows it in that backend's rows.

The recipe check reads this table: keep it free of torch and of the heavy ``compress`` modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compress.core.registry import Registry, load_entry
from compress.errors import StageError

ARTIFACTS = ("onnx", "engine", "checkpoint")


@dataclass(frozen=True)
class Backend:
    """One benchmark backend.

    Attributes:
        name: the recipe's ``bench.backends`` entry and the CLI's ``--backend``.
        description: one line for listings.
        device: "cpu" or "cuda" (tests mark CUDA backends ``gpu``).
        artifact: what it measures: "onnx" (a ``.onnx`` file), "engine" (a TensorRT
            ``.engine``) or "checkpoint" (a stage folder of a run).
        entry: ``"module:function"`` of the measuring function.
        options: extra keyword arguments for it (the device, torch.compile, ...).
        table_entry: ``"module:function"`` timing many small ONNX files in one process (the
            per-layer latency table of a latency-targeted prune); None: this backend cannot.
        saturates_without_vnni: its INT8 CPU kernels add u8 x s8 product pairs in saturating
            16-bit lanes on x86 CPUs without VNNI (ONNX Runtime's MLAS, OpenVINO's oneDNN), so
            a file with full-range weights computes wrong sums there: the bench warns.
        predictor: for an "onnx" backend, ``"module:function"`` that opens a file for top-1
            predictions in the bench's process: ``(path, *, batch_size, threads) -> run``,
            ``run(normalised float32 images) -> logits``; None: ONNX Runtime on the CPU
            (:func:`compress.benchmark.measure.predict_onnx`).
    """

    name: str
    description: str
    device: str
    artifact: str
    entry: str
    options: dict = field(default_factory=dict)
    table_entry: str | None = None
    saturates_without_vnni: bool = False
    predictor: str | None = None

    @property
    def needs_gpu(self) -> bool:
        return self.device == "cuda"

    def measure(self, path, **kwargs) -> dict:
        """Measure ``path`` (see the module docstring); never raises for a broken model."""
        return load_entry(self.entry)(path, **kwargs, **self.options)

    def measure_each(self, paths, **kwargs) -> dict:
        """Time many small ONNX files in one process (see ``table_entry``); never raises for a
        broken file.

        Raises:
            StageError: this backend has no such measurement.
        """
        if self.table_entry is None:
            raise StageError(
                f"backend {self.name!r} cannot time single layers; use an ONNX Runtime backend"
            )
        return load_entry(self.table_entry)(paths, **kwargs, **self.options)


BACKENDS: Registry[Backend] = Registry("bench backend", StageError)
DEFAULT_LATENCY_BACKEND = "onnxruntime"  # where a latency target is measured unless a recipe says


def register_backend(backend: Backend) -> Backend:
    """Add a backend to :data:`BACKENDS` under its own name.

    Args:
        backend: the backend; its name must be new and its artifact one of :data:`ARTIFACTS`.

    Returns:
        ``backend``.
    """
    if backend.artifact not in ARTIFACTS:
        raise ValueError(
            f"backend {backend.name}: artifact must be one of {ARTIFACTS}, got {backend.artifact!r}"
        )
    return BACKENDS.register(backend.name)(backend)


for _device in ("cpu", "cuda"):
    _suffix = "" if _device == "cpu" else "-cuda"
    register_backend(
        Backend(
            name=f"onnxruntime{_suffix}",
            description=(
                f"ONNX Runtime, {'CPU' if _device == 'cpu' else 'CUDA'}ExecutionProvider, on the "
                "exported .onnx"
            ),
            device=_device,
            artifact="onnx",
            entry="compress.benchmark.backends.onnxruntime:measure",
            options={"device": _device},
            table_entry="compress.benchmark.backends.onnxruntime:measure_each",
            saturates_without_vnni=_device == "cpu",
        )
    )
    for _compile in (False, True):
        register_backend(
            Backend(
                name=f"torch{'-compile' if _compile else ''}{_suffix}",
                description=(
                    f"PyTorch {'torch.compile' if _compile else 'eager'} on {_device.upper()}, on "
                    "a stage's checkpoint (before export)"
                ),
                device=_device,
                artifact="checkpoint",
                entry="compress.benchmark.backends.torch:measure",
                options={"device": _device, "compile": _compile},
            )
        )
register_backend(
    Backend(
        name="tensorrt",
        description=(
            "TensorRT engine built from the exported .onnx (needs the tensorrt extra and a GPU)"
        ),
        device="cuda",
        artifact="engine",
        entry="compress.benchmark.backends.tensorrt:measure",
    )
)
register_backend(
    Backend(
        name="openvino",
        description=(
            "OpenVINO, CPU plugin, on the exported .onnx (QDQ files run as INT8; needs the "
            "openvino extra)"
        ),
        device="cpu",
        artifact="onnx",
        entry="compress.benchmark.backends.openvino:measure",
        saturates_without_vnni=True,
        predictor="compress.benchmark.backends.openvino:open_predictor",
    )
)

__all__ = ["ARTIFACTS", "BACKENDS", "Backend", "register_backend"]
