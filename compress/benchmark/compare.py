"""Several models on several backends side by side: which backend runs which file, the groups
of rows, and the agreement between models' predictions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from compress.benchmark.backend_table import BACKENDS
from compress.benchmark.latency import LatencyJob, measure_interleaved
from compress.benchmark.measure import (
    CHECKPOINT,
    TestData,
    _bench,
    agreement,
    artifact_format,
    planned_batch_sizes,
)
from compress.benchmark.ratios import compare, reference_row
from compress.benchmark.rows import BenchResult, BenchRow
from compress.benchmark.spec import BenchConfig
from compress.core.machine import machine_info, versions
from compress.exporters.formats import FORMATS


@dataclasses.dataclass(frozen=True)
class BenchTarget:
    """One artifact to measure: which model it is, the file (or stage folder), its format."""

    model: str
    path: Path
    format: str = "onnx"


def bench_models(
    models: dict[str, Path] | list[BenchTarget],
    cfg: BenchConfig,
    test_data: TestData | None,
    *,
    reference: str = "teacher",
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> BenchResult:
    """Benchmark several models on every backend of ``cfg.backends`` and compare them.

    Each backend measures the targets it can run (ONNX Runtime the ``.onnx`` files, PyTorch the
    stage checkpoints, TensorRT the engines). Rows are grouped by backend (and by format when a
    backend runs more than one, e.g. FP16 ONNX): the group of the first backend's own format is
    the headline and its rows are named after their model ("teacher", "student"); other rows
    are named ``"student [torch-cuda]"``. Ratios compare each row with the reference model of
    its own group. Accuracy is measured once per ONNX file and predicting runtime: ONNX Runtime
    on the CPU, or the backend's own (:attr:`compress.benchmark.backend_table.Backend.predictor`:
    OpenVINO's for ``openvino``).

    Latency: each target in ``cfg.processes`` fresh processes, interleaved between the targets
    of a backend (round r times each once; :mod:`compress.benchmark.latency`).

    Args:
        models: role -> ``.onnx`` file, or a list of :class:`BenchTarget`.
        cfg: the bench settings.
        test_data: ``(uint8 NCHW images, labels)`` or None (no accuracy, no agreement).
        reference: the model the ratios are computed against.
        mean: fallback normalisation for files without preprocessing metadata.
        std: likewise.

    Returns:
        :func:`compare`'s result plus ``config``, ``machine``, ``versions``, ``groups``
        (headline first) and ``agreement`` (``{row: {other row: top-1 agreement}}`` for every
        pair with predictions in the same group).
    """
    targets = (
        [
            BenchTarget(role, Path(path), artifact_format(Path(path)))
            for role, path in models.items()
        ]
        if isinstance(models, dict)
        else list(models)
    )
    rows, predictions, by_file = [], {}, {}
    headline = _group(BACKENDS.get(cfg.backends[0]), _natural_format(cfg.backends[0]))
    for backend_name in cfg.backends:
        backend = BACKENDS.get(backend_name)
        runs = [t for t in targets if backend_runs(backend, t.format)]
        timed = interleaved_latency(backend, runs, cfg)
        for target, measured in zip(runs, timed, strict=True):
            group = _group(backend, target.format)
            label = target.model if group == headline else f"{target.model} [{group}]"
            # accuracy depends on the file and the runtime that predicts: measured once per pair
            cached = by_file.get((target.path, backend.predictor))
            data = None if cached is not None else test_data
            row, found = _bench(
                target.path,
                cfg,
                data,
                label,
                mean,
                std,
                None,
                backend.name,
                target.format,
                measured=measured,
            )
            if cached is not None:
                row = dataclasses.replace(
                    row, top1=cached[0].top1, eval_samples=cached[0].eval_samples
                )
                found = cached[1]
            elif found is not None:
                by_file[(target.path, backend.predictor)] = (row, found)
            rows.append(dataclasses.replace(row, model=target.model, group=group))
            predictions[label] = found
    rows = [_with_agreement(row, rows, predictions, reference) for row in rows]
    return dataclasses.replace(
        compare(rows, reference),
        agreement={
            row.role: {
                other.role: agreement(predictions[row.role], predictions[other.role])
                for other in rows
                if other is not row
                and other.group == row.group
                and predictions.get(other.role) is not None
            }
            for row in rows
            if predictions.get(row.role) is not None
        },
        groups=tuple(dict.fromkeys([headline] + [row.group for row in rows])),
        config=dataclasses.asdict(cfg),
        machine=machine_info(),
        versions=versions(),
    )


def interleaved_latency(backend, targets: list[BenchTarget], cfg: BenchConfig) -> list:
    """Each target's combined latency result, in order: every target of one backend timed in
    ``cfg.processes`` rounds, each round running each target in a fresh process
    (:func:`compress.benchmark.latency.measure_interleaved`). None for a target that cannot be
    described: its row records why."""
    planned = [planned_batch_sizes(t.path, t.format, cfg) for t in targets]
    jobs = [
        LatencyJob(t.path, sizes)
        for t, sizes in zip(targets, planned, strict=True)
        if sizes is not None
    ]
    measured = iter(measure_interleaved(backend, jobs, cfg))
    return [None if sizes is None else next(measured) for sizes in planned]


def _with_agreement(row: BenchRow, rows: list[BenchRow], predictions: dict, reference: str):
    """The row with its top-1 agreement with the reference model's row of its group."""
    ref = reference_row(rows, row, reference)
    ours, theirs = predictions.get(row.role), predictions.get(ref.role) if ref else None
    if ref is None or ref is row or ours is None or theirs is None:
        return row
    return dataclasses.replace(row, agreement_with_reference=agreement(ours, theirs))


def _natural_format(backend_name: str) -> str:
    """The format a backend's group is named for: of the formats its kind of file holds, the one
    not built from another (ONNX, not FP16 ONNX), else the only one (the TensorRT engine)."""
    artifact = BACKENDS.get(backend_name).artifact
    if artifact == CHECKPOINT:
        return CHECKPOINT
    kinds = [
        FORMATS.get(name) for name in FORMATS.names() if FORMATS.get(name).artifact == artifact
    ]
    return next((f for f in kinds if f.build is None), kinds[0]).name


def backend_runs(backend, fmt: str) -> bool:
    """Whether ``backend`` measures artifacts of format ``fmt``: they are the same kind of file."""
    return backend.artifact == (CHECKPOINT if fmt == CHECKPOINT else FORMATS.get(fmt).artifact)


def _group(backend, fmt: str) -> str:
    return backend.name if fmt == _natural_format(backend.name) else f"{backend.name}, {fmt}"
