"""The recipe's JSON Schema: generated from the config dataclasses, published as
``recipe.schema.json``, satisfied by every shipped recipe and by every resolved recipe a run
writes, and strict enough that an editor flags what ``compress validate`` rejects."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import run_cli

from compress.errors import RecipeError
from compress.pipeline.recipe.load import recipe_from_dict
from compress.pipeline.recipe.schema import field_docs, recipe_schema
from compress.pipeline.recipe.serialise import recipe_to_dict

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = recipe_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_published_schema_file_is_what_compress_schema_prints():
    printed = run_cli("schema")
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout) == recipe_schema()
    assert json.loads((ROOT / "recipe.schema.json").read_text()) == recipe_schema(), (
        "recipe.schema.json is stale: compress schema > recipe.schema.json"
    )


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_and_its_resolved_form_satisfy_the_schema(path, validator):
    raw = yaml.safe_load(path.read_text())
    assert not [e.message for e in validator.iter_errors(raw)]
    given = copy.deepcopy(raw)
    given["data"]["path"] = given["data"].get("path") or "data/"  # as --data gives it
    resolved = recipe_to_dict(recipe_from_dict(given))  # every field, at its value or default
    assert not [e.message for e in validator.iter_errors(resolved)]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("stages", 1, "distill", "train", "optimizer"), "adam"),  # a choice
        (("stages", 2, "prune", "criterion"), "l1"),  # a registry-backed choice
        (("stages", 1, "distill", "loss", 0, "temperature"), "hot"),  # a loss parameter's type
        (("stages", 1, "distill", "loss", 0, "tempreature"), 4),  # a misspelt loss parameter
        (("data", "image_sise"), 32),  # a misspelt field
        (("stages", 3, "quantize", "mode"), "int4"),
    ],
)
def test_what_the_recipe_reader_rejects_the_schema_rejects_too(path, value, validator):
    raw = {
        "name": "schema",
        "data": {"kind": "digits"},
        "stages": [
            "teacher",
            {"distill": {"loss": [{"name": "kd", "temperature": 4}], "train": {}}},
            {"prune": {"criterion": "magnitude"}},
            {"quantize": {"mode": "ptq"}},
        ],
    }
    assert not list(validator.iter_errors(raw))
    recipe_from_dict(copy.deepcopy(raw))
    *parents, last = path
    node = raw
    for key in parents:
        node = node[key]
    node[last] = value
    assert list(validator.iter_errors(raw))
    with pytest.raises(RecipeError):
        recipe_from_dict(raw)


def test_fields_are_described_by_the_comment_beside_them():
    from compress.benchmark.spec import BenchConfig
    from compress.pipeline.config import PruneConfig

    assert field_docs(BenchConfig)["threads"] == "0: the backend's default"
    docs = field_docs(PruneConfig)  # its own fields and those of PruneSpec
    assert "multiple of this" in docs["round_to"] and "re-estimate" in docs["recalibration_images"]
    described = recipe_schema()["properties"]["data"]["properties"]["unlabeled"]
    assert described["description"]


def test_the_recipe_reference_page_is_what_compress_schema_markdown_prints():
    from compress.pipeline.recipe.reference import recipe_reference

    page = (ROOT / "docs" / "recipe-reference.md").read_text()
    assert page == recipe_reference(), (
        "docs/recipe-reference.md is stale: compress schema --markdown > docs/recipe-reference.md"
    )
    for field in ("max_drop", "latency_speedup", "mixup_alpha", "cache_teacher_logits"):
        assert f"| `{field}` |" in page  # every section's fields, nested ones included


def test_the_recipe_shape_in_the_guide_is_a_valid_recipe(validator):
    guide = (ROOT / "docs" / "recipes.md").read_text()
    block = guide.split("```yaml\n", 1)[1].split("```", 1)[0]
    raw = yaml.safe_load(block)
    assert raw["stages"] and not [e.message for e in validator.iter_errors(raw)]
    recipe_from_dict(raw)  # what `compress validate` runs: raises on anything it rejects
