"""The distill stage with every loss: the student learns, regressors and hooks do not leak, and
the teacher sees exactly the (mixed) batch the student sees."""

import pytest
import torch
import yaml
from conftest import DIGITS_BASE as BASE
from conftest import run_recipe

from compress.nets.models import build_model
from compress.pipeline.recipe.load import load_recipe

pytestmark = pytest.mark.slow

TRAIN = {"epochs": 3, "optimizer": "adamw", "lr": 0.003, "weight_decay": 0.0}
PAIRS = [{"teacher": "layer2", "student": "layer2"}, {"teacher": "layer3", "student": "layer3"}]
METHODS = {
    "ce": ["ce"],
    "kd": [{"name": "kd", "temperature": 4, "alpha": 0.9}],
    "logit_mse": ["logit_mse", "ce"],
    "hybrid": [{"name": "hybrid", "alpha": 0.5}, "ce"],
    "fitnet": ["kd", {"name": "fitnet", "weight": 10, "pairs": PAIRS[1:]}],
    "at": ["kd", {"name": "at", "pairs": PAIRS}],
    "dkd": [{"name": "dkd", "warmup_epochs": 1}],
}


def distill_recipe(name, checkpoint, loss, **distill):
    return BASE | {
        "name": name,
        "teacher": BASE["teacher"] | {"checkpoint": checkpoint},
        "stages": ["teacher", {"distill": {"loss": loss, "train": TRAIN} | distill}],
    }


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_improves_the_student_and_saves_a_plain_student(
    tmp_path, digits_teacher, method
):
    artifacts = run_recipe(tmp_path, distill_recipe(method, digits_teacher, METHODS[method]))
    metrics = artifacts["distill"].metrics
    assert metrics["top1"] > metrics["top1_at_start"] + 25, metrics
    saved = torch.load(artifacts["distill"].files["model"], weights_only=True)
    assert set(saved) == set(
        build_model("cifar:resnet20", num_classes=10, cifar_stem=True).state_dict()
    )


def test_mixup_teacher_sees_exactly_the_students_batch(tmp_path, digits_teacher, monkeypatch):
    import compress.pipeline.stages.distill as stage
    import compress.training.teaching as teaching

    seen = {"teacher": None, "matches": 0, "mixed": 0}

    def watch_teacher(module, args):
        seen["teacher"] = args[0].detach().clone()

    def watch_student(module, args):
        if seen["teacher"] is not None:
            assert torch.equal(args[0], seen["teacher"])
            seen["matches"] += 1
            seen["teacher"] = None

    real_frozen, real_start = stage.frozen, stage.start_network
    monkeypatch.setattr(
        stage, "frozen", lambda m: real_frozen(m).register_forward_pre_hook(watch_teacher) and m
    )

    def start_watched(*args):
        model, loaded = real_start(*args)
        return _hooked(model, watch_student), loaded

    monkeypatch.setattr(stage, "start_network", start_watched)
    real_mix = teaching.BatchMix

    class CountingMix(real_mix):
        def __call__(self, images, labels):
            out = super().__call__(images, labels)
            seen["mixed"] += out.mixed_labels is not None
            return out

    monkeypatch.setattr(teaching, "BatchMix", CountingMix)
    recipe = distill_recipe(
        "mix",
        digits_teacher,
        ["kd"],
        augment={"mixup_alpha": 0.4, "cutmix_alpha": 1.0, "cutout": 2},
    )
    recipe["stages"][1]["distill"]["train"] = TRAIN | {"epochs": 1}
    run_recipe(tmp_path, recipe)
    assert (
        seen["matches"] >= 19 and seen["mixed"] >= 19
    )  # every training step (600 / 32) was mixed and matched


def _hooked(model, hook):
    model.register_forward_pre_hook(hook)
    return model


def test_multi_stage_teacher_assistant_student_and_born_again(tmp_path, digits_teacher):
    raw = BASE | {
        "name": "chain",
        "teacher": BASE["teacher"] | {"checkpoint": digits_teacher},
        "stages": [
            "teacher",
            {
                "distill": {
                    "name": "born_again",
                    "student": {"model": "cifar:resnet20"},
                    "init_from_teacher": True,
                    "loss": "kd",
                    "train": TRAIN | {"epochs": 1},
                }
            },
            {
                "distill": {
                    "teacher": "born_again",
                    "student": {"model": "cifar:resnet20"},
                    "loss": "kd",
                    "train": TRAIN,
                }
            },
        ],
    }
    artifacts = run_recipe(tmp_path, raw)
    born_again = artifacts["born_again"].metrics
    assert born_again["init_from_teacher_tensors"] == len(
        build_model("cifar:resnet20", num_classes=10).state_dict()
    )
    assert born_again["top1_at_start"] == pytest.approx(
        artifacts["teacher"].metrics["top1"]
    )  # starts as the teacher
    assert artifacts["distill"].metrics["teacher_stage"] == "born_again"
    assert artifacts["distill"].metrics["teacher_top1"] == born_again["top1"]
    assert (tmp_path / "out" / "chain" / "born_again" / "model.pt").is_file()


def test_unlabeled_pool_gets_only_teacher_terms(tmp_path, digits_teacher):
    import numpy as np

    pool = tmp_path / "pool.npz"
    np.savez(pool, x=np.random.default_rng(0).integers(0, 256, (150, 8, 8, 3), dtype=np.uint8))
    recipe = distill_recipe("unlabeled", digits_teacher, [{"name": "kd", "alpha": 0.9}])
    recipe["data"] = recipe["data"] | {"unlabeled": {"path": str(pool), "limit": 100}}
    metrics = run_recipe(tmp_path, recipe)["distill"].metrics
    assert metrics["unlabeled_images"] == 100
    assert metrics["top1"] > metrics["top1_at_start"] + 25


def test_cached_teacher_logits_give_the_same_student(tmp_path, digits_teacher):
    runs = {}
    for cached in (False, True):
        recipe = distill_recipe(
            f"cache-{cached}",
            digits_teacher,
            [{"name": "kd", "alpha": 0.9}],
            cache_teacher_logits=cached,
        )
        recipe["stages"][1]["distill"]["train"] = TRAIN | {"epochs": 1}
        runs[cached] = run_recipe(tmp_path, recipe)["distill"]
    assert (
        runs[True].metrics["cached_teacher_logits"]
        and not runs[False].metrics["cached_teacher_logits"]
    )
    uncached = torch.load(runs[False].files["model"], weights_only=True)
    cached = torch.load(runs[True].files["model"], weights_only=True)
    for name, tensor in uncached.items():
        assert torch.allclose(tensor.float(), cached[name].float(), atol=1e-4), name


def test_caching_is_refused_when_teacher_inputs_change(tmp_path):
    from compress.errors import RecipeError

    recipe = distill_recipe(
        "refused", None, ["kd"], cache_teacher_logits=True, augment={"mixup_alpha": 0.2}
    )
    del recipe["teacher"]["checkpoint"]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(
        RecipeError,
        match="cache_teacher_logits: needs identical teacher inputs every epoch, but augment mixes",
    ):
        load_recipe(path)
