"""Run a recipe's stages in order into ``<out>/<run>/``, skipping the ones already done.

A stage is skipped when its ``stage.json`` records the same input key and its files are intact.
The key chains: each stage's key covers its own config, the recipe sections every stage reads
(data, seed, teacher, student) and the previous stage's key, so changing a stage re-runs it and
everything after it, and nothing before it.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from compress.artifacts import Artifact, input_key, invalidate, load_completed, record_stage
from compress.config import Recipe
from compress.context import RunContext
from compress.errors import RecipeError, StageError
from compress.fileio import sha256_file, write_text_atomic
from compress.recipe import recipe_to_dict, resolve_device
from compress.report import write_report
from compress.stages import STAGES


def run(recipe: Recipe, *, force: bool = False, show_progress: bool = True) -> dict[str, Artifact]:
    """Run every stage of ``recipe``, then write the run report; return the artifacts by stage name.

    Args:
        recipe: a validated recipe (``compress.load_recipe``).
        force: re-run stages even when their inputs are unchanged.
        show_progress: progress bars and per-epoch lines on stderr.

    Raises:
        CompressError: a stage failed for a reason the user can fix; earlier stages stay done.
    """
    run_dir = prepare_run_dir(recipe)
    resolved = recipe_to_dict(recipe)
    write_text_atomic(run_dir / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))
    ctx = RunContext(recipe, run_dir, resolve_device(recipe.device), show_progress=show_progress)
    key = input_key(shared_inputs(recipe, resolved))
    for index, spec in enumerate(recipe.stages):
        stage_config = resolved["stages"][index][spec.kind]
        key = input_key(key, spec.kind, spec.name, stage_config)
        folder = run_dir / spec.name
        artifact = None if force else load_completed(folder, run_dir, key)
        if artifact is None:
            if force:
                remove_checkpoints(folder)
            artifact = run_stage(spec, ctx, folder, key, index)
            record_stage(folder, run_dir, artifact, stage_config, resolved)
            remove_checkpoints(folder)  # the stage is complete: its epoch checkpoints are spent
        ctx.artifacts[spec.name] = artifact
        if show_progress:
            print(stage_line(artifact), file=sys.stderr)
    write_report(run_dir)
    return ctx.artifacts


def run_stage(spec, ctx: RunContext, folder: Path, key: str, index: int) -> Artifact:
    folder.mkdir(parents=True, exist_ok=True)
    invalidate(folder)
    ctx.stage_dir, ctx.stage_key = folder, key
    seed_everything(ctx.recipe.seed + index)  # a stage's result must not depend on which earlier stages were skipped
    if ctx.show_progress:
        print(f"[{spec.name}] running", file=sys.stderr)
    started = time.perf_counter()
    artifact = STAGES.get(spec.kind)(spec.config, ctx)
    artifact.stage = spec.name
    artifact.key, artifact.seconds = key, time.perf_counter() - started
    return artifact


def remove_checkpoints(folder: Path) -> None:
    """Delete a stage's epoch checkpoints (see :mod:`compress.checkpoint`)."""
    for path in folder.glob("train-*.ckpt"):
        path.unlink(missing_ok=True)


def shared_inputs(recipe: Recipe, resolved: dict) -> dict:
    """What every stage's result depends on besides its own section (device and workers excluded)."""
    data = {k: v for k, v in resolved["data"].items() if k != "workers"}
    checkpoint = recipe.teacher.checkpoint
    return {
        "seed": recipe.seed, "data": data, "teacher": resolved["teacher"], "student": resolved["student"],
        "teacher_checkpoint_sha256": sha256_file(Path(checkpoint)) if checkpoint else None,
    }


def prepare_run_dir(recipe: Recipe) -> Path:
    out = Path(recipe.out)
    run_dir = out / recipe.name
    if run_dir.resolve().parent != out.resolve():
        raise RecipeError(f"name: {recipe.name!r} would write outside the output folder {out}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StageError(f"out: cannot create the run folder {run_dir}: {exc.strerror}") from None
    for spec in recipe.stages:  # a stage folder that is a link elsewhere would be written through
        folder = run_dir / spec.name
        if folder.resolve().parent != run_dir.resolve():
            raise StageError(f"{folder} links to {folder.resolve()}, outside the run folder; remove the link")
    return run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stage_line(artifact: Artifact) -> str:
    state = "skipped (unchanged)" if artifact.skipped else f"done in {artifact.seconds:.1f}s"
    return f"[{artifact.stage}] {state}"
