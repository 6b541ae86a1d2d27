"""Stage ``bench``: measure the exported teacher and student side by side on the same backend.

Also the engine of ``compress bench MODEL.onnx [--against OTHER.onnx]``, which needs no run.
"""

from __future__ import annotations

from pathlib import Path

from compress.benchmark.backend_table import BACKENDS
from compress.benchmark.compare import BenchTarget, backend_runs, bench_models
from compress.benchmark.measure import artifact_format, describe_artifact
from compress.benchmark.ratios import compare, did_not_pay
from compress.benchmark.rows import BenchResult, Ratios
from compress.benchmark.spec import BenchConfig
from compress.benchmark.table import write_bench
from compress.data.load import detect_kind, load_dataset
from compress.data.loaders import test_arrays
from compress.data.spec import DataConfig
from compress.errors import DataError, StageError
from compress.exporters.formats import ONNX_FORMATS
from compress.pipeline.artifacts import STAGE_RECORD, Artifact
from compress.pipeline.context import RunContext


def bench(cfg: BenchConfig, ctx: RunContext) -> Artifact:
    """Latency, throughput, memory, size, MACs and accuracy of every exported model.

    Returns:
        Artifact with ``bench.json`` and ``bench.md`` (student vs teacher with ratios).
    """
    test_data = test_arrays(ctx.data, limit=cfg.eval_samples)
    result = bench_models(
        bench_targets(ctx.artifacts["export"], ctx.run_dir), cfg, test_data, reference="teacher"
    )
    json_path, table_path = write_bench(result, ctx.stage_path(""))
    return Artifact(
        "bench", files={"json": json_path, "table": table_path}, metrics=headline_metrics(result)
    )


def bench_targets(export: Artifact, run_dir: Path) -> list[BenchTarget]:
    """What a run's bench measures: every exported file (``role`` and ``role@format`` in the
    export artifact) and the stage checkpoint each file came from (for the PyTorch backends)."""
    targets = []
    for key, path in export.files.items():
        role, _, fmt = key.partition("@")
        targets.append(BenchTarget(role, Path(path), fmt or "onnx"))
    for role, record in export.metrics.items():
        if (
            isinstance(record, dict)
            and record.get("stage")
            and (run_dir / record["stage"] / STAGE_RECORD).is_file()
        ):
            targets.append(BenchTarget(role, run_dir / record["stage"], "checkpoint"))
    return targets


def bench_files(
    model: str | Path,
    *,
    against: str | Path | None,
    data: str | None,
    data_kind: str | None,
    cfg: BenchConfig,
    out: str | Path | None,
) -> tuple[BenchResult, Path]:
    """Benchmark models outside a run (``compress bench``); returns the result and the table's path.

    ``model`` and ``against`` are ``.onnx`` files, TensorRT engines or stage folders of a run
    (PyTorch checkpoints), each measured on those of ``cfg.backends`` that run it. Accuracy is
    measured on ONNX files when ``data`` is given; the image size and normalisation come from
    the files' ONNX metadata (written by our export stage) so nothing has to be repeated here.
    """
    paths = [Path(model)] + ([Path(against)] if against is not None else [])
    for path in paths:  # a missing, corrupt or unrunnable model: one clear error before any timing
        fmt = artifact_format(path)
        describe_artifact(path, fmt)
        if not any(backend_runs(BACKENDS.get(b), fmt) for b in cfg.backends):
            able = [name for name in BACKENDS.names() if backend_runs(BACKENDS.get(name), fmt)]
            raise StageError(
                f"{path} is "
                f"{'a stage checkpoint' if fmt == 'checkpoint' else 'a ' + fmt + ' file'}, which "
                f"none of the backends {', '.join(cfg.backends)} runs; use --backend "
                f"{' or --backend '.join(able)}"
            )
    model = paths[0]
    test_data = None
    if data is not None:
        image_size = _image_size_of(model)
        data_cfg = DataConfig(kind=data_kind or detect_kind(data), path=data, image_size=image_size)
        test_data = test_arrays(load_dataset(data_cfg), limit=cfg.eval_samples)
    names = [_name(path) for path in paths]
    if len(names) == 2 and names[0] == names[1]:
        names[1] = f"{names[1]} (against)"
    targets = [
        BenchTarget(name, path, artifact_format(path))
        for name, path in zip(names, paths, strict=True)
    ]
    result = bench_models(targets, cfg, test_data, reference=names[-1])
    folder = Path(out) if out is not None else model.parent / f"{names[0]}_bench"
    folder.mkdir(parents=True, exist_ok=True)
    _, table_path = write_bench(result, folder)
    return result, table_path


def _name(path: Path) -> str:
    return (
        path.parent.name
        if path.name == STAGE_RECORD
        else path.name
        if path.is_dir()
        else path.name.removesuffix(".onnx").removesuffix(".engine")
    )


def _image_size_of(model: Path) -> int:
    from compress.exporters.onnx.graph import read_onnx_info

    if artifact_format(model) not in ONNX_FORMATS:
        raise DataError(
            f"{model}: accuracy (--data) is measured on ONNX files; bench the exported .onnx"
        )
    info = read_onnx_info(model)
    size = info["metadata"].get("compress.image_size") or info["input_shape"][-1]
    if not isinstance(size, int) and not str(size).isdigit():
        raise DataError(
            f"{model}: cannot tell the input image size (no compress.image_size metadata, dynamic "
            "input shape)"
        )
    return int(size)


def headline_metrics(result: BenchResult) -> dict:
    """The few numbers the run summary and CI gates read first (the bench stage's metrics).

    ``speedup_b1`` etc. compare the student with the teacher; with a quantized student the
    ``int8_*`` keys compare it with the float student it was quantized from; ``did_not_pay``
    holds a line for each model that runs slower than what it was compressed from.
    """
    headline = _headline_ratios(result.ratios.get("student", Ratios()))
    headline["did_not_pay"] = did_not_pay(result.rows, result.reference)
    for role in ("teacher", "student_fp32", "student"):
        row = result.row(role)
        if row is not None:
            headline[f"{role}_top1"] = row.top1
            headline[f"{role}_status"] = row.status
    if result.row("student_fp32") is not None and result.row("student") is not None:
        int8 = compare(result.rows, reference="student_fp32").ratios["student"]
        headline |= {f"int8_{key}": value for key, value in _headline_ratios(int8).items()}
        headline["int8_agreement_with_fp32"] = (
            (result.agreement or {}).get("student", {}).get("student_fp32")
        )
    return headline


def _headline_ratios(ratios: Ratios) -> dict:
    return {
        "speedup_b1": ratios.speedup_b1,
        "speedup_throughput": ratios.speedup_throughput,
        "size_reduction": ratios.size_reduction,
        "accuracy_delta": ratios.accuracy_delta,
    }
