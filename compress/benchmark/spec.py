"""How :func:`compress.bench` measures files (:class:`BenchConfig`, the recipe's ``bench``
section).
"""

from __future__ import annotations

from dataclasses import dataclass

from compress.benchmark.backend_table import BACKENDS
from compress.core.fields import check, check_choices, check_count, choice

# upper bounds of the bench's counts (issue 28): generous for real use, refusing the typo that
# would run for hours (100 processes took 30 s to start, and the time budget does not bound that)
MAX_PROCESSES = 50
MAX_RUNS = 100_000
MAX_BATCH = 65_536
MAX_THREADS = 1_024
MAX_BUDGET_S = 3_600


@dataclass(frozen=True)
class BenchConfig:
    """Latency/throughput/memory/accuracy measurement of exported models.

    ``backends``: where to measure (``compress list backends``); the first one's rows are the
    headline, gated and reported; each further one adds rows with their own ratios.

    ``processes``: fresh processes per model, interleaved between the models of a backend
    (:mod:`compress.benchmark.latency`): one process's latency can sit in one of two modes 1.6x
    apart, so the headline is the median of the processes' medians. Five by default: odd, so
    the median is one process's own number, and two slow processes out of five cannot move it;
    each extra process costs a start-up (0.3-0.5 s for ONNX Runtime on CPU, 2 s for PyTorch)
    and its warm-up, while ``time_budget_s`` is split among the processes, not multiplied.
    pyperf runs 20, which would make a recipe's bench stage several times longer.
    """

    # the runtimes each file is measured on (`compress list backends`)
    backends: tuple[str, ...] = choice(("onnxruntime",), BACKENDS.names)
    batch_size: int = 64  # the throughput batch; batch 1 is always measured too
    warmup: int = 10  # untimed runs per batch size, in every process
    iterations: int = 100  # timed runs per batch size at most, in every process
    time_budget_s: float | None = 10.0  # per measurement, split among the processes
    threads: int = 0  # 0: the backend's default
    eval_samples: int | None = None  # None: the whole test split
    processes: int = 5  # fresh processes per model, interleaved; 1: the old single process

    def __post_init__(self):
        check_choices(self)

        check(bool(self.backends), "backends: expected at least one backend")
        check(
            len(set(self.backends)) == len(self.backends),
            f"backends: listed twice in {list(self.backends)}",
        )
        check_count(self.batch_size, "batch_size", 1, MAX_BATCH, "images per run")
        check_count(self.warmup, "warmup", 0, MAX_RUNS, "untimed runs per batch size")
        check_count(self.iterations, "iterations", 1, MAX_RUNS, "timed runs per batch size")
        check(
            self.time_budget_s is None or 0 < self.time_budget_s <= MAX_BUDGET_S,
            f"time_budget_s: expected 0 < seconds <= {MAX_BUDGET_S:,} or null, got "
            f"{self.time_budget_s}",
        )
        check_count(self.threads, "threads", 0, MAX_THREADS, "0: the runtime's default")
        check_count(self.processes, "processes", 1, MAX_PROCESSES, "each starts a fresh runtime")
        check(
            self.eval_samples is None or self.eval_samples > 0,
            f"eval_samples: expected > 0 or null, got {self.eval_samples}",
        )
