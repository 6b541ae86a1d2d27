"""Stage ``bench``: measure the exported teacher and student side by side on the same backend.

Also the engine of ``compress bench MODEL.onnx [--against OTHER.onnx]``, which needs no run.
"""

from __future__ import annotations

from pathlib import Path

from compress.artifacts import Artifact
from compress.benchmark import bench_models, compare, write_bench
from compress.config import BenchConfig, DataConfig
from compress.context import RunContext
from compress.data import detect_kind, load_dataset, test_arrays
from compress.errors import DataError
from compress.stages import STAGES


@STAGES.register("bench")
def bench(cfg: BenchConfig, ctx: RunContext) -> Artifact:
    """Latency, throughput, memory, size, MACs and accuracy of every exported model.

    Returns:
        Artifact with ``bench.json`` and ``bench.md`` (student vs teacher with ratios).
    """
    exported = ctx.artifacts["export"].files
    test_data = test_arrays(ctx.data, limit=cfg.eval_samples)
    result = bench_models(dict(exported), cfg, test_data, reference="teacher")
    json_path, table_path = write_bench(result, ctx.stage_path(""))
    return Artifact("bench", files={"json": json_path, "table": table_path}, metrics=headline_metrics(result))


def bench_files(model: str | Path, *, against: str | Path | None, data: str | None, data_kind: str | None, cfg: BenchConfig, out: str | Path | None) -> tuple[dict, Path]:
    """Benchmark ONNX files outside a run (``compress bench``); returns the result and the table's path.

    Accuracy is measured when ``data`` is given; the image size and normalisation come from the
    files' ONNX metadata (written by our export stage) so nothing has to be repeated here.
    """
    from compress.exporters.onnx import read_onnx_info

    model = Path(model)
    for path in [model] + ([Path(against)] if against is not None else []):
        read_onnx_info(path)  # a missing, corrupt or non-ONNX file: one clear error before any timing
    test_data = None
    if data is not None:
        image_size = _image_size_of(model)
        data_cfg = DataConfig(kind=data_kind or detect_kind(data), path=data, image_size=image_size)
        test_data = test_arrays(load_dataset(data_cfg), limit=cfg.eval_samples)
    models = {model.stem: model}
    reference = model.stem
    if against is not None:
        reference = Path(against).stem if Path(against).stem != model.stem else f"{model.stem} (against)"
        models[reference] = Path(against)
    result = bench_models(models, cfg, test_data, reference=reference)
    folder = Path(out) if out is not None else model.parent / f"{model.stem}_bench"
    folder.mkdir(parents=True, exist_ok=True)
    _, table_path = write_bench(result, folder)
    return result, table_path


def _image_size_of(model: Path) -> int:
    from compress.exporters.onnx import read_onnx_info

    info = read_onnx_info(model)
    size = info["metadata"].get("compress.image_size") or info["input_shape"][-1]
    if not isinstance(size, int) and not str(size).isdigit():
        raise DataError(f"{model}: cannot tell the input image size (no compress.image_size metadata, dynamic input shape)")
    return int(size)


HEADLINE_RATIOS = ("speedup_b1", "speedup_throughput", "size_reduction", "accuracy_delta")


def headline_metrics(result: dict) -> dict:
    """The few numbers the run summary and CI gates read first.

    ``speedup_b1`` etc. compare the student with the teacher; with a quantized student the
    ``int8_*`` keys compare it with the float student it was quantized from.
    """
    rows = {row["role"]: row for row in result["rows"]}
    ratios = result["ratios"].get("student", {})
    headline = {key: ratios.get(key) for key in HEADLINE_RATIOS}
    for role in ("teacher", "student_fp32", "student"):
        if role in rows:
            headline[f"{role}_top1"] = rows[role].get("top1")
            headline[f"{role}_status"] = rows[role].get("status")
    if "student_fp32" in rows and "student" in rows:
        int8 = compare(result["rows"], reference="student_fp32")["ratios"]["student"]
        headline |= {f"int8_{key}": int8.get(key) for key in HEADLINE_RATIOS}
        headline["int8_agreement_with_fp32"] = result.get("agreement", {}).get("student", {}).get("student_fp32")
    return headline
