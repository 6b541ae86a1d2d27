"""Measure exported models and compare them: one row per model, ratios vs a reference, a table.

A row describes the exported file, not the PyTorch model: size, parameters and MACs read from
the ONNX graph; latency, throughput and memory from a bench backend (a fresh child process per
model); top-1 accuracy of the exported model itself through ONNX Runtime (or the backend's own
runtime, OpenVINO for ``openvino``). Whatever fails in a
row (a corrupt file, a crashed runtime, missing preprocessing metadata) is recorded in that row's
``status``/``error`` and the other rows go on (CONTRIBUTING.md, habit 7).

:mod:`.rows` declares the typed records (:class:`~.rows.BenchRow`, :class:`~.rows.BenchResult`)
and reads and writes ``bench.json``; :mod:`.measure` measures one model, :mod:`.compare` runs
several on several backends, :mod:`.ratios` holds the numbers the gates and the report read,
:mod:`.table` prints a result.
Typical use (what the bench stage does)::

    result = bench_models({"teacher": t_path, "student": s_path}, cfg, (images, labels))
    write_bench(result, run_dir / "bench")
"""

from compress.benchmark.backend_table import BACKENDS

__all__ = ["BACKENDS"]
