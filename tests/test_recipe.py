"""Recipe loading: valid recipes, overrides, and clear one-line errors for everything else."""

import copy
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress.errors import CompressError, RecipeError
from compress.pipeline.config import Recipe
from compress.pipeline.recipe.load import load_recipe, recipe_from_dict
from compress.pipeline.recipe.overrides import parse_subset
from compress.pipeline.recipe.serialise import recipe_to_dict

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def quickstart_dict() -> dict:
    return yaml.safe_load(QUICKSTART.read_text())


def write(tmp_path, raw) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def test_shipped_recipes_validate(tmp_path):
    recipe = load_recipe(QUICKSTART)
    assert [s.name for s in recipe.stages] == [
        "teacher",
        "distill",
        "prune",
        "quantize",
        "export",
        "bench",
    ]
    assert recipe.stages[1].config.loss[0].params.temperature == 4.0
    cifar = load_recipe(ROOT / "recipes" / "resnet18_to_mobile.yaml", data=str(tmp_path))
    assert cifar.data.kind == "cifar10" and cifar.teacher.cifar_stem is True
    assert cifar.teacher.train.weight_decay == pytest.approx(5e-4)
    assert [s.name for s in cifar.stages] == [
        "teacher",
        "distill",
        "prune",
        "quantize",
        "export",
        "bench",
    ]
    assert cifar.stages[2].config.speedup == 2.0 and cifar.stages[3].config.mode == "qat"
    cpu = load_recipe(ROOT / "recipes" / "cifar10_cpu.yaml", data=str(tmp_path))
    assert (cpu.teacher.model, cpu.student.model) == ("cifar:resnet44", "cifar:resnet8")
    assert [s.name for s in cpu.stages] == [
        "teacher",
        "distill",
        "prune",
        "quantize",
        "export",
        "bench",
    ]
    assert cpu.stages[3].config.weight_range == "auto" and cpu.stages[5].config.threads == 1


def test_resolved_recipe_round_trips():
    recipe = load_recipe(QUICKSTART)
    again = recipe_from_dict(recipe_to_dict(recipe))
    assert again == recipe


def test_overrides_by_stage_name_index_and_shorthands(tmp_path):
    recipe = load_recipe(
        QUICKSTART,
        ["stages.distill.loss.temperature=8", "stages.4.opset=17", "data.batch_size=32"],
        epochs=2,
        subset=(300, 100),
        out=str(tmp_path),
    )
    distill = recipe.stages[1].config
    assert distill.loss[0].params.temperature == 8.0 and distill.train.epochs == 2
    assert recipe.teacher.train.epochs == 2
    assert recipe.stages[4].config.opset == 17
    assert (
        recipe.data.batch_size == 32
        and recipe.data.subset.train == 300
        and recipe.data.subset.test == 100
    )
    assert recipe.out == str(tmp_path)


def test_a_partial_training_section_keeps_its_stages_own_defaults():
    """``quantize: {train: {epochs: 2}}`` changes the epochs of QAT's training, not its
    optimiser: falling back to TrainConfig's SGD at 0.05 wrecked the INT8 network."""
    from compress.pipeline.config import PruneConfig, QuantizeConfig

    stages = [
        "teacher",
        "distill",
        {"prune": {"speedup": 1.5, "train": {"epochs": 2}}},
        {"quantize": {"train": {"epochs": 2}}},
        {"quantize": {"name": "again", "train": None}},
    ]
    recipe = recipe_from_dict({"name": "t", "stages": stages}, source="t.yaml")
    prune, qat, unset = (recipe.stages[i].config.train for i in (2, 3, 4))
    assert prune == dataclasses.replace(PruneConfig().train, epochs=2)
    assert qat == dataclasses.replace(QuantizeConfig().train, epochs=2)
    assert (qat.optimizer, qat.lr, qat.weight_decay) == ("adamw", 3e-5, 0.0)
    assert unset == QuantizeConfig().train
    with pytest.raises(RecipeError, match=r"stages\[2\]\.quantize\.train\.lr: expected > 0"):
        recipe_from_dict(
            {"name": "t", "stages": ["teacher", "distill", {"quantize": {"train": {"lr": 0}}}]},
            source="t.yaml",
        )


def test_numbers_in_exponent_form_are_accepted_as_floats(tmp_path):
    raw = quickstart_dict()
    raw["teacher"]["train"]["weight_decay"] = "5e-4"  # how YAML 1.1 reads an unquoted 5e-4
    assert load_recipe(write(tmp_path, raw)).teacher.train.weight_decay == pytest.approx(5e-4)


def mutate(raw: dict, path: str, value) -> dict:
    raw = copy.deepcopy(raw)
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last = int(last) if isinstance(node, list) else last
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return raw


DELETE = object()

BAD = [
    ("nmae", "x", "nmae: unknown field (did you mean 'name'?)"),
    ("teacher.trian", {}, "teacher.trian: unknown field (did you mean 'train'?)"),
    (
        "teacher.train.epochs",
        "ten",
        "teacher.train.epochs: expected an integer, got a string 'ten'",
    ),
    ("data.batch_size", 0, "data.batch_size: expected a positive integer"),
    ("data.kind", "cifar", "data.kind: expected one of digits, cifar10"),
    ("data.path", "/no/such/folder", "data.path: no such file or folder: /no/such/folder"),
    (
        "student.model",
        "torchvision:mobilenet_v9",
        "student.model: unknown model 'torchvision:mobilenet_v9' (did you mean "
        "'torchvision:mobilenet_v2'",
    ),
    ("teacher.checkpoint", "/no/such.pt", "teacher.checkpoint: no such file: /no/such.pt"),
    ("stages.1", {"distil": {}}, "stages[1]: unknown stage 'distil' (did you mean 'distill'?)"),
    (
        "stages.1",
        {"distill": {"loss": {"name": "kd", "temprature": 2}}},
        "stages[1].distill.loss.temprature: unknown field (did you mean 'temperature'?)",
    ),
    (
        "stages.1",
        {"distill": {"loss": "hinton"}},
        "stages[1].distill.loss.name: unknown loss 'hinton'",
    ),
    ("stages.1", {"distill": {"train": {"lr": -1}}}, "stages[1].distill.train.lr: expected > 0"),
    ("stages.2", "distill", "stages[2].distill: the name 'distill' appears twice"),
    ("stages", [], "stages: expected a non-empty list"),
    ("stages", ["distill"], "stages[0].distill: needs a 'teacher' stage before it"),
    ("name", "../escape", "name: expected letters, digits"),
    ("name", DELETE, "name: missing"),
    ("seed", True, "seed: expected an integer, got a boolean"),
    ("device", "tpu", "device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    (
        "teacher.train.epochs",
        0,
        "teacher: give a checkpoint to load, weights to start from, or train.epochs >= 1",
    ),
]


@pytest.mark.parametrize("path,value,message", BAD, ids=[b[0] + "=" + str(b[1])[:20] for b in BAD])
def test_bad_recipes_name_the_field(tmp_path, path, value, message):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, mutate(quickstart_dict(), path, value)))
    text = str(info.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(
    "text,message",
    [
        ("name: [unclosed\n", "not valid YAML at line"),
        ("- just\n- a list\n", "expected a mapping"),
        ("", "expected a mapping"),
    ],
)
def test_bad_yaml_files(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, text))


def test_yaml_with_python_tags_is_refused(tmp_path):
    path = write(
        tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\nstages: [teacher]\n"
    )
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


@pytest.mark.parametrize("item", ["nokey", "=3", "stages.nope.x=1", "stages.9.x=1"])
def test_bad_set_overrides(item):
    with pytest.raises(RecipeError, match="--set"):
        load_recipe(QUICKSTART, [item])


def test_parse_subset():
    assert parse_subset("1000") == (1000, 250)
    assert parse_subset("200,50") == (200, 50)
    for bad in ("x", "0", "1,2,3", "-5"):
        with pytest.raises(RecipeError, match="--subset"):
            parse_subset(bad)


@pytest.mark.slow
def test_cli_validate_exit_codes(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "compress", "validate", str(QUICKSTART)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "name: quickstart" in ok.stdout
    bad = write(tmp_path, mutate(quickstart_dict(), "teacher.train.epochs", "ten"))
    result = subprocess.run(
        [sys.executable, "-m", "compress", "validate", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "error: teacher.train.epochs: expected an integer, got a string 'ten'"
    )
    missing = subprocess.run(
        [sys.executable, "-m", "compress", "validate", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
    )
    assert (
        missing.returncode == 2
        and "Traceback" not in missing.stderr
        and "recipe file not found" in missing.stderr
    )


# Garbage of every shape, dropped anywhere into a valid recipe: the loader either accepts it or
# raises a one-line CompressError. Any other exception is a bug.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=12),
)
garbage = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def leaf_paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaf_paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from leaf_paths(value, prefix + (index,))


PATHS = list(leaf_paths(quickstart_dict()))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PATHS), garbage)
def test_garbage_never_escapes_as_a_traceback(path, value):
    raw = quickstart_dict()
    if path:
        node = raw
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    else:
        raw = value
    try:
        recipe = recipe_from_dict(raw)
    except CompressError as exc:
        assert "\n" not in str(exc) and str(exc)
    else:
        assert isinstance(recipe, Recipe)


@settings(max_examples=100, deadline=None)
@given(garbage)
def test_garbage_whole_recipes(value):
    try:
        recipe_from_dict(value)
    except CompressError as exc:
        assert "\n" not in str(exc)


# ---------------------------------------------------------------------------- distillation recipes

MULTI = """
name: multi
data: {kind: digits}
teacher: {model: torchvision:resnet18, train: {epochs: 1}}
student: {model: cifar:resnet20}
stages:
  - teacher
  - distill:
      name: assistant
      student: {model: cifar:resnet32}
      loss:
        - {name: kd, temperature: 4, alpha: 0.9}
        - {name: fitnet, weight: 50, pairs: [{teacher: layer3, student: layer3}]}
  - distill:
      teacher: assistant
      init_from_teacher: true
      augment: {mixup_alpha: 0.2, cutout: 8}
      loss: [ce, {name: at, pairs: [{teacher: layer2, student: layer2}, \
{teacher: layer3, student: layer3}]}]
  - export
"""


def test_multi_stage_recipe_with_loss_lists(tmp_path):
    recipe = load_recipe(write(tmp_path, MULTI))
    assert [(s.kind, s.name) for s in recipe.stages] == [
        ("teacher", "teacher"),
        ("distill", "assistant"),
        ("distill", "distill"),
        ("export", "export"),
    ]
    assistant, student = recipe.stages[1].config, recipe.stages[2].config
    assert [t.name for t in assistant.loss] == ["kd", "fitnet"] and assistant.loss[1].weight == 50.0
    assert (
        assistant.loss[1].params.pairs[0].teacher == "layer3"
        and assistant.student.model == "cifar:resnet32"
    )
    assert (
        student.teacher == "assistant"
        and student.init_from_teacher
        and student.augment.mixup_alpha == 0.2
    )
    assert [t.name for t in student.loss] == ["ce", "at"] and len(student.loss[1].params.pairs) == 2
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe
    overridden = load_recipe(write(tmp_path, MULTI), ["stages.assistant.train.epochs=3"])
    assert overridden.stages[1].config.train.epochs == 3


@pytest.mark.parametrize(
    "old,new,message",
    [
        (
            "weight: 50, pairs: [{teacher: layer3, student: layer3}]",
            "weight: 50, pairs: [{teacher: layer3, student: layer9}]",
            "stages[1].assistant.loss[1].pairs[0].student: no layer 'layer9' in cifar:resnet32 "
            "(did you mean 'layer3'?)",
        ),
        (
            "weight: 50, pairs: [{teacher: layer3,",
            "weight: 50, pairs: [{teacher: layer7,",
            "pairs[0].teacher: no layer 'layer7' in torchvision:resnet18",
        ),
        (
            "teacher: assistant",
            "teacher: asistant",
            "stages[2].distill.teacher: expected an earlier stage that trains a network (teacher, "
            "assistant), got 'asistant'",
        ),
        ("name: assistant", "name: distill", "the name 'distill' appears twice"),
        ("weight: 50", "weight: -1", "stages[1].assistant.loss[1].weight: expected >= 0"),
        (
            "mixup_alpha: 0.2",
            "mixup_alpa: 0.2",
            "augment.mixup_alpa: unknown field (did you mean 'mixup_alpha'?)",
        ),
        (
            "pairs: [{teacher: layer3, student: layer3}]",
            "pairs: layer3",
            "loss[1].pairs: expected a list of a mapping",
        ),
    ],
)
def test_bad_distillation_recipes(tmp_path, old, new, message):
    assert old in MULTI
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, MULTI.replace(old, new, 1)))
    assert message in str(info.value)


def test_label_smoothing_warns_for_the_teacher_and_is_refused_for_distill(tmp_path):
    from compress.pipeline.recipe.checks import recipe_warnings

    recipe = load_recipe(QUICKSTART, ["teacher.train.label_smoothing=0.1"])
    assert (
        "label smoothing" in recipe_warnings(recipe)[0] and "Muller" in recipe_warnings(recipe)[0]
    )
    assert recipe_warnings(load_recipe(QUICKSTART)) == []
    with pytest.raises(
        RecipeError, match="train.label_smoothing: applies to teacher training only"
    ):
        load_recipe(QUICKSTART, ["stages.distill.train.label_smoothing=0.1"])
