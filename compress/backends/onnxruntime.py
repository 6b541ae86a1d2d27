"""The "onnxruntime" bench backend: ONNX Runtime on CPU, measured in a fresh child process.

Why a child process: a process's peak resident memory only ever grows, so measured in the
parent it would be the largest of everything loaded so far (torch, the teacher, the dataset). A
fresh ``python -m compress.backends._ort_worker`` per model, importing only numpy and
onnxruntime, makes ``peak_rss_mb`` that model's own (the peak of the worker's address space,
VmHWM: ``ru_maxrss`` would carry the parent's peak over exec) and ``model_rss_mb`` (peak minus
the worker's peak right before the session is created) what loading and running it cost. It also
keeps a model that crashes the runtime from taking the whole benchmark down (STYLE habit 7).

This module must stay import-light too: the child imports it through ``compress.backends``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

WORKER_MODULE = "compress.backends._ort_worker"
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the compress package


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
    """Measure latency, throughput and memory of an ONNX model in a fresh process.

    Per batch size: a random normal input, ``warmup`` untimed runs, then timed runs
    (``time.perf_counter`` around each ``session.run``) until ``iterations`` runs or, after at
    least 5 runs, ``time_budget_s`` is spent.

    Args:
        path: the ``.onnx`` file.
        batch_sizes: batch sizes to measure, in order (the model's batch axis must be dynamic).
        warmup: untimed runs before timing each batch size.
        iterations: most timed runs per batch size.
        time_budget_s: seconds after which timing a batch size stops early; None: no limit.
        threads: ONNX Runtime intra-op threads; 0 keeps its default (one per physical core).
        timeout_s: wall-clock limit for the whole child process; None: derived from the budget
            (no limit when the budget is None).

    Returns:
        ``{"status": "ok"|"error", "error": str|None, "batches": [{"batch_size", "status",
        "latency_ms": {"p50", "p90", "p99", "mean", "std", "min", "max"}, "runs", "total_s",
        "throughput_ips"}, ...], "peak_rss_mb", "baseline_rss_mb", "model_rss_mb", "providers",
        "threads", "graph_optimization_level", "onnxruntime"}``. A batch size that fails has
        ``"status": "error"`` and ``"error"``. When the child cannot load the model or crashes,
        only ``status`` and ``error`` are present. Never raises for a broken model.
    """
    request = {
        "path": str(Path(path).resolve()),
        "batch_sizes": [int(b) for b in batch_sizes],
        "warmup": int(warmup),
        "iterations": int(iterations),
        "time_budget_s": time_budget_s,
        "threads": int(threads),
    }
    if timeout_s is None and time_budget_s is not None:
        timeout_s = 120.0 + 4 * time_budget_s * len(batch_sizes)
    try:
        proc = subprocess.run(
            _worker_command(),
            input=json.dumps(request),
            capture_output=True,
            text=True,
            env=_worker_env(),
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return _error(f"the measuring process ran past {timeout_s:.0f} s and was stopped")
    return _parse(proc)


def _worker_command() -> list[str]:
    return [sys.executable, "-m", WORKER_MODULE]


def _worker_env() -> dict[str, str]:
    """The parent's environment, with our package importable however the parent found it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
    return env


def _parse(proc: subprocess.CompletedProcess) -> dict:
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        hint = " (out of memory?)" if proc.returncode == -signal.SIGKILL else ""
        return _error(f"the measuring process was killed by {name}{hint}")
    try:
        result = json.loads(proc.stdout)
    except json.JSONDecodeError:
        result = None
    if proc.returncode != 0 or not isinstance(result, dict):
        reason = _last_line(proc.stderr) or "no result"
        return _error(f"the measuring process failed (exit code {proc.returncode}): {reason}")
    return result


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _error(message: str) -> dict:
    return {"status": "error", "error": message}
