"""The recipe's stages and the library are one code path: a stage run by ``compress run`` and
the library verb called on the same inputs, from the same random state, give the same weights."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from conftest import DIGITS_BASE, run_recipe

import compress
from compress.data.augment import Preprocess
from compress.data.load import load_dataset
from compress.data.loaders import make_loaders
from compress.nets.models import build_model
from compress.nets.weights import read_state_dict
from compress.pipeline.config import Recipe
from compress.pipeline.recipe.load import load_recipe
from compress.pipeline.runner import seed_everything
from compress.training.spec import DistillSpec
from compress.training.teaching import LoopSettings

DISTILL = {"loss": [{"name": "kd", "temperature": 4}], "train": {"epochs": 2, "lr": 0.01}}


@dataclass
class StageInputs:
    """What the last stage of a run started from, rebuilt outside the pipeline in the order the
    stage builds it (network initialisation draws from the generator the pipeline seeded)."""

    recipe: Recipe
    by_stage: dict[str, torch.Tensor]  # the weights the stage saved
    student: torch.nn.Module
    teacher: torch.nn.Module
    train: torch.utils.data.DataLoader
    test: torch.utils.data.DataLoader
    loop: LoopSettings

    def assert_same_weights(self, network: torch.nn.Module) -> None:
        by_library = network.state_dict()
        assert self.by_stage.keys() == by_library.keys()
        different = [k for k, v in by_library.items() if not torch.equal(v, self.by_stage[k])]
        assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def run_then_rebuild(
    tmp_path, teacher_weights: str, name: str, stages: list, self_taught: bool = False
) -> StageInputs:
    """Run DIGITS_BASE with ``stages`` (a teacher from ``teacher_weights``, a ResNet-8 student),
    then rebuild the inputs of its last stage; a student from an earlier stage is reloaded.
    ``self_taught``: the last stage's teacher is the student itself (QAT's default), built
    nowhere."""
    raw = copy.deepcopy(DIGITS_BASE) | {"name": name, "stages": stages}
    raw["data"] = raw["data"] | {"augment": True}  # the stage's on-device crop and flip too
    raw["teacher"] = {"model": "cifar:resnet20", "checkpoint": teacher_weights}
    raw["student"] = {"model": "cifar:resnet8"}
    artifacts = list(run_recipe(tmp_path, raw).values())
    recipe = load_recipe(tmp_path / f"{name}.yaml")
    data = load_dataset(recipe.data, seed=recipe.seed)
    seed_everything(recipe.seed + len(stages) - 1)  # what the pipeline does before the stage

    def network(model: str, weights=None) -> torch.nn.Module:
        built = build_model(
            model,
            num_classes=data.num_classes,
            cifar_stem=True,
            in_channels=data.in_channels,
            image_size=data.image_size,
        )
        if weights is not None:
            built.load_state_dict(read_state_dict(weights))
        return built.eval()

    if len(stages) == 2:  # distill: the teacher is loaded, then a fresh student built
        teacher = network("cifar:resnet20", teacher_weights)
        student = network("cifar:resnet8")
    else:  # prune, quantize: the earlier stage's student is reloaded, then the teacher
        student = network("cifar:resnet8", artifacts[-2].files["model"])
        teacher = (
            copy.deepcopy(student) if self_taught else network("cifar:resnet20", teacher_weights)
        )
    train, test = make_loaders(data, recipe.data, seed=recipe.seed)
    return StageInputs(
        recipe,
        read_state_dict(artifacts[-1].files["model"]),
        student,
        teacher,
        train,
        test,
        LoopSettings(prepare=Preprocess(data.mean, data.std, augment=recipe.data.augment)),
    )


def test_the_distill_stage_trains_what_compress_distill_trains(tmp_path, digits_teacher):
    run = run_then_rebuild(tmp_path, digits_teacher, "one_path", ["teacher", {"distill": DISTILL}])
    spec = run.recipe.stages[1].config
    assert isinstance(spec, DistillSpec)  # the recipe's section is the library's spec
    compress.distill(run.student, run.teacher, run.train, spec, test_loader=run.test, loop=run.loop)
    run.assert_same_weights(run.student)


def test_the_prune_stage_prunes_and_fine_tunes_what_compress_prune_does(tmp_path, digits_teacher):
    prune = {
        "speedup": 1.5,
        "steps": 2,
        "round_to": 1,
        "recalibration_images": 96,
        "train": {"epochs": 1, "lr": 0.01},
    }
    stages = ["teacher", {"distill": DISTILL}, {"prune": prune}]
    run = run_then_rebuild(tmp_path, digits_teacher, "one_path_prune", stages)
    spec = run.recipe.stages[2].config
    tuning = DistillSpec(
        loss=run.recipe.stages[1].config.loss, train=spec.train, augment=spec.augment
    )
    compress.prune(
        run.student,
        torch.zeros(2, 3, 8, 8),
        spec,
        steps=spec.steps,
        calibration_data=run.train,
        calibration_images=spec.recalibration_images,
        loop=run.loop,
        finetune=lambda network, step: compress.distill(
            network,
            run.teacher,
            run.train,
            tuning,
            test_loader=run.test,
            loop=run.loop,
            recalibrate_batchnorm=False,
        ),
    )
    run.assert_same_weights(run.student)


def test_the_quantize_stage_calibrates_and_trains_what_the_library_does(tmp_path, digits_teacher):
    quantize = {
        "mode": "qat",
        "calibration": "percentile",
        "calibration_images": 64,
        "train": {"epochs": 1},
    }
    stages = ["teacher", {"distill": DISTILL}, {"quantize": quantize}]
    run = run_then_rebuild(tmp_path, digits_teacher, "one_path_qat", stages, self_taught=True)
    spec = run.recipe.stages[2].config
    calibration, seen = [], 0
    for batch, _ in run.train:  # the first calibration_images training images, as the stage
        calibration.append(run.loop.inputs(batch[: spec.calibration_images - seen]))
        seen += len(calibration[-1])
        if seen >= spec.calibration_images:
            break
    qmodel = compress.quantize(run.student, calibration, spec)
    tuning = DistillSpec(
        loss=run.recipe.stages[1].config.loss, train=spec.train, augment=spec.augment
    )
    # the stage's default QAT teacher is "self": the float student the INT8 network came from
    compress.distill(qmodel, run.teacher, run.train, tuning, test_loader=run.test, loop=run.loop)
    run.assert_same_weights(qmodel)
