"""The child process that times many small ONNX files in one ONNX Runtime process: the cells of
a per-layer latency table (:mod:`compress.pruning.latency_table`).

One process for all of them, on purpose: ONNX Runtime's latency moves from process to process
(benchmarks/RESULTS.md saw two modes 1.6x apart), and a table whose cells came from different
processes would mix those modes. Inside one process the cells compare. The files are timed in
rounds that visit every file of a chunk in turn, so a burst of load touches them alike; a cell's
value is the median over rounds of its per-round median. Imports only numpy and onnxruntime.
"""

from __future__ import annotations

import time

import numpy as np

from compress.benchmark.backends._ort_worker import _random_feed, _session
from compress.benchmark.backends.child import serve

CHUNK = 48  # files whose sessions are open at once (small layers; bounds the memory)


def measure_each(request: dict) -> dict:
    """``{"status": "ok", "ms": [one latency per path, in order], "spread": [(max - min) / median
    of each path's round medians]}``; a file that fails makes the whole result an error naming
    it (a table with holes would mislead the planner)."""
    paths = request["paths"]
    rng = np.random.default_rng(request.get("seed", 0))
    ms: list[float] = []
    spread: list[float] = []
    for start in range(0, len(paths), CHUNK):
        chunk = paths[start : start + CHUNK]
        sessions = []
        for path in chunk:
            try:
                session = _session(
                    path, request["threads"], request.get("provider", "CPUExecutionProvider")
                )
                feed = _random_feed(session, request["batch_size"], rng)
            except Exception as exc:
                return {"status": "error", "error": f"{path}: {type(exc).__name__}: {exc}"[:300]}
            sessions.append((session, feed))
        rounds = [[] for _ in chunk]
        for _ in range(request["rounds"]):
            for index, (session, feed) in enumerate(sessions):
                for _ in range(request["warmup"]):
                    session.run(None, feed)
                times = []
                for _ in range(request["runs"]):
                    begin = time.perf_counter()
                    session.run(None, feed)
                    times.append(time.perf_counter() - begin)
                rounds[index].append(1000.0 * float(np.median(times)))
        for medians in rounds:
            middle = float(np.median(medians))
            ms.append(middle)
            spread.append((max(medians) - min(medians)) / middle if middle > 0 else 0.0)
    return {"status": "ok", "error": None, "ms": ms, "spread": spread}


if __name__ == "__main__":
    serve(measure_each)
