"""Run a recipe's stages in order into ``<out>/<run>/``, skipping the ones already done.

A stage is skipped when its ``stage.json`` records the same input key and its files are intact.
The key chains: each stage's key covers its own config, the recipe sections every stage reads
(data, seed, teacher, student) and the previous stage's key, so changing a stage re-runs it and
everything after it, and nothing before it.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml

from compress.core import distributed
from compress.core.fileio import sha256_file, write_text_atomic
from compress.errors import RecipeError, StageError
from compress.pipeline.artifacts import (
    Artifact,
    discard,
    input_key,
    load_completed,
    record_stage,
)
from compress.pipeline.config import STAGE_KINDS, Recipe, StageSpec
from compress.pipeline.context import RunContext
from compress.pipeline.memory import stage_peak_rss
from compress.pipeline.recipe.checks import resolve_device, weighted_sections
from compress.pipeline.recipe.serialise import recipe_to_dict
from compress.pipeline.report import remove_report, write_report
from compress.pipeline.run_lock import run_lock
from compress.pipeline.stages import stage_function


def run(
    recipe: Recipe, *, force: bool = False, show_progress: bool = True, wait: bool = False
) -> dict[str, Artifact]:
    """Run every stage of ``recipe``, then write the run report; return the artifacts by stage name.

    Under torchrun (``torchrun --nproc_per_node=N -m compress run RECIPE``) every process calls
    this: they join one process group (:mod:`compress.core.distributed`), all of them run the
    training stages together, rank 0 alone writes files and prints, export and bench run on
    rank 0 only, and every rank returns rank 0's artifacts.

    Args:
        recipe: a validated recipe (``compress.load_recipe``).
        force: re-run stages even when their inputs are unchanged.
        show_progress: progress bars and per-epoch lines on stderr (rank 0's only).
        wait: when another run holds the run folder, wait for it instead of refusing.

    Raises:
        CompressError: a stage failed for a reason the user can fix; earlier stages stay done.
    """
    with distributed.process_group(resolve_device(recipe.device)) as device:
        # an uneven split fails before any stage
        distributed.per_process_batch(recipe.data.batch_size)
        run_dir = distributed.on_main(partial(prepare_run_dir, recipe))
        with run_lock(run_dir, wait=wait) if distributed.is_main() else contextlib.nullcontext():
            return run_stages(
                recipe,
                run_dir,
                device,
                force=force,
                show_progress=show_progress and distributed.is_main(),
            )


def run_stages(
    recipe: Recipe, run_dir: Path, device: torch.device, *, force: bool, show_progress: bool
) -> dict[str, Artifact]:
    resolved = recipe_to_dict(recipe)
    text = yaml.safe_dump(resolved, sort_keys=False)
    distributed.on_main(partial(write_text_atomic, run_dir / "recipe.yaml", text))
    check_shared(run_dir / "recipe.yaml", text)
    ctx = RunContext(recipe, run_dir, device, show_progress=show_progress)
    stages = stage_keys(recipe, resolved)
    rerunning = False  # once a stage runs, every later one does: its input is being replaced
    for index, (spec, key, stage_config) in enumerate(stages):
        folder = run_dir / spec.name
        artifact = (
            None
            if force or rerunning
            else distributed.on_main(partial(load_completed, folder, run_dir, key))
        )
        # rank 0 prepares the folder, every rank (or rank 0 alone) runs the stage, rank 0 records it
        if artifact is None:
            if not rerunning:
                later = [run_dir / s.name for s, _, _ in stages[index:]]
                distributed.on_main(partial(discard_results, run_dir, later))
                rerunning = True
            distributed.on_main(partial(start_stage, folder, force))
            artifact = (
                run_stage(spec, ctx, folder, key, index)
                if distributed.is_main() or not STAGE_KINDS[spec.kind].rank0_only
                else None
            )
            artifact = distributed.on_main(
                partial(finish_stage, folder, run_dir, artifact, stage_config, resolved)
            )
        ctx.artifacts[spec.name] = artifact
        if show_progress:
            print(stage_line(artifact), file=sys.stderr)
    if distributed.is_main():
        write_report(run_dir)
    return ctx.artifacts


def stage_keys(recipe: Recipe, resolved: dict | None = None) -> list[tuple[StageSpec, str, dict]]:
    """Each stage with its input key and resolved section: a finished stage whose record holds
    the same key is reused, any other runs. The key chains the shared inputs (seed, data,
    networks, teacher checkpoint) and every section up to the stage's own."""
    resolved = resolved or recipe_to_dict(recipe)
    key = input_key(shared_inputs(recipe, resolved))
    keys = []
    for index, spec in enumerate(recipe.stages):
        stage_config = resolved["stages"][index][spec.kind]
        key = input_key(key, spec.kind, spec.name, stage_config)
        keys.append((spec, key, stage_config))
    return keys


def plan(recipe: Recipe) -> dict[str, bool]:
    """Stage name -> whether :func:`run` would reuse it (a finished stage with the same inputs is
    in the run folder) rather than run it; reads the folder, writes nothing.

    A stage that would run throws its old result away, and every later stage's: check before a
    long run whose inputs may have moved (e.g. the data path spelled differently, which is part
    of every key).
    """
    run_dir = Path(recipe.out) / recipe.name
    reused, rerunning = {}, False
    for spec, key, _ in stage_keys(recipe):  # as run_stages: after a stage that runs, all do
        rerunning = rerunning or load_completed(run_dir / spec.name, run_dir, key) is None
        reused[spec.name] = not rerunning
    return reused


def check_shared(path: Path, text: str) -> None:
    """Every rank reads the files rank 0 writes: on several machines the run folder must be on a
    filesystem they share. Checked once on the resolved recipe rank 0 just wrote."""
    if distributed.world_size() == 1:
        return
    try:
        seen = path.read_text(encoding="utf-8")
    except OSError:
        seen = None
    if seen != text:
        raise StageError(
            f"out: process {distributed.rank()} does not see {path} as rank 0 wrote it; with "
            "several machines, put the output folder on a filesystem all of them share"
        )


def discard_results(run_dir: Path, folders: list[Path]) -> None:
    """Before the first stage that re-runs: forget it and every later stage, delete the files
    their records list and the run report, so that a re-run failing anywhere leaves no earlier
    deliverable (``student.onnx``, ``bench/``, ``report.md``) looking like this run's."""
    for folder in folders:
        discard(folder, run_dir)
    remove_report(run_dir)


def start_stage(folder: Path, force: bool) -> None:
    """Make the stage's folder and, with ``force``, delete its epoch checkpoints; rank 0 does
    this before any rank starts the stage (its record is already gone: discard_results)."""
    folder.mkdir(parents=True, exist_ok=True)
    if force:
        remove_checkpoints(folder)


def finish_stage(
    folder: Path, run_dir: Path, artifact: Artifact, stage_config: dict, resolved: dict
) -> Artifact:
    record_stage(folder, run_dir, artifact, stage_config, resolved)
    remove_checkpoints(folder)  # the stage is complete: its epoch checkpoints are spent
    return artifact


def run_stage(spec, ctx: RunContext, folder: Path, key: str, index: int) -> Artifact:
    folder.mkdir(parents=True, exist_ok=True)
    ctx.stage_dir, ctx.stage_key = folder, key
    # a stage's result must not depend on which earlier stages were skipped
    seed_everything(ctx.recipe.seed + index)
    if ctx.show_progress:
        print(f"[{spec.name}] running", file=sys.stderr)
    started = time.perf_counter()
    with stage_peak_rss() as peak:
        artifact = stage_function(spec.kind)(spec.config, ctx)
    artifact.stage = spec.name
    artifact.key, artifact.seconds = key, time.perf_counter() - started
    artifact.peak_rss_mb = peak.mb
    return artifact


def remove_checkpoints(folder: Path) -> None:
    """Delete a stage's epoch checkpoints (see :mod:`compress.training.checkpoint`)."""
    for path in folder.glob("train-*.ckpt"):
        path.unlink(missing_ok=True)


def shared_inputs(recipe: Recipe, resolved: dict) -> dict:
    """What every stage's result depends on besides its own section (device and workers
    excluded)."""
    data = {k: v for k, v in resolved["data"].items() if k != "workers"}
    checkpoint = recipe.teacher.checkpoint
    inputs = {
        "seed": recipe.seed,
        "data": data,
        "teacher": resolved["teacher"],
        "student": resolved["student"],
        "teacher_checkpoint_sha256": sha256_file(Path(checkpoint)) if checkpoint else None,
    }
    weight_files = _weight_files(recipe)
    if weight_files:  # only then: the keys of runs without pretrained weights stay as they were
        inputs["weights_sha256"] = weight_files
    return inputs


def _weight_files(recipe: Recipe) -> dict[str, str]:
    """The sha256 of each local weights file the recipe starts a network from, by field (a file
    rewritten under the same name is new input; named weights are immutable releases)."""
    from compress.nets.pretrained import parse_weights

    files = {}
    for field, section in weighted_sections(recipe):
        local = parse_weights(section.weights, section.model).local_file
        if local is not None:
            files[field] = sha256_file(local)
    return files


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
            raise StageError(
                f"{folder} links to {folder.resolve()}, outside the run folder; remove the link"
            )
    return run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stage_line(artifact: Artifact) -> str:
    state = "skipped (unchanged)" if artifact.skipped else f"done in {artifact.seconds:.1f}s"
    return f"[{artifact.stage}] {state}"
