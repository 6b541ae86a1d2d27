"""Latency you can trust: each model timed in several fresh processes, interleaved between the
models compared, summarised by the median of the processes' medians, compared pair by pair.

Why: the latency of one process can sit in one of two modes. The quickstart's INT8 student with
one ONNX Runtime thread measured 0.37-0.41 ms in some processes and 0.59-0.64 ms in others, in
our bench and in a plain ``InferenceSession.run`` loop alike, so one process per model puts a
speed-up anywhere within 1.6x. The answer is pyperf's (which runs 20 processes by default):

* every model is timed in ``bench.processes`` fresh processes, **interleaved**: round r times
  A, B, C, ... of one backend, each in a process of its own, so a slow spell of the machine hits
  the models of a round alike instead of one model's whole measurement;
* a batch size's headline p50 is the **median of the process medians** (one slow process out of
  five cannot move it) and its ``spread`` is (max - min) / median of those medians; a model whose
  processes disagree by more than :data:`NOISE_BAR` is flagged ``unstable``;
* a speed-up is computed **pair by pair**: the median over rounds of ref_r / x_r, each ratio
  taken from the two processes of the same round (:func:`paired_ratio`), with its spread.

The time budget of a measurement (``bench.time_budget_s``) is split across the processes, so a
model costs what it did plus the start-up and warm-up of the extra processes.

The maths (:func:`spread`, :func:`paired_ratio`, :func:`combine`, :func:`paired_speedup`) takes
plain numbers and backend results; only :func:`measure_interleaved` and :func:`measure_latency`
start processes. Library use, e.g. a pruning search to a latency target::

    reference, candidate = measure_latency([teacher_onnx, candidate_onnx], BenchConfig(threads=1))
    speedup, spread = paired_speedup(reference, candidate)
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from compress.benchmark.backend_table import BACKENDS, Backend
from compress.benchmark.rows import LatencyPoint
from compress.benchmark.spec import BenchConfig
from compress.errors import StageError

# Processes of one model whose medians spread by more than this are flagged unstable. Why 10%:
# it is the whole width of the +-5% band that speed-ups are meant to hold from run to run, so
# one process of such a model cannot be trusted to that precision; a quiet process's own noise
# stays far below it (CV 2-5% over 100 runs puts its median within ~1%), while the two modes
# seen per process (1.6x) are far above it.
NOISE_BAR = 0.10


@dataclass(frozen=True)
class LatencyJob:
    """One model to time on one backend: its file (or stage folder) and the batch sizes."""

    path: Path
    batch_sizes: tuple[int, ...]


def spread(values: Sequence[float]) -> float | None:
    """(max - min) / median of positive numbers: how far apart repeated measurements lie, as a
    fraction of their median; None for fewer than two."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    middle = statistics.median(values)
    return (max(values) - min(values)) / middle if middle > 0 else None


def unstable(value: float | None, bar: float = NOISE_BAR) -> bool | None:
    """Whether a spread is over the noise bar (None when there is no spread: one process)."""
    return None if value is None else value > bar


def paired_ratio(
    numerators: Sequence[float | None], denominators: Sequence[float | None]
) -> tuple[float | None, float | None]:
    """The median over rounds of ``numerators[r] / denominators[r]``, and the spread of those
    ratios (see :func:`spread`).

    Rounds where either side has no value (a failed process) are left out; (None, None) when
    no round has both. Pairing keeps what a round shared (the machine's state while it ran both
    processes) out of the ratio.

    Args:
        numerators: one value per round (e.g. the reference model's process medians).
        denominators: the other model's values, in the same round order.
    """
    ratios = [n / d for n, d in zip(numerators, denominators, strict=False) if n is not None and d]
    if not ratios:
        return None, None
    return statistics.median(ratios), spread(ratios)


def paired_speedup(
    reference: LatencyPoint | None, point: LatencyPoint | None
) -> tuple[float | None, float | None]:
    """How many times faster ``point`` runs than ``reference`` (latency ratio ref / point) and
    the spread over rounds.

    Both measured in the same interleaved rounds: the median of the per-round ratios of their
    process medians. A point without processes (results written before them, or measured
    alone) falls back to the ratio of the headline p50s, with no spread.
    """
    return _paired(
        reference,
        point,
        lambda p: p.latency_ms.p50 if p.latency_ms else None,
        lambda process: process.p50_ms,
    )


def paired_throughput_ratio(
    reference: LatencyPoint | None, point: LatencyPoint | None
) -> tuple[float | None, float | None]:
    """How many times the images per second of ``reference`` ``point`` processes (point /
    reference), paired by round like :func:`paired_speedup`."""
    return _paired(
        point, reference, lambda p: p.throughput_ips, lambda process: process.throughput_ips
    )


def _paired(numerator, denominator, headline, per_process) -> tuple[float | None, float | None]:
    if numerator is None or denominator is None:
        return None, None
    if numerator.processes and denominator.processes:
        found = paired_ratio(
            [per_process(p) for p in numerator.processes],
            [per_process(p) for p in denominator.processes],
        )
        if found[0] is not None:
            return found
    top, bottom = headline(numerator), headline(denominator)
    return (top / bottom if top is not None and bottom else None), None


def measure_interleaved(backend: Backend, jobs: Sequence[LatencyJob], cfg: BenchConfig) -> list:
    """Time every job in ``cfg.processes`` fresh processes of ``backend``, interleaved.

    Round r runs job 0, job 1, ... each in a process of its own; every process gets
    ``cfg.time_budget_s / cfg.processes`` seconds per batch size, ``cfg.iterations`` runs at most
    and ``cfg.warmup`` warm-up runs of its own (a fresh process must warm its own caches). A job
    whose first process measured nothing at all (the model does not load, the runtime crashes)
    is not started again.

    Args:
        backend: what measures (``backend.measure(path, **settings)``, see
            :mod:`compress.benchmark.backend_table`).
        jobs: the models, in the order each round runs them.
        cfg: the bench settings.

    Returns:
        One result per job, shaped like a backend's (see :func:`combine`).
    """
    budget = None if cfg.time_budget_s is None else cfg.time_budget_s / cfg.processes
    results: list[list[dict]] = [[] for _ in jobs]
    for _ in range(cfg.processes):
        for job, done in zip(jobs, results, strict=True):
            if done and not _measured_anything(done[0]):
                continue
            done.append(
                backend.measure(
                    job.path,
                    batch_sizes=list(job.batch_sizes),
                    warmup=cfg.warmup,
                    iterations=cfg.iterations,
                    time_budget_s=budget,
                    threads=cfg.threads,
                )
            )
    return [combine(done) for done in results]


def measure_latency(
    paths: Sequence[str | Path], cfg: BenchConfig, *, batch_size: int = 1
) -> list[LatencyPoint]:
    """Latency of several models at one batch size on ``cfg.backends[0]``, each in
    ``cfg.processes`` fresh processes, interleaved: the measurement a search can trust.

    Args:
        paths: the files (or stage folders) the backend runs.
        cfg: the bench settings (backend, processes, warm-up, iterations, budget, threads).
        batch_size: the batch size to time.

    Returns:
        One :class:`LatencyPoint` per path, in order, with its processes; compare two with
        :func:`paired_speedup`.

    Raises:
        StageError: a model could not be timed (the backend's one-line reason).
    """
    jobs = [LatencyJob(Path(path), (batch_size,)) for path in paths]
    points = []
    for job, result in zip(
        jobs, measure_interleaved(BACKENDS.get(cfg.backends[0]), jobs, cfg), strict=True
    ):
        point = next(
            (LatencyPoint.from_json(b) for b in result.get("batches", []) if b["status"] == "ok"),
            None,
        )
        if point is None:
            raise StageError(f"{job.path}: could not time it: {result.get('error')}")
        points.append(point)
    return points


def combine(results: Sequence[dict]) -> dict:
    """The results of one model's processes (in the order they ran) as one backend result.

    Shaped like what a backend's ``measure`` returns (see
    :func:`compress.benchmark.backends.onnxruntime.measure`), so a row reads it alike. Per batch
    size: ``latency_ms.p50`` is the median of the process medians, ``throughput_ips`` the median of
    the process throughputs, the other statistics (p90/p95/p99, mean, std, ``cv``, ``noisy``)
    those of the median process (for an even count, the slower of the two middle ones: the
    headline p50, their mean, is then never above its p90; the faster one's p90 was below it
    when two processes ran 1.8x apart),
    ``min``/``max`` the extremes over all processes, ``runs``/``total_s`` the sums; plus
    ``processes`` (each one's p50, throughput and runs, or its error, in order), ``spread`` and
    ``unstable``. Memory is the largest any process reached; the runtime's own keys (providers,
    versions) are the first measured process's. A process that failed makes the result's
    status "error" (its message says which processes), and the others are still combined.

    Args:
        results: what ``backend.measure`` returned for each process.
    """
    measured = [r for r in results if r.get("batches")]
    error = _errors(results)
    if not measured:
        return {"status": "error", "error": error or "no result"}
    sizes = list(dict.fromkeys(b["batch_size"] for r in measured for b in r["batches"]))
    batches = [_combine_batch(size, [_batch_of(r, size) for r in results]) for size in sizes]
    memory = {
        key: _largest(r.get(key) for r in measured)
        for key in ("peak_rss_mb", "model_rss_mb", "gpu_peak_mb")
    }
    return (
        measured[0]
        | memory
        | {"status": "error" if error else "ok", "error": error, "batches": batches}
    )


def _combine_batch(batch_size: int, entries: list[dict]) -> dict:
    processes = [_process(entry) for entry in entries]
    ok = [entry for entry in entries if entry.get("status") == "ok"]
    if not ok:
        return {
            "batch_size": batch_size,
            "status": "error",
            "error": entries[0].get("error") or "not measured",
            "processes": processes,
        }
    medians = [entry["latency_ms"]["p50"] for entry in ok]
    typical = sorted(ok, key=lambda entry: entry["latency_ms"]["p50"])[len(ok) // 2]
    found = spread(medians)
    stats = typical["latency_ms"] | {
        "p50": statistics.median(medians),
        "min": _smallest(entry["latency_ms"].get("min") for entry in ok),
        "max": _largest(entry["latency_ms"].get("max") for entry in ok),
    }
    return typical | {
        "latency_ms": stats,
        "runs": sum(entry.get("runs") or 0 for entry in ok),
        "total_s": sum(entry.get("total_s") or 0.0 for entry in ok),
        "throughput_ips": _median(entry.get("throughput_ips") for entry in ok),
        "processes": processes,
        "spread": found,
        "unstable": unstable(found),
    }


def _batch_of(result: dict, batch_size: int) -> dict:
    """One process's entry for a batch size, or why it has none."""
    found = next((b for b in result.get("batches") or [] if b["batch_size"] == batch_size), None)
    return found or {"status": "error", "error": result.get("error") or "not measured"}


def _process(entry: dict) -> dict:
    if entry.get("status") != "ok":
        return {"error": entry.get("error") or "not measured"}
    return {
        "p50_ms": entry["latency_ms"]["p50"],
        "throughput_ips": entry.get("throughput_ips"),
        "runs": entry.get("runs"),
    }


def _errors(results: Sequence[dict]) -> str | None:
    """Each distinct error once, saying which processes it came from."""
    by_message: dict[str, list[int]] = {}
    for index, result in enumerate(results, 1):
        if result.get("status") != "ok":
            by_message.setdefault(result.get("error") or "no result", []).append(index)
    if len(results) <= 1:
        return "; ".join(by_message) or None
    parts = []
    for message, indices in by_message.items():
        which = (
            f"all {len(results)} processes"
            if len(indices) == len(results)
            else f"process{'es' if len(indices) > 1 else ''} {', '.join(map(str, indices))} "
            f"of {len(results)}"
        )
        parts.append(f"{message} ({which})")
    return "; ".join(parts) or None


def _measured_anything(result: dict) -> bool:
    return any(b.get("status") == "ok" for b in result.get("batches") or [])


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _largest(values) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _smallest(values) -> float | None:
    values = [v for v in values if v is not None]
    return min(values) if values else None


__all__ = [
    "NOISE_BAR",
    "LatencyJob",
    "combine",
    "measure_interleaved",
    "measure_latency",
    "paired_ratio",
    "paired_speedup",
    "paired_throughput_ratio",
    "spread",
    "unstable",
]
