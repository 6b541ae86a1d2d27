"""INT8 within an accuracy budget (``quantize.max_drop``): the settings, the held-out slice of
the training split, and the search on a network with layers made hostile to INT8 on purpose."""

import pytest
import torch
import yaml
from conftest import DIGITS_BASE
from torch import nn

import compress
from compress.data.load import load_dataset
from compress.data.loaders import split_holdout
from compress.data.spec import DataConfig, SubsetConfig
from compress.errors import DataError, RecipeError
from compress.pipeline.config import QuantizeConfig
from compress.pipeline.recipe.load import load_recipe
from compress.quantization.budget import BudgetNotMet
from compress.quantization.fake_quant import float_convs

# --- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        (
            "max_drop",
            -0.5,
            r"^max_drop: expected top-1 points in 0\.\.100 or null \(off\), got -0\.5$",
        ),
        ("max_drop", 101, r"^max_drop: expected top-1 points in 0\.\.100 or null"),
        ("holdout_images", 0, r"^holdout_images: expected a positive integer or null, got 0$"),
        ("max_float_layers", 0, r"^max_float_layers: expected a positive integer or null, got 0$"),
    ],
)
def test_bad_budget_settings_are_one_line_errors_naming_the_field(field, value, message):
    with pytest.raises(RecipeError, match=message):
        QuantizeConfig(**{field: value})


def test_a_recipe_names_the_bad_max_drop_with_its_path(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": "r", "stages": ["teacher", "distill", {"quantize": {"max_drop": "half"}}]}
        )
    )
    with pytest.raises(RecipeError, match=r"^stages\[2\]\.quantize\.max_drop: expected a number"):
        load_recipe(path)
    path.write_text(path.read_text().replace("half", "0.5"))
    config = load_recipe(path).stages[2].config
    assert (config.max_drop, config.holdout_images, config.max_float_layers) == (0.5, None, None)


def test_a_quantize_stage_without_a_budget_keeps_the_stage_key_of_runs_recorded_before_it():
    from compress.pipeline.recipe.load import recipe_from_dict
    from compress.pipeline.recipe.serialise import recipe_to_dict

    def quantize_section(quantize: dict) -> dict:
        raw = {"name": "t", "stages": ["teacher", "distill", {"quantize": quantize}]}
        stages = recipe_to_dict(recipe_from_dict(raw, source="t.yaml"))["stages"]
        return next(s["quantize"] for s in stages if "quantize" in s)

    # a quantize stage recorded before max_drop existed hashed its section without these keys
    budget_keys = {"max_drop", "holdout_images", "max_float_layers"}
    assert not budget_keys & set(quantize_section({"mode": "ptq"}))
    assert quantize_section({"max_drop": 0.5, "holdout_images": 1000}).items() >= {
        ("max_drop", 0.5),
        ("holdout_images", 1000),
    }


# --- the held-out slice of the training split --------------------------------------------------


def test_the_holdout_is_a_seeded_balanced_slice_of_train_that_training_no_longer_sees():
    bundle = load_dataset(DataConfig(kind="digits", image_size=8, subset=SubsetConfig(train=600)))
    rest, (images, labels) = split_holdout(bundle, 100, seed=0)
    again = split_holdout(bundle, 100, seed=0)[1]
    other = split_holdout(bundle, 100, seed=1)[1]
    assert torch.equal(images, again[0]) and not torch.equal(images, other[0])
    assert images.dtype == torch.uint8 and images.shape == (100, 3, 8, 8)
    assert torch.bincount(labels).tolist() == [10] * 10
    assert len(rest.train) == 500 and rest.test is bundle.test
    train_rows = torch.stack([bundle.train[i][0] for i in range(600)]).flatten(1)
    split_rows = torch.cat(
        [torch.stack([rest.train[i][0] for i in range(500)]).flatten(1), images.flatten(1)]
    )
    assert _multiset(split_rows) == _multiset(train_rows)  # a partition of the train split
    with pytest.raises(DataError, match="holdout_images: 600 would leave no training image"):
        split_holdout(bundle, 600, seed=0)


def test_with_a_named_method_and_no_max_drop_the_stage_holds_nothing_out(tmp_path):
    from compress.pipeline.context import RunContext
    from compress.pipeline.stages.networks import preprocess
    from compress.pipeline.stages.quantize import split_loaders

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(DIGITS_BASE | {"stages": ["teacher", "distill", "quantize"]}))
    ctx = RunContext(load_recipe(path), tmp_path, torch.device("cpu"), show_progress=False)
    prep = preprocess(ctx)
    train, test, holdout = split_loaders(ctx, QuantizeConfig(calibration="percentile"), prep)
    run_train, _ = ctx.loaders()
    assert holdout == [] and len(train.dataset) == len(run_train.dataset) == 600
    assert all(torch.equal(a[0], b[0]) for a, b in zip(train, run_train, strict=True))
    train, _, holdout = split_loaders(ctx, QuantizeConfig(max_drop=0.5, holdout_images=100), prep)
    assert len(train.dataset) == 500 and sum(len(y) for _, y in holdout) == 100
    _, _, chosen_on = split_loaders(ctx, QuantizeConfig(holdout_images=100), prep)  # auto
    assert sum(len(y) for _, y in chosen_on) == 100
    assert holdout[0][0].dtype == torch.float32  # preprocessed as the network takes it


def _multiset(rows: torch.Tensor) -> list:
    unique, counts = torch.unique(rows, dim=0, return_counts=True)
    return sorted(zip(map(tuple, unique.tolist()), counts.tolist(), strict=True))


# --- the search, on a network made hostile to INT8 --------------------------------------------


def hostile_network(layers: tuple[str, ...]) -> tuple[nn.Module, list, list]:
    """A small CNN trained on digits whose convolutions named in ``layers`` get one input
    channel that is always zero (the ReLU before it never fires) and weights of 1000 on it.

    The float network computes exactly what it computed before (those weights multiply zeros),
    but each such layer's per-channel INT8 scale is set by the 1000s and its real weights (|w| <
    1) round to almost nothing: quantized, the network is near chance; with those layers in
    float it is as good as before. Returns ``(network, train batches, held-out batches)``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    with torch.no_grad():  # channel 0 of each ReLU before a hostile layer never fires
        for name in layers:
            model.get_submodule(str(int(name) - 2)).bias[0] = -100.0
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few hundred tiny steps: threads only contend
    try:
        for _ in range(6):
            for start in range(0, 1200, 64):
                x, y = images[start : start + 64], labels[start : start + 64]
                loss = nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        for name in layers:
            model.get_submodule(name).weight[:, 0] = 1000.0
    train = [(images[i : i + 256], labels[i : i + 256]) for i in range(0, 1200, 256)]
    holdout = [(images[1200:1500], labels[1200:1500])]
    return model, train, holdout


@pytest.fixture(scope="module")
def one_hostile():
    return hostile_network(("2",))


def test_the_search_keeps_exactly_the_hostile_layer_float_and_the_file_runs_it_in_float(
    one_hostile, tmp_path
):
    model, train, holdout = one_hostile
    plain = compress.quantize(model, train, calibration="minmax")
    with torch.no_grad():
        x, y = holdout[0]
        assert (plain(x).argmax(1) == y).float().mean() < 0.5  # INT8 ruins it ...
        assert (model(x).argmax(1) == y).float().mean() > 0.75  # ... the float network is fine

    qmodel = compress.quantize(  # the classifier ("8") kept float by the user
        model, train, calibration="minmax", skip=("8",), max_drop=2.0, holdout=holdout
    )
    budget = qmodel.accuracy_budget
    assert budget.ranking_method == "revert-one"
    assert budget.ranking[0][0] == "2" and budget.ranking[0][1] > 10 * abs(budget.ranking[1][1])
    assert "8" not in dict(budget.ranking)  # already float: not a candidate
    assert budget.float_layers == ("2",) and budget.met
    first, last = budget.steps[0], budget.steps[-1]
    assert first.drop > 30 and last.drop <= 2.0 and len(budget.steps) == 2
    assert last.onnxruntime_float_convs == ("2",)  # judged on the file, layer float in ORT
    assert qmodel.quant_spec.skip == ("8", "2")  # the user's list, then the search's
    assert float_convs(qmodel) == ["2"]

    record = compress.export(qmodel, tmp_path / "student.onnx", check_inputs=holdout[0][0][:128])
    assert record["qdq"]["fp32_conv_layers"] == ["2"] and record["qdq"]["qlinear_conv"] == 2
    assert record["qdq"]["skipped_but_quantized_by_onnxruntime"] == 0


def test_a_layer_put_back_in_float_keeps_every_trained_value_and_reloads(one_hostile, tmp_path):
    from compress.nets.weights import load_weights, save_weights
    from compress.quantization.fake_quant import prepare_quantized, with_float_layers

    model, train, _ = one_hostile
    qmodel = compress.quantize(model, train, calibration="minmax")
    with torch.no_grad():
        qmodel.get_submodule("4").weight.mul_(1.5)  # as QAT would have moved it
    qmodel.eval()  # weight scales follow, as after QAT
    floated = with_float_layers(qmodel, model, ("2",), example_inputs=train[0][0][:2])
    assert floated.quant_spec.skip == ("2",) and float_convs(floated) == ["2"]
    values = qmodel.state_dict()
    for name, value in floated.state_dict().items():
        assert torch.equal(value, values[name]), name  # weights, biases, ranges: all kept
    assert set(values) - set(floated.state_dict()) == {"2.weight_scale"}

    def prepare(m):
        return prepare_quantized(
            m, target="onnxruntime-cpu", skip=("2",), example_inputs=train[0][0][:2]
        )

    path = save_weights(floated, tmp_path / "floated.pt")
    reloaded = load_weights(hostile_copy(model), path, prepare=prepare).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(train[0][0]), floated(train[0][0]))


def hostile_copy(model: nn.Module) -> nn.Module:
    """A fresh network of the same shape with other values: everything must come from a file."""
    import copy

    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in fresh.parameters():
            parameter.normal_()
    return fresh


def test_within_budget_nothing_changes_and_nothing_is_ranked(one_hostile):
    model, train, holdout = one_hostile
    plain = compress.quantize(model, train, calibration="minmax")
    kept = compress.keep_float(plain, model, holdout, max_drop=100)
    assert kept is plain and kept.accuracy_budget.float_layers == ()
    assert kept.accuracy_budget.ranking == () and len(kept.accuracy_budget.steps) == 1


def test_two_hostile_layers_both_go_float_and_a_cap_of_one_fails_in_one_line():
    model, train, holdout = hostile_network(("2", "4"))
    qmodel = compress.quantize(model, train, calibration="minmax")
    ptq = {"calibration_data": train, "calibration": "minmax"}  # recalibrated as PTQ was
    kept = compress.keep_float(qmodel, model, holdout, max_drop=2.0, **ptq)
    budget = kept.accuracy_budget
    assert sorted(budget.float_layers) == ["2", "4"] and budget.met
    # putting one back alone changes nothing while the other remains: ranked one at a time
    assert budget.ranking_method == "quantize-one"
    assert sorted(name for name, _ in budget.ranking[:2]) == ["2", "4"]
    with pytest.raises(BudgetNotMet) as caught:
        compress.keep_float(qmodel, model, holdout, max_drop=2.0, max_float_layers=1, **ptq)
    message = str(caught.value)
    assert message.startswith("quantize max_drop 2: the INT8 file still loses ")
    assert "\n" not in message and "with 1 layers in float" in message
    assert len(caught.value.budget.steps) == 2 and not caught.value.budget.met


def test_quantize_without_max_drop_needs_no_holdout_and_max_drop_without_one_is_refused(
    one_hostile,
):
    model, train, _ = one_hostile
    assert not hasattr(compress.quantize(model, train), "accuracy_budget")
    with pytest.raises(ValueError, match="max_drop needs holdout"):
        compress.quantize(model, train, max_drop=0.5)


# --- through the pipeline ----------------------------------------------------------------------


@pytest.mark.slow
def test_the_stage_holds_out_training_images_and_records_the_budget(tmp_path, digits_teacher):
    from compress.pipeline.report import headline
    from compress.pipeline.runner import run

    stages = [
        {"distill": {"loss": "kd", "train": {"epochs": 1, "optimizer": "adamw", "lr": 0.003}}},
        {
            "quantize": {
                "mode": "ptq",
                "calibration_images": 256,
                "max_drop": 100.0,
                "holdout_images": 100,
            }
        },
        {"export": {"check_samples": 64}},
    ]
    raw = DIGITS_BASE | {
        "name": "budget",
        "teacher": DIGITS_BASE["teacher"] | {"checkpoint": digits_teacher},
        "stages": ["teacher", *stages],
    }
    path = tmp_path / "budget.yaml"
    path.write_text(yaml.safe_dump(raw))
    artifacts = run(load_recipe(path, out=str(tmp_path / "out")), show_progress=False)
    metrics = artifacts["quantize"].metrics
    budget = metrics["accuracy_budget"]
    assert metrics["quantization"]["max_drop"] == 100.0
    assert metrics["quantization"]["float_layers"] == [] and budget["met"]
    assert budget["holdout_images"] == 100 and len(budget["steps"]) == 1
    assert metrics["test_samples"] == 200  # the test split is untouched
    assert "max_drop 100: float none" in headline(artifacts["quantize"])
    assert artifacts["export"].metrics["student"]["qdq"]["fp32_conv"] == 0
