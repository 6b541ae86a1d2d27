"""Structured pruning: MACs targets are met, the classifier and ignored layers survive, widths
round, a pruned checkpoint rebuilds without unpickling modules, and the prune stage fine-tunes
the pruned student back up with its teacher."""

import pytest
import torch
from conftest import DIGITS_BASE as BASE
from conftest import run_recipe

from compress.backends.timing import torch_latency
from compress.config import PRUNING_CRITERIA, PruneConfig, PruneSpec
from compress.errors import ModelError, SettingError, StageError
from compress.models import build_model, count_params_macs
from compress.pruning import ChannelPruner, prune_network
from compress.records import NetworkSpec
from compress.weights import apply_structure, load_weights, save_weights, structure_of

SIZES = {"cifar:resnet20": 8, "torchvision:mobilenet_v2": 16}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convs gain nothing from threads, and two threads fighting a busy 2-core machine
    slow Torch-Pruning's many small forwards down 30x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trained_like(name: str, seed: int = 0) -> torch.nn.Module:
    """A network with random weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=10, cifar_stem=True)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.2, 1.5)
            module.bias.data.normal_(0, 0.1)
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def example(name: str, batch: int = 2) -> torch.Tensor:
    return torch.randn(
        batch, 3, SIZES[name], SIZES[name], generator=torch.Generator().manual_seed(1)
    )


def macs_of(model, name):
    return count_params_macs(model, SIZES[name])


def gradients(name):
    def backward(model):
        torch.nn.functional.cross_entropy(model(example(name, 8)), torch.arange(8) % 10).backward()

    return backward


@pytest.mark.parametrize(
    ("name", "round_to", "speedup"),
    [
        ("torchvision:mobilenet_v2", 8, 2.0),
        ("cifar:resnet20", 1, 2.0),
        ("cifar:resnet20", 1, 3.0),
    ],
)
def test_speedup_meets_the_macs_target_within_10_percent(name, round_to, speedup):
    model = trained_like(name)
    params, macs = macs_of(model, name)
    result = prune_network(
        model,
        example(name),
        PruneConfig(speedup=speedup, round_to=round_to),
        num_classes=10,
        target_macs=round(macs / speedup),
    )
    assert result["macs"] <= macs / speedup and macs / result["macs"] == pytest.approx(
        speedup, rel=0.1
    )
    assert (result["params"], result["macs"]) == macs_of(model, name)
    assert result["params"] < params / 1.5
    assert model(example(name)).shape == (2, 10) and not model.training


def test_pruning_ratio_halves_every_prunable_layer_exactly():
    name = "cifar:resnet20"
    model, original = trained_like(name), trained_like(name)
    params, macs = macs_of(model, name)
    result = prune_network(
        model, example(name), PruneConfig(pruning_ratio=0.5, round_to=1), num_classes=10
    )
    widths = {
        n: m.out_channels for n, m in original.named_modules() if isinstance(m, torch.nn.Conv2d)
    }
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            assert m.out_channels == widths[n] // 2, n
    assert model.conv1.in_channels == 3 and model.fc.out_features == 10
    assert (
        3.5 < params / result["params"] < 4.5 and 3.5 < macs / result["macs"] < 4.5
    )  # widths halve: ~ratio^2


def test_every_recipe_criterion_names_an_importance():
    from compress.registry import load_entry

    assert all(callable(load_entry(entry)) for entry in PRUNING_CRITERIA.values())


@pytest.mark.parametrize("criterion", sorted(PRUNING_CRITERIA))
def test_every_criterion_prunes(criterion):
    name = "cifar:resnet20"
    model = trained_like(name)
    _, macs = macs_of(model, name)
    cfg = PruneConfig(criterion=criterion, round_to=1, norm=1)
    result = prune_network(
        model,
        example(name),
        cfg,
        num_classes=10,
        target_macs=macs // 2,
        gradient_fn=gradients(name),
    )
    assert result["macs"] <= macs // 2
    assert torch.isfinite(model(example(name))).all()
    assert all(p.grad is None for p in model.parameters())  # taylor's gradients do not leak


def test_taylor_ranks_with_fresh_gradients_before_every_step():
    name = "cifar:resnet20"
    model = trained_like(name)
    calls = []
    backward = gradients(name)
    result = prune_network(
        model,
        example(name),
        PruneConfig(criterion="taylor", round_to=1),
        num_classes=10,
        target_macs=macs_of(model, name)[1] // 2,
        gradient_fn=lambda m: calls.append(m.training) or backward(m),
    )
    assert len(calls) == result["pruner_steps"] > 1 and not any(
        calls
    )  # eval mode: BN statistics untouched


def test_classifier_and_ignored_layers_keep_their_width_and_widths_round_to_8():
    name = "torchvision:mobilenet_v2"
    model, original = trained_like(name), trained_like(name)
    cfg = PruneConfig(speedup=2.0, ignore=("features.17.*", "features.2.conv.0.0"))
    prune_network(
        model, example(name), cfg, num_classes=10, target_macs=macs_of(model, name)[1] // 2
    )
    before = structure_of(original)
    after = structure_of(model)
    assert after["classifier.1"]["out_features"] == 10
    for layer in (
        "features.17.conv.0.0",
        "features.17.conv.1.0",
        "features.17.conv.2",
        "features.2.conv.0.0",
    ):
        assert after[layer]["out_channels"] == before[layer]["out_channels"], layer
    changed = [n for n, w in after.items() if "out_channels" in w and w != before[n]]
    assert len(changed) > 20
    for n in changed:
        assert after[n]["out_channels"] % 8 == 0, (n, after[n])
    depthwise = [n for n, w in after.items() if w.get("groups", 1) > 1]
    assert depthwise and all(
        after[n]["groups"] == after[n]["in_channels"] == after[n]["out_channels"] for n in depthwise
    )


def test_pruning_a_training_model_leaves_batchnorm_statistics_and_mode_alone():
    name = "cifar:resnet20"
    model = trained_like(name).train()
    kept = model.layer3[2].bn2.running_mean.clone()
    prune_network(
        model,
        example(name),
        PruneConfig(ignore=("layer3.*",)),
        num_classes=10,
        target_macs=macs_of(model, name)[1] // 2,
    )
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model.layer3[2].bn2.running_mean, kept)


def test_ignore_pattern_matching_nothing_names_the_field():
    name = "cifar:resnet20"
    with pytest.raises(SettingError, match=r"^ignore: 'layer9\.\*' matches no module"):
        prune_network(
            trained_like(name),
            example(name),
            PruneConfig(ignore=("layer9.*",)),
            num_classes=10,
            target_macs=1,
        )


def test_unreachable_target_stops_with_a_clear_error():
    name = "cifar:resnet20"
    model = trained_like(name)
    with pytest.raises(StageError, match="cannot reach 1,000 MACs within max_layer_ratio 0.5"):
        prune_network(
            model,
            example(name),
            PruneConfig(max_layer_ratio=0.5, round_to=1),
            num_classes=10,
            target_macs=1000,
        )
    with pytest.raises(StageError, match="pruning_ratio: 0.8 removes more than max_layer_ratio"):
        ChannelPruner(
            model,
            example(name),
            PruneConfig(pruning_ratio=0.8, max_layer_ratio=0.5),
            num_classes=10,
        )


@pytest.mark.parametrize("name", sorted(SIZES))
def test_pruned_checkpoint_reloads_identically_without_pickled_modules(tmp_path, name):
    model = trained_like(name)
    prune_network(
        model,
        example(name),
        PruneConfig(speedup=2.0),
        num_classes=10,
        target_macs=macs_of(model, name)[1] // 2,
    )
    path = save_weights(model, tmp_path / "model.pt", structure=structure_of(model))
    saved = torch.load(path, weights_only=True)
    assert saved["structure"] == structure_of(model) and set(saved["state_dict"]) == set(
        model.state_dict()
    )
    fresh = load_weights(build_model(name, num_classes=10, cifar_stem=True), path).eval()
    with torch.no_grad():
        assert torch.equal(fresh(example(name)), model(example(name)))
    assert macs_of(fresh, name) == macs_of(model, name)


BAD_STRUCTURES = {
    "unknown layer": (
        {"layer9.conv1": {"in_channels": 8, "out_channels": 8, "groups": 1}},
        "names 'layer9.conv1', which cifar:resnet20",
    ),
    "wrong type": ({"relu": {"num_features": 8}}, "'relu' is a ReLU"),
    "wrong fields": ({"bn1": {"in_features": 8}}, "'bn1' must give positive integers num_features"),
    "not an int": ({"bn1": {"num_features": "8"}}, "'bn1' must give positive integers"),
    "groups": (
        {"conv1": {"in_channels": 3, "out_channels": 16, "groups": 2}},
        "not divisible by groups=2",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_STRUCTURES))
def test_bad_structure_is_a_model_error(tmp_path, case):
    structure, message = BAD_STRUCTURES[case]
    model = build_model("cifar:resnet20", num_classes=10)
    path = tmp_path / "bad.pt"
    torch.save({"structure": structure, "state_dict": model.state_dict()}, path)
    with pytest.raises(ModelError, match=message):
        load_weights(build_model("cifar:resnet20", num_classes=10), path)
    with pytest.raises(ModelError, match=message):
        apply_structure(build_model("cifar:resnet20", num_classes=10), structure)


def test_structure_that_fits_but_weights_that_do_not_is_a_model_error(tmp_path):
    model = build_model("cifar:resnet20", num_classes=10)
    structure = structure_of(model) | {"bn1": {"num_features": 8}}
    path = tmp_path / "mismatch.pt"
    torch.save({"structure": structure, "state_dict": model.state_dict()}, path)
    with pytest.raises(ModelError, match="size mismatch for bn1.weight"):
        load_weights(build_model("cifar:resnet20", num_classes=10), path)


def test_torch_latency_reports_percentiles_and_restores_the_mode():
    model = build_model("cifar:resnet20", num_classes=10).train()
    result = torch_latency(
        model, torch.zeros(1, 3, 8, 8), warmup=1, iterations=20, time_budget_s=0.5
    )
    assert 5 <= result["runs"] <= 20
    assert 0 < result["p50_ms"] <= result["p90_ms"] <= result["p99_ms"]
    assert model.training and all(
        m.running_mean.abs().sum() == 0
        for m in model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    )


# --- the prune stage in a pipeline ---------------------------------------------------------------

TRAIN = {"epochs": 2, "optimizer": "adamw", "lr": 0.003, "weight_decay": 0.0}


def prune_recipe(name, checkpoint, **prune):
    return BASE | {
        "name": name,
        "teacher": BASE["teacher"] | {"checkpoint": checkpoint},
        "stages": [
            "teacher",
            {"distill": {"loss": "kd", "train": TRAIN}},
            {"prune": {"train": TRAIN} | prune},
        ],
    }


@pytest.mark.slow
def test_pipeline_prunes_the_distilled_student_and_fine_tuning_recovers(tmp_path, digits_teacher):
    artifacts = run_recipe(
        tmp_path,
        prune_recipe("prune_run", digits_teacher, speedup=2.0, steps=2, max_layer_ratio=0.75),
    )
    metrics = artifacts["prune"].metrics
    distilled = artifacts["distill"].metrics
    assert metrics["source_stage"] == "distill" and metrics["loss"] == ["kd"]
    assert artifacts["prune"].network == NetworkSpec(
        "cifar:resnet20", num_classes=10, cifar_stem=True
    )  # the source's network, rebuilt from the record
    assert metrics["macs_before"] == distilled["macs"] and metrics["top1_before"] == pytest.approx(
        distilled["top1"]
    )
    assert metrics["macs_reduction"] >= 1.8 and metrics["macs_reduction"] == pytest.approx(
        metrics["macs_before"] / metrics["macs"]
    )
    assert (
        metrics["params_reduction"] > 1.3
        and metrics["latency_ms_b1"] > 0
        and metrics["latency_ms_b1_before"] > 0
    )
    steps = metrics["steps"]
    assert len(steps) == 2 and steps[0]["macs"] > steps[1]["macs"] == metrics["macs"]
    assert (
        steps[0]["target_macs"] > steps[1]["target_macs"] == metrics["target_macs"]
    )  # geometric schedule: two cuts
    assert (
        steps[0]["top1"] > steps[0]["top1_pruned"] + 20
    )  # the big cut costs accuracy; fine-tuning recovers it
    # most of the cut's cost was stale BatchNorm statistics: re-estimating them recovers it
    assert steps[0]["top1_recalibrated"] > steps[0]["top1_pruned"] + 20
    assert steps[1]["top1"] >= steps[1]["top1_pruned"]
    assert metrics["top1"] == pytest.approx(steps[-1]["top1"]) and [
        h["step"] for h in metrics["history"]
    ] == [1, 1, 2, 2]
    assert metrics["top1_delta"] == pytest.approx(metrics["top1"] - metrics["top1_before"])
    saved = torch.load(artifacts["prune"].files["model"], weights_only=True)
    assert set(saved) == {"structure", "state_dict"}
    reloaded = load_weights(
        build_model("cifar:resnet20", num_classes=10, cifar_stem=True),
        artifacts["prune"].files["model"],
    )
    assert count_params_macs(reloaded, 8)[1] == metrics["macs"]


@pytest.mark.slow
def test_pipeline_taylor_by_ratio_keeps_ignored_layers(tmp_path, digits_teacher):
    recipe = prune_recipe(
        "prune_taylor",
        digits_teacher,
        criterion="taylor",
        pruning_ratio=0.5,
        steps=2,
        round_to=4,
        ignore=["layer3.*"],
    )
    recipe["stages"][2]["prune"]["train"] = TRAIN | {"epochs": 1}
    artifacts = run_recipe(tmp_path, recipe)
    metrics = artifacts["prune"].metrics
    assert metrics["target_macs"] is None and [s["target_macs"] for s in metrics["steps"]] == [
        None,
        None,
    ]
    structure = torch.load(artifacts["prune"].files["model"], weights_only=True)["structure"]
    assert (
        structure["layer1.0.conv1"]["out_channels"] == 8
        and structure["layer2.0.conv1"]["out_channels"] == 16
    )
    assert all(
        w["out_channels"] == 64
        for n, w in structure.items()
        if n.startswith("layer3.") and n.endswith("conv2")
    )
    assert metrics["top1"] > metrics["steps"][0]["top1_pruned"]


def test_stage_target_is_speedup_2_unless_given():
    from compress.pruning import step_targets, target_macs

    assert target_macs(PruneConfig(), 1000) == 500
    assert target_macs(PruneConfig(speedup=4.0), 1000) == 250
    assert target_macs(PruneConfig(target_macs=123), 1000) == 123
    assert target_macs(PruneConfig(pruning_ratio=0.3), 1000) is None
    assert step_targets(PruneSpec(speedup=4.0), 1000, 2) == [
        500,
        250,
    ]  # each step removes the same fraction
    assert step_targets(PruneSpec(pruning_ratio=0.3), 1000, 3) == [None] * 3
    with pytest.raises(StageError, match="not below the network's 1,000 MACs"):
        step_targets(PruneSpec(target_macs=1000), 1000, 1)
