"""The recipe's stages and the library are one code path: a stage run by ``compress run`` and
the library verb called on the same inputs, from the same random state, give the same weights."""

from __future__ import annotations

import copy

import torch

import compress
from compress.config import DistillSpec
from compress.data.augment import Preprocess
from compress.data.load import load_dataset
from compress.data.loaders import make_loaders
from compress.models import build_model
from compress.pipeline import seed_everything
from compress.recipe.load import load_recipe
from compress.teaching import LoopSettings
from compress.weights import read_state_dict
from tests.conftest import DIGITS_BASE, run_recipe

DISTILL = {"loss": [{"name": "kd", "temperature": 4}], "train": {"epochs": 2, "lr": 0.01}}


def _network(name: str, data) -> torch.nn.Module:
    """The network a stage builds for the run's data (CIFAR stem: images <= 64 px)."""
    return build_model(
        name,
        num_classes=data.num_classes,
        cifar_stem=True,
        in_channels=data.in_channels,
        image_size=data.image_size,
    )


def test_the_distill_stage_trains_what_compress_distill_trains(tmp_path, digits_teacher):
    raw = copy.deepcopy(DIGITS_BASE) | {"name": "one_path"}
    raw["data"] = raw["data"] | {"augment": True}  # the stage's on-device crop and flip too
    raw["teacher"] = {"model": "cifar:resnet20", "checkpoint": digits_teacher}
    raw["student"] = {"model": "cifar:resnet8"}
    raw["stages"] = ["teacher", {"distill": DISTILL}]
    artifacts = run_recipe(tmp_path, raw)
    by_stage = read_state_dict(artifacts["distill"].files["model"])

    recipe = load_recipe(tmp_path / "one_path.yaml")
    data = load_dataset(recipe.data, seed=recipe.seed)
    seed_everything(recipe.seed + 1)  # what the pipeline does before its second stage
    teacher = _network("cifar:resnet20", data)
    teacher.load_state_dict(read_state_dict(digits_teacher))
    student = _network("cifar:resnet8", data)
    train, test = make_loaders(data, recipe.data, seed=recipe.seed)
    spec = recipe.stages[1].config
    assert isinstance(spec, DistillSpec)
    compress.distill(
        student,
        teacher.eval(),
        train,
        spec,
        test_loader=test,
        loop=LoopSettings(prepare=Preprocess(data.mean, data.std, augment=True)),
    )
    by_library = student.state_dict()
    assert by_stage.keys() == by_library.keys()
    different = [k for k, v in by_library.items() if not torch.equal(v, by_stage[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_the_prune_stage_prunes_and_fine_tunes_what_compress_prune_does(tmp_path, digits_teacher):
    prune = {
        "speedup": 1.5,
        "steps": 2,
        "round_to": 1,
        "recalibration_images": 96,
        "train": {"epochs": 1, "lr": 0.01},
    }
    raw = copy.deepcopy(DIGITS_BASE) | {"name": "one_path_prune"}
    raw["teacher"] = {"model": "cifar:resnet20", "checkpoint": digits_teacher}
    raw["student"] = {"model": "cifar:resnet8"}
    raw["stages"] = ["teacher", {"distill": DISTILL}, {"prune": prune}]
    artifacts = run_recipe(tmp_path, raw)
    by_stage = read_state_dict(artifacts["prune"].files["model"])

    recipe = load_recipe(tmp_path / "one_path_prune.yaml")
    data = load_dataset(recipe.data, seed=recipe.seed)
    seed_everything(recipe.seed + 2)
    student = _network("cifar:resnet8", data)
    student.load_state_dict(read_state_dict(artifacts["distill"].files["model"]))
    teacher = _network("cifar:resnet20", data)
    teacher.load_state_dict(read_state_dict(digits_teacher))
    train, test = make_loaders(data, recipe.data, seed=recipe.seed)
    prep = Preprocess(data.mean, data.std, augment=recipe.data.augment)
    spec = recipe.stages[2].config
    tuning = DistillSpec(loss=recipe.stages[1].config.loss, train=spec.train, augment=spec.augment)
    compress.prune(
        student.eval(),
        torch.zeros(2, data.in_channels, data.image_size, data.image_size),
        spec,
        steps=spec.steps,
        num_classes=data.num_classes,
        calibration_data=train,
        calibration_images=spec.recalibration_images,
        loop=LoopSettings(prepare=prep),
        finetune=lambda network, step: compress.distill(
            network,
            teacher.eval(),
            train,
            tuning,
            test_loader=test,
            loop=LoopSettings(prepare=prep),
            recalibrate_batchnorm=False,
        ),
    )
    by_library = student.state_dict()
    assert artifacts["prune"].metrics["macs_reduction"] >= 1.5
    assert by_stage.keys() == by_library.keys()
    different = [k for k, v in by_library.items() if not torch.equal(v, by_stage[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_the_quantize_stage_calibrates_and_trains_what_the_library_does(tmp_path, digits_teacher):
    quantize = {"mode": "qat", "calibration_images": 64, "train": {"epochs": 1}}
    raw = copy.deepcopy(DIGITS_BASE) | {"name": "one_path_qat"}
    raw["teacher"] = {"model": "cifar:resnet20", "checkpoint": digits_teacher}
    raw["student"] = {"model": "cifar:resnet8"}
    raw["stages"] = ["teacher", {"distill": DISTILL}, {"quantize": quantize}]
    artifacts = run_recipe(tmp_path, raw)
    by_stage = read_state_dict(artifacts["quantize"].files["model"])

    recipe = load_recipe(tmp_path / "one_path_qat.yaml")
    data = load_dataset(recipe.data, seed=recipe.seed)
    seed_everything(recipe.seed + 2)
    student = _network("cifar:resnet8", data)
    student.load_state_dict(read_state_dict(artifacts["distill"].files["model"]))
    teacher = _network("cifar:resnet20", data)
    teacher.load_state_dict(read_state_dict(digits_teacher))
    train, test = make_loaders(data, recipe.data, seed=recipe.seed)
    prep = Preprocess(data.mean, data.std, augment=recipe.data.augment)
    spec = recipe.stages[2].config
    calibration, seen = [], 0
    for batch, _ in train:  # the first calibration_images training images, as the stage reads
        calibration.append(prep(batch[: spec.calibration_images - seen], train=False))
        seen += len(calibration[-1])
        if seen >= spec.calibration_images:
            break
    qmodel = compress.quantize(student.eval(), calibration, spec)
    compress.distill(
        qmodel,
        teacher.eval(),
        train,
        DistillSpec(loss=recipe.stages[1].config.loss, train=spec.train, augment=spec.augment),
        test_loader=test,
        loop=LoopSettings(prepare=prep),
    )
    by_library = qmodel.state_dict()
    assert artifacts["quantize"].metrics["quantization"]["mode"] == "qat"
    assert by_stage.keys() == by_library.keys()
    different = [k for k, v in by_library.items() if not torch.equal(v, by_stage[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
