"""How :func:`compress.bench` measures files (:class:`BenchConfig`, the recipe's ``bench``
section).
"""

from __future__ import annotations

from dataclasses import dataclass

from compress.benchmark.backend_table import BACKENDS
from compress.core.fields import check, check_choices, choice


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
        check(self.batch_size > 0, f"batch_size: expected > 0, got {self.batch_size}")
        check(self.warmup >= 0, f"warmup: expected >= 0, got {self.warmup}")
        check(self.iterations > 0, f"iterations: expected > 0, got {self.iterations}")
        check(
            self.time_budget_s is None or self.time_budget_s > 0,
            f"time_budget_s: expected > 0 or null, got {self.time_budget_s}",
        )
        check(self.threads >= 0, f"threads: expected >= 0, got {self.threads}")
        check(self.processes > 0, f"processes: expected > 0, got {self.processes}")
        check(
            self.eval_samples is None or self.eval_samples > 0,
            f"eval_samples: expected > 0 or null, got {self.eval_samples}",
        )
