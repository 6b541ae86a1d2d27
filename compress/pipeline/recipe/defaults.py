"""Defaults that depend on the rest of the recipe, decided once when it is read, so every stage
and the library see the same concrete choice (and the run folder's ``recipe.yaml`` shows it)."""

from __future__ import annotations

import dataclasses

from compress.benchmark.backend_table import DEFAULT_LATENCY_BACKEND
from compress.errors import RecipeError
from compress.pipeline.config import StageSpec


def resolve_latency_targets(stages: tuple[StageSpec, ...]) -> tuple[StageSpec, ...]:
    """Each prune stage's latency target with its ``backend`` and ``precision`` filled in.

    ``backend`` None: the first backend of the recipe's bench stage (where the student will be
    measured), else onnxruntime. ``precision: auto``: ``int8`` when a quantize stage follows the
    prune stage (what will be deployed), else ``fp32``.

    Raises:
        RecipeError: the bench stage's first backend cannot time single layers, so the target
            must name one that can.
    """
    bench = next((spec.config for spec in stages if spec.kind == "bench"), None)
    resolved = []
    for index, spec in enumerate(stages):
        target = getattr(spec.config, "target", None)
        if spec.kind == "prune" and target is not None and target.active:
            backend = target.backend or (bench.backends[0] if bench else DEFAULT_LATENCY_BACKEND)
            precision = target.precision
            if precision == "auto":
                later = {s.kind for s in stages[index + 1 :]}
                precision = "int8" if "quantize" in later else "fp32"
            try:  # LatencyTarget checks the backend it is given now
                target = dataclasses.replace(target, backend=backend, precision=precision)
            except RecipeError as exc:
                raise RecipeError(
                    f"stages[{index}].{spec.name}.target.{exc} (the default: the bench stage's "
                    "first backend)"
                ) from None
            spec = dataclasses.replace(spec, config=dataclasses.replace(spec.config, target=target))
        resolved.append(spec)
    return tuple(resolved)
