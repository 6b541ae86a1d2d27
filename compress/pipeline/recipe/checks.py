"""What a recipe must satisfy beyond its fields' types: names that become folders, stages in an
order that works, teachers that exist, files that are there, layers that the networks have."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from compress.core.fields import is_utf8, printable
from compress.core.fileio import not_a_file
from compress.errors import ModelError, RecipeError
from compress.pipeline.config import (
    SELF_TEACHER,
    STAGE_KINDS,
    DistillConfig,
    Recipe,
    StageSpec,
    StudentConfig,
    TeacherConfig,
)
from compress.pipeline.recipe.convert import _did_you_mean

# Names that become folders under ``out``: no separators, no "..", no hidden or empty names. A
# stage folder sits beside run files (recipe.yaml, report.md, student.onnx), so it has no dot.
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


_PATH_FIELDS = ("out", "data.path", "data.unlabeled.path", "teacher.checkpoint", "gates.baseline")


_MAX_SEED = 2**32 - 1  # what numpy's seeding accepts; torch takes more


def _check_recipe(recipe: Recipe) -> None:
    if not _RUN_NAME.fullmatch(recipe.name):
        raise RecipeError(
            "name: expected letters, digits, '.', '_' or '-' (a folder name, max 100 chars), got "
            f"{recipe.name!r}"
        )
    if not 0 <= recipe.seed <= _MAX_SEED:
        raise RecipeError(f"seed: expected 0..{_MAX_SEED}, got {recipe.seed}")
    for field in _PATH_FIELDS:
        value = _field(recipe, field)
        if value is not None and (not value.strip() or "\0" in value):
            raise RecipeError(f"{field}: expected a file or folder path, got {value!r}")
        if value is not None and not is_utf8(value):
            # a non-UTF-8 byte (from the command line) ran training, then failed to print the
            # export's error: refused before any work (issue 28)
            raise RecipeError(
                f"{field}: the path {printable(value)!r} is not valid UTF-8; rename it"
            )
    if not recipe.stages:
        raise RecipeError(
            "stages: expected a non-empty list, e.g. [teacher, distill, export, bench]; known "
            f"stages: {', '.join(STAGE_KINDS)}"
        )
    kinds: list[str] = []
    models: list[str] = []  # names of earlier stages that produced a network
    for index, stage in enumerate(recipe.stages):
        where = f"stages[{index}].{stage.name}"
        for need in STAGE_KINDS[stage.kind].needs:
            if need not in kinds:
                raise RecipeError(f"{where}: needs a {need!r} stage before it")
        if stage.name in [s.name for s in recipe.stages[:index]]:
            raise RecipeError(
                f"{where}: the name {stage.name!r} appears twice; give repeated stages a distinct "
                "`name:`"
            )
        if STAGE_KINDS[stage.kind].teaches:
            _check_teaching_stage(recipe, stage, where, models)
        kinds.append(stage.kind)
        if STAGE_KINDS[stage.kind].network:
            models.append(stage.name)
    teacher = recipe.teacher
    if (
        "teacher" in kinds
        and teacher.checkpoint is None
        and teacher.weights is None
        and teacher.train.epochs < 1
    ):
        raise RecipeError(
            "teacher: give a checkpoint to load, weights to start from, or train.epochs >= 1 to "
            "train one"
        )


def _field(node: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        node = getattr(node, name)
    return node


def _check_teaching_stage(recipe: Recipe, stage: StageSpec, where: str, models: list[str]) -> None:
    cfg = stage.config
    own = (SELF_TEACHER,) if stage.kind == "quantize" else ()
    if cfg.teacher not in (*own, *models):
        raise RecipeError(
            f"{where}.teacher: expected an earlier stage that trains a network "
            f"({', '.join((*own, *models))}), got {cfg.teacher!r}"
        )
    if cfg.train.label_smoothing > 0:
        raise RecipeError(
            f"{where}.train.label_smoothing: applies to teacher training only; a {stage.kind} "
            "stage's hard-label term is its `ce`/`kd` loss"
        )
    if stage.kind == "distill" and cfg.cache_teacher_logits:
        _check_cacheable(recipe, cfg, where)
    student = (cfg.student or recipe.student) if stage.kind == "distill" else None
    if student is not None and cfg.init_from_teacher and student.weights is not None:
        raise RecipeError(
            f"{where}.init_from_teacher: the student starts from its weights "
            f"({student.weights}); use one or the other"
        )
    if stage.kind == "quantize":
        for index, term in enumerate(cfg.loss or ()):
            if getattr(term.params, "pairs", ()):
                raise RecipeError(
                    f"{where}.loss[{index}]: {term.name!r} reads intermediate layers, which "
                    "BatchNorm folding removes or renames in the quantized graph; use logit terms "
                    "(kd, logit_mse, hybrid, dkd, ce) for quantization-aware training"
                )


def _check_cacheable(recipe: Recipe, cfg: DistillConfig, where: str) -> None:
    """Cached teacher logits are only right when the teacher sees each image identically every
    epoch."""
    mix = cfg.augment
    reasons = []
    if recipe.data.augment:
        reasons.append("data.augment is on")
    if mix.cutout or (mix.prob > 0 and (mix.mixup_alpha > 0 or mix.cutmix_alpha > 0)):
        reasons.append("augment mixes or erases images")
    if any(getattr(term.params, "pairs", ()) for term in cfg.loss):
        reasons.append("a feature term reads teacher layers every step")
    if reasons:
        raise RecipeError(
            f"{where}.cache_teacher_logits: needs identical teacher inputs every epoch, but "
            f"{' and '.join(reasons)}"
        )


def recipe_warnings(recipe: Recipe) -> list[str]:
    """Legal settings that are probably mistakes; the CLI prints them, nothing is changed."""
    warnings = []
    smoothing = recipe.teacher.train.label_smoothing
    if smoothing > 0 and any(s.kind == "distill" for s in recipe.stages):
        warnings.append(
            f"teacher.train.label_smoothing={smoothing}: a teacher trained with label smoothing "
            "makes a worse distillation teacher (Muller, Kornblith & Hinton 2019, 'When does label "
            "smoothing help?'); use 0 unless you measured otherwise"
        )
    return warnings


def check_references(recipe: Recipe) -> None:
    """Models, files, folders and the device the recipe names must exist before anything runs."""
    from compress.nets.models import unknown_model

    resolve_device(recipe.device)

    for section in ("teacher", "student"):
        problem = unknown_model(getattr(recipe, section).model)
        if problem is not None:
            raise RecipeError(f"{section}.model: {problem}")
    for field, section in weighted_sections(recipe):
        _check_weights(field, section)
    check_layer_names(recipe)
    if recipe.data.path is not None and not _path_is(recipe.data.path, "exists", "data.path"):
        raise RecipeError(f"data.path: no such file or folder: {recipe.data.path}")
    if recipe.data.path is not None:
        _check_readable(Path(recipe.data.path), "data.path")
    if recipe.teacher.checkpoint is not None and not _path_is(
        recipe.teacher.checkpoint, "is_file", "teacher.checkpoint"
    ):
        problem = not_a_file(recipe.teacher.checkpoint)
        raise RecipeError(f"teacher.checkpoint: {problem}: {recipe.teacher.checkpoint}")
    if recipe.gates.baseline is not None and not _path_is(
        recipe.gates.baseline, "exists", "gates.baseline"
    ):
        raise RecipeError(f"gates.baseline: no such file or folder: {recipe.gates.baseline}")
    if recipe.gates.baseline is not None and "bench" not in [s.kind for s in recipe.stages]:
        raise RecipeError("gates.baseline: gates compare the run's bench result; add a bench stage")


def weighted_sections(
    recipe: Recipe,
) -> list[tuple[str, TeacherConfig | StudentConfig]]:
    """``(field, section)`` of every network section that names pretrained ``weights``: the
    teacher, the student and a distill stage's own student."""
    sections = [("teacher", recipe.teacher), ("student", recipe.student)]
    sections += [
        (f"stages[{index}].{stage.name}.student", stage.config.student)
        for index, stage in enumerate(recipe.stages)
        if stage.kind == "distill" and stage.config.student is not None
    ]
    return [(field, section) for field, section in sections if section.weights is not None]


def _check_weights(field: str, section: TeacherConfig | StudentConfig) -> None:
    from compress.nets.pretrained import check_source, parse_weights

    try:
        source = parse_weights(section.weights, section.model)
        if source.local_file is not None:
            _path_is(source.name, "is_file", f"{field}.weights")
        check_source(source, section.model)
    except ModelError as exc:
        raise RecipeError(f"{field}.weights: {exc}") from None


def _path_is(value: str, test: str, field: str) -> bool:
    try:
        return getattr(Path(value), test)()
    except OSError as exc:  # e.g. a name too long; a missing file is just False
        raise RecipeError(
            f"{field}: cannot use this path ({exc.strerror or exc}): {value[:200]!r}"
        ) from None


def check_layer_names(recipe: Recipe) -> None:
    """Layers named by feature losses (fitnet, at) must exist in the networks they refer to."""
    from compress.nets.models import module_names

    arch = {"teacher": recipe.teacher.model}
    student = recipe.student.model
    for index, stage in enumerate(recipe.stages):
        if not STAGE_KINDS[stage.kind].teaches:
            continue
        if stage.kind == "distill":
            student = (stage.config.student or recipe.student).model
        arch[stage.name] = student
        for term_index, term in enumerate(stage.config.loss or ()):
            for pair_index, pair in enumerate(getattr(term.params, "pairs", ())):
                where = f"stages[{index}].{stage.name}.loss[{term_index}].pairs[{pair_index}]"
                for side, model in (
                    ("teacher", arch.get(stage.config.teacher, student)),  # self: the student
                    ("student", student),
                ):
                    layer = getattr(pair, side)
                    names = module_names(model)
                    if layer not in names:
                        raise RecipeError(
                            f"{where}.{side}: no layer {layer!r} in "
                            f"{model}{_did_you_mean(layer, names)}"
                        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RecipeError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"device: {name!r} asked for, but this torch build sees no CUDA device")
    return device


def _check_readable(path: Path, field: str) -> None:
    """A cheap look at the data before anything runs: the file, or the folder and every entry
    directly in it, can be read. The readers check the content when the run loads it."""
    try:
        entries = list(path.iterdir()) if path.is_dir() else [path]
    except OSError as exc:
        raise RecipeError(f"{field}: cannot list {path}: {exc.strerror or exc}") from None
    for entry in entries:
        if not os.access(entry, os.R_OK | (os.X_OK if entry.is_dir() else 0)):
            raise RecipeError(f"{field}: cannot read {entry} (permission denied)")
