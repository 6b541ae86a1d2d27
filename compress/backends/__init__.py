"""Benchmark backends: how an exported model's latency and memory are measured.

Every backend offers the same call, ``measure(path, *, batch_sizes, warmup, iterations,
time_budget_s, threads) -> dict`` (see :mod:`compress.backends.onnxruntime` for the result's
keys). It never raises for a model that fails to load or run: the result then has ``"status":
"error"`` and a one-line ``"error"`` (STYLE habit 7). Only "onnxruntime" (CPU) exists now; the
CUDA execution provider, eager torch and TensorRT plug in as more ``BACKENDS`` entries.

This package is imported by the measuring child process: keep it free of torch and of the heavy
``compress`` modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from compress.backends import onnxruntime as _onnxruntime
from compress.errors import StageError
from compress.registry import Registry


@dataclass(frozen=True)
class Backend:
    """One benchmark backend.

    Attributes:
        name: the recipe's ``bench.backend`` value.
        description: one line for listings.
        needs_gpu: whether it needs a CUDA device (tests mark such backends ``gpu``).
        suffix: the artifact it measures (".onnx", later ".engine").
        measure: the measuring function described in the module docstring.
    """

    name: str
    description: str
    needs_gpu: bool
    suffix: str
    measure: Callable[..., dict]


BACKENDS: Registry[Backend] = Registry("bench backend", StageError)


def register_backend(backend: Backend) -> Backend:
    """Add a backend to :data:`BACKENDS` under its own name.

    Args:
        backend: the backend; its name must be new.

    Returns:
        ``backend``.
    """
    return BACKENDS.register(backend.name)(backend)


register_backend(
    Backend(
        name="onnxruntime",
        description="ONNX Runtime, CPUExecutionProvider, measured in a fresh child process",
        needs_gpu=False,
        suffix=".onnx",
        measure=_onnxruntime.measure,
    )
)

__all__ = ["BACKENDS", "Backend", "register_backend"]
