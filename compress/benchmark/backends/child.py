"""Run one measurement in a fresh child process and read its JSON result back.

Why a child process: a process's peak resident memory only ever grows, so measured in the
parent it would be the largest of everything loaded so far (torch, the teacher, the dataset). A
fresh ``python -m <worker>`` per model makes ``peak_rss_mb`` that model's own, and keeps a model
that crashes its runtime from taking the whole benchmark down (CONTRIBUTING.md, habit 7).

A worker module reads one JSON request on stdin and calls :func:`serve` with its measuring
function; :func:`run_child` starts it and turns every failure (crash, signal, timeout, garbage
on stdout) into ``{"status": "error", "error": one line}``. Standard library only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the compress package


def run_child(module: str, request: dict, timeout_s: float | None) -> dict:
    """Start ``python -m module``, send ``request``, return its result dict; never raises.

    Args:
        module: the worker module (it calls :func:`serve`).
        request: JSON-able request.
        timeout_s: wall-clock limit for the child; None: no limit.
    """
    try:
        proc = subprocess.run(
            worker_command(module),
            input=json.dumps(request),
            capture_output=True,
            text=True,
            errors="replace",  # a runtime may log raw bytes of a corrupt file to stderr
            env=child_env(),
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return error(f"the measuring process ran past {timeout_s:.0f} s and was stopped")
    return _parse(proc)


def worker_command(module: str) -> list[str]:
    """The command line that starts a worker (tests replace it to plant crashes)."""
    return [sys.executable, "-m", module]


def serve(measure: Callable[[dict], dict]) -> None:
    """A worker's main: request from stdin, ``measure(request)``, one JSON result on stdout.

    Anything else printed (a runtime's C++ logging included) goes to stderr, not into the JSON;
    an exception becomes ``{"status": "error"}`` with its first line.
    """
    from compress.benchmark.backends.timing import one_line

    result_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        result = measure(json.load(sys.stdin))
    except Exception as exc:
        result = error(one_line(exc))
    with os.fdopen(result_fd, "w") as out:
        json.dump(result, out)


def measure_in_child(
    module: str,
    path,
    *,
    batch_sizes,
    warmup: int,
    iterations: int,
    time_budget_s: float | None,
    threads: int,
    timeout_s: float | None = None,
    startup_s: float = 120.0,
    **extra,
) -> dict:
    """What every backend's ``measure`` does: the JSON request every measuring worker reads
    (the common settings plus the backend's ``extra`` ones) sent to its worker ``module`` in a
    fresh process, under ``timeout_s`` (None: a generous limit from the time budget,
    :func:`budget_timeout`). Never raises."""
    request = {
        "path": str(Path(path).resolve()),
        "batch_sizes": [int(b) for b in batch_sizes],
        "warmup": int(warmup),
        "iterations": int(iterations),
        "time_budget_s": time_budget_s,
        "threads": int(threads),
        **extra,
    }
    if timeout_s is None:
        timeout_s = budget_timeout(time_budget_s, len(batch_sizes), startup_s=startup_s)
    return run_child(module, request, timeout_s)


def budget_timeout(
    time_budget_s: float | None, measurements: int, startup_s: float = 120.0
) -> float | None:
    """A generous wall-clock limit for a child that times ``measurements`` batch sizes."""
    return None if time_budget_s is None else startup_s + 4 * time_budget_s * measurements


def error(message: str) -> dict:
    """The result of a measurement that did not happen."""
    return {"status": "error", "error": message}


def child_env() -> dict[str, str]:
    """The parent's environment, with our package importable however the parent found it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
    return env


def _parse(proc: subprocess.CompletedProcess) -> dict:
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        hint = " (out of memory?)" if proc.returncode == -signal.SIGKILL else ""
        return error(f"the measuring process was killed by {name}{hint}")
    try:
        result = json.loads(proc.stdout)
    except json.JSONDecodeError:
        result = None
    if proc.returncode != 0 or not isinstance(result, dict):
        reason = _last_line(proc.stderr) or "no result"
        return error(f"the measuring process failed (exit code {proc.returncode}): {reason}")
    return result


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
