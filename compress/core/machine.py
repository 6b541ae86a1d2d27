"""What a measurement ran on: the CPU (model, cores, instruction-set features), the platform,
the GPUs and the versions of the runtimes. Recorded with every bench result and stage record,
because a latency or an INT8 result means nothing without the machine that produced it."""

from __future__ import annotations

import os
import platform

import numpy as np

from compress.core.cpu_features import cpu_features


def machine_info() -> dict:
    """What the numbers were measured on: CPU model, cores, platform and the GPUs, if any."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_features": cpu_features().to_dict(),
        "gpus": _gpus(),
    }


def versions() -> dict:
    """Versions of what ran the benchmark; torch, tensorrt and openvino from their installed
    metadata (importing them would cost seconds and memory the ONNX-only path does not need)."""
    from importlib import metadata

    import onnx
    import onnxruntime

    found = {
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
    }
    for package in ("torch", "tensorrt", "openvino"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def _gpus() -> list[dict]:
    """Name, driver and memory of each NVIDIA GPU, from nvidia-smi (empty without one)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return []
    query = [
        "nvidia-smi",
        "--query-gpu=name,driver_version,memory.total",
        "--format=csv,noheader,nounits",
    ]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append(
                {
                    "name": parts[0],
                    "driver": parts[1],
                    "memory_mib": float(parts[2]) if parts[2].replace(".", "").isdigit() else None,
                }
            )
    return gpus


def _cpu_model() -> str:
    """The CPU's model name, with its x86 family/model numbers: virtual machines often report a
    bare "AMD EPYC", which says nothing of the generation (Zen 3 lacks VNNI, Zen 4 has it)."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not line.strip():
                    break  # the first processor's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name
