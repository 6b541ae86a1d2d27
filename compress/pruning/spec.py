"""What :func:`compress.prune` removes and how it ranks channels (:class:`PruneSpec`), with a
measured latency as the target (:class:`LatencyTarget`) and the table of criteria.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compress.benchmark.backend_table import BACKENDS
from compress.benchmark.spec import MAX_BATCH, MAX_PROCESSES, MAX_THREADS
from compress.core.fields import ADDED_LATER, check, check_choices, check_count, choice
from compress.errors import RecipeError

# Pruning criterion -> ``(PruneConfig) -> torch_pruning importance`` (imported on use).
PRUNING_CRITERIA: dict[str, str] = {
    "magnitude": "compress.pruning.channels:magnitude_importance",
    "taylor": "compress.pruning.channels:taylor_importance",
    "bn_scale": "compress.pruning.channels:bn_scale_importance",
    "lamp": "compress.pruning.channels:lamp_importance",
    "random": "compress.pruning.channels:random_importance",
}


LATENCY_PRECISIONS = ("auto", "fp32", "int8")


MAX_GRID = 64  # candidate widths per layer group: the table times every one of them
MAX_JUDGE_STEPS = 100_000


@dataclass(frozen=True)
class LatencyTarget:
    """A pruning target in measured latency on a runtime, instead of a MACs proxy.

    Give ``latency_ms`` or ``latency_speedup``; both are measured on the exported network, in
    ``precision``, on ``backend``. A per-layer latency table (``grid`` widths per layer group)
    plans each cut, and the cut network is measured before it is kept
    (:mod:`compress.pruning.latency`). With ``judge_images``, each cut weighs several plans, each
    re-estimated, fine-tuned ``judge_steps`` batches and scored on held-out training images
    (NetAdapt's short-term fine-tune; benchmarks/RESULTS.md says how many steps rank plans as
    full fine-tuning does).
    """

    # the pruned network's latency to reach, in milliseconds
    latency_ms: float | None = None
    # the unpruned network's latency over the pruned one's, to reach
    latency_speedup: float | None = None
    # where latency is measured (null: the bench stage's first backend, else onnxruntime)
    backend: str | None = choice(None, BACKENDS.names)
    # the batch latency is measured at
    batch_size: int = 1
    # the runtime's threads while measuring (0: its default)
    threads: int = 1
    # the precision measured (auto: int8 when a quantize stage follows)
    precision: str = choice("auto", LATENCY_PRECISIONS)
    # candidate widths per layer group in the latency table
    grid: int = 8
    # fresh processes (interleaved) that measure each exported candidate
    processes: int = 5
    # training images a cut's candidate plans are scored on (0: no judging)
    judge_images: int = 2048
    # training batches each candidate is fine-tuned before it is scored
    judge_steps: int = 100

    @property
    def active(self) -> bool:
        return self.latency_ms is not None or self.latency_speedup is not None

    def __post_init__(self):
        check_choices(self)
        check(
            self.latency_ms is None or self.latency_speedup is None,
            "latency_speedup: give only one of latency_ms, latency_speedup",
        )
        check(
            self.latency_ms is None or self.latency_ms > 0,
            f"latency_ms: expected > 0 milliseconds, got {self.latency_ms}",
        )
        check(
            self.latency_speedup is None or self.latency_speedup > 1,
            f"latency_speedup: expected a ratio > 1, got {self.latency_speedup}",
        )
        if self.backend is not None:
            check(
                BACKENDS.get(self.backend).table_entry is not None,
                f"backend: {self.backend!r} cannot time single layers; a latency target is "
                "measured on an ONNX Runtime backend (e.g. onnxruntime)",
            )
        check_count(self.batch_size, "batch_size", 1, MAX_BATCH, "images per run")
        check_count(self.threads, "threads", 0, MAX_THREADS, "0: the runtime's default")
        check_count(self.grid, "grid", 2, MAX_GRID, "candidate widths per layer group, each timed")
        check_count(self.processes, "processes", 1, MAX_PROCESSES, "each starts a fresh runtime")
        check(self.judge_images >= 0, f"judge_images: expected >= 0, got {self.judge_images}")
        check_count(
            self.judge_steps, "judge_steps", 0, MAX_JUDGE_STEPS, "training batches per candidate"
        )


@dataclass(frozen=True)
class PruneSpec:
    """What structured channel pruning (Torch-Pruning) removes, and how it ranks channels.

    The target is one of ``speedup`` (MACs reduction ratio), ``target_macs`` (absolute MACs of one
    image), ``pruning_ratio`` (fraction of channels removed per layer group) or ``target`` (a
    measured latency, :class:`LatencyTarget`); none given means ``speedup: 2.0``. The library's
    :func:`compress.prune` takes this alone.
    """

    # how channels are ranked (`compress list criteria`)
    criterion: str = choice("magnitude", PRUNING_CRITERIA)
    norm: int = choice(2, (1, 2))  # p of the group norm ranked by magnitude and lamp
    # the MACs reduction to reach (unpruned MACs / pruned MACs)
    speedup: float | None = None
    # the MACs of one image to reach
    target_macs: int | None = None
    # the fraction of channels each layer group loses
    pruning_ratio: float | None = None
    global_ranking: bool = False  # rank channels across layers instead of the same ratio per layer
    round_to: int = 8  # kept channels are a multiple of this, where a grouped layer allows it
    max_layer_ratio: float = 0.9  # no layer group loses more than this fraction of channels
    # module names or fnmatch patterns never pruned (the classifier never is)
    ignore: tuple[str, ...] = ()
    # a measured latency to reach instead of MACs
    target: LatencyTarget = field(default_factory=LatencyTarget, metadata={ADDED_LATER: True})

    def __post_init__(self):
        check_choices(self)
        given = [
            name
            for name in ("speedup", "target_macs", "pruning_ratio")
            if getattr(self, name) is not None
        ] + (["target"] if self.target.active else [])
        if len(given) > 1:
            raise RecipeError(
                f"{given[-1]}: give only one of speedup, target_macs, pruning_ratio, target (got "
                f"{', '.join(given)})"
            )
        check(
            self.speedup is None or self.speedup > 1,
            f"speedup: expected a MACs reduction ratio > 1, got {self.speedup}",
        )
        check(
            self.target_macs is None or self.target_macs > 0,
            f"target_macs: expected a positive integer, got {self.target_macs}",
        )
        check(
            self.pruning_ratio is None or 0 < self.pruning_ratio < 1,
            f"pruning_ratio: expected 0 < ratio < 1, got {self.pruning_ratio}",
        )
        check(self.round_to >= 1, f"round_to: expected >= 1, got {self.round_to}")
        check(
            0 < self.max_layer_ratio < 1,
            f"max_layer_ratio: expected 0 < ratio < 1, got {self.max_layer_ratio}",
        )
