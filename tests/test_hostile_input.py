"""Hostile and broken input: planted pickles, code-executing YAML, escaping names, corrupt
checkpoints, ONNX files and images, fuzzed recipes. Every one ends in a one-line error (exit code
2, no traceback unless --debug) and nothing a file asks for is ever executed."""

from __future__ import annotations

import dataclasses
import io
import pickle
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import assert_one_line_error, bench_result_json
from conftest import run_cli as compress
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from PIL import Image
from torch.utils.data import Subset

from compress.cli import cli
from compress.data.containers import ImageFileDataset
from compress.data.load import check_image_files, load_dataset
from compress.data.loaders import make_loaders
from compress.data.spec import DataConfig, MixConfig, SubsetConfig, UnlabeledConfig
from compress.errors import DataError, ModelError, RecipeError, StageError
from compress.nets.models import build_model
from compress.pipeline.config import STAGE_KINDS, GatesConfig, Recipe, TeacherConfig
from compress.pipeline.recipe.load import load_recipe
from compress.pipeline.runner import prepare_run_dir
from compress.training.spec import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
DIGITS = {
    "kind": "digits",
    "image_size": 8,
    "batch_size": 32,
    "augment": False,
    "subset": {"train": 60, "test": 20},
}


def invoke(*args) -> tuple[int, str]:
    """The CLI in-process: (exit code, stderr); anything but a clean exit is re-raised."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stderr


def teacher_recipe(
    folder: Path,
    checkpoint: Path | None = None,
    data: dict | None = None,
    model: str = "cifar:resnet20",
) -> Path:
    teacher = {"model": model, "train": {"epochs": 1}}
    if checkpoint is not None:
        teacher["checkpoint"] = str(checkpoint)
    raw = {
        "name": "hostile",
        "data": data or DIGITS,
        "teacher": teacher,
        "stages": ["teacher"],
        "out": str(folder / "out"),
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# --- planted pickles -----------------------------------------------------------------------------


class Planted:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_the_planted_payload_is_live(tmp_path):
    """The guard below is only worth something if the payload runs when loaded unsafely."""
    marker = tmp_path / "ran"
    torch.save(Planted(marker), tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.slow
def test_malicious_teacher_checkpoint_is_refused_by_the_cli(tmp_path):
    marker = tmp_path / "PWNED"
    checkpoint = tmp_path / "teacher.pt"
    torch.save({"fc.weight": Planted(marker)}, checkpoint)
    result = compress("run", teacher_recipe(tmp_path, checkpoint))
    assert result.returncode == 2
    assert_one_line_error(
        result.stderr, f"checkpoint {checkpoint} was refused: it would import exec"
    )
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_malicious_checkpoint_in_either_torch_format_never_runs(tmp_path, legacy):
    marker = tmp_path / "PWNED"
    checkpoint = tmp_path / "teacher.pt"
    torch.save(Planted(marker), checkpoint, _use_new_zipfile_serialization=not legacy)
    code, stderr = invoke("run", teacher_recipe(tmp_path, checkpoint))
    assert code == 2 and "was refused" in assert_one_line_error(stderr)
    assert not marker.exists()


def _cifar_batch(n: int) -> dict:
    return {b"data": np.zeros((n, 3072), np.uint8), b"labels": [k % 10 for k in range(n)]}


def test_malicious_cifar_batch_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        (folder / name).write_bytes(pickle.dumps(_cifar_batch(4), protocol=2))
    (folder / "batches.meta").write_bytes(
        pickle.dumps({b"label_names": [f"c{k}".encode() for k in range(10)]})
    )
    marker = tmp_path / "PWNED"
    batch = _cifar_batch(4) | {b"labels": Planted(marker)}
    (folder / "data_batch_1").write_bytes(pickle.dumps(batch))
    with pytest.raises(
        DataError,
        match=re.escape(
            f"{folder / 'data_batch_1'}: refused: unpickling it would import builtins.exec"
        ),
    ):
        load_dataset(DataConfig(kind="cifar10", path=str(folder)))
    assert not marker.exists()
    (folder / "data_batch_1").write_bytes(
        pickle.dumps(_cifar_batch(4), protocol=5)
    )  # numpy 2's buffer form is allowed
    assert len(load_dataset(DataConfig(kind="cifar10", path=str(folder))).train) == 20


# --- broken checkpoints --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("ckpt") / "resnet20.pt"
    torch.save(build_model("cifar:resnet20", 10).state_dict(), path)
    return path.read_bytes()


def _truncated(fraction: float):
    return lambda real: real[: int(len(real) * fraction)]


BROKEN_CHECKPOINTS = {
    "empty": (lambda real: b"", "is not a PyTorch checkpoint: the file is empty"),
    "random-bytes": (
        lambda real: np.random.default_rng(0).bytes(4096),
        "is not a PyTorch checkpoint, or is truncated or corrupt",
    ),
    "cut-at-16-bytes": (
        lambda real: real[:16],
        "is not a PyTorch checkpoint, or is truncated or corrupt",
    ),
    "cut-at-1-percent": (_truncated(0.01), "truncated or corrupt"),
    "cut-at-half": (_truncated(0.5), "truncated or corrupt"),
    "cut-10-bytes-short": (lambda real: real[:-10], "truncated or corrupt"),
    "plain-pickle": (
        lambda real: pickle.dumps({"fc.weight": [1.0, 2.0]}),
        "is not a PyTorch checkpoint",
    ),
}


@pytest.mark.parametrize("case", BROKEN_CHECKPOINTS)
def test_broken_teacher_checkpoint_is_one_clear_line(tmp_path, real_checkpoint, case):
    make, message = BROKEN_CHECKPOINTS[case]
    checkpoint = tmp_path / "teacher.pt"
    checkpoint.write_bytes(make(real_checkpoint))
    code, stderr = invoke("run", teacher_recipe(tmp_path, checkpoint))
    assert code == 2
    line = assert_one_line_error(stderr, f"checkpoint {checkpoint} ", message)
    assert (
        "internal miniz error" not in line
    )  # torch's advice paragraph is cut to its first sentence


def test_checkpoint_of_another_architecture_names_the_mismatch(tmp_path):
    checkpoint = tmp_path / "resnet32.pt"
    torch.save(build_model("cifar:resnet32", 10).state_dict(), checkpoint)
    code, stderr = invoke("run", teacher_recipe(tmp_path, checkpoint))
    assert code == 2
    assert_one_line_error(
        stderr,
        f"checkpoint {checkpoint} does not fit cifar:resnet20",
        "unexpected keys layer1.3.conv1.weight",
    )


@pytest.mark.parametrize("model", ["cifar:resnet20", "torchvision:mobilenet_v2"])
def test_teacher_checkpoint_with_other_classes_than_the_data(tmp_path, model):
    checkpoint = tmp_path / "cifar100.pt"
    torch.save(build_model(model, 100, cifar_stem=True).state_dict(), checkpoint)
    code, stderr = invoke("run", teacher_recipe(tmp_path, checkpoint, model=model))
    assert code == 2
    assert_one_line_error(
        stderr, f"teacher checkpoint {checkpoint} has 100 classes, the data has 10 (digits)"
    )


# --- code-executing YAML -------------------------------------------------------------------------


def _tags(marker: Path) -> dict[str, str]:
    code = f"open({str(marker)!r}, 'w').close()"
    return {
        "apply": f"name: !!python/object/apply:builtins.exec [{code!r}]\n",
        "new": f"name: !!python/object/new:builtins.exec [{code!r}]\n",
        "name": "name: !!python/name:os.system\n",
        "module": "name: !!python/module:os\n",
        "custom-tag": "name: !import_call {key: os.system, init: {args: [touch marker]}}\n",
    }


def test_the_yaml_payload_is_live(tmp_path):
    marker = tmp_path / "ran"
    yaml.unsafe_load(_tags(marker)["apply"])
    assert marker.exists()


@pytest.mark.parametrize("tag", list(_tags(Path("m"))))
def test_yaml_tags_never_execute(tmp_path, tag):
    marker = tmp_path / "PWNED"
    path = tmp_path / "recipe.yaml"
    path.write_text(_tags(marker)[tag] + "stages: [teacher]\n")
    with pytest.raises(RecipeError, match=re.escape(f"{path}: not valid YAML")):
        load_recipe(path)
    assert not marker.exists()


# --- names and paths that would escape the output folder -----------------------------------------

BAD_RUN_NAMES = [
    "../escape",
    "..",
    ".",
    "/abs/path",
    "a/b",
    "a\\b",
    "",
    "   ",
    "a\0b",
    "run\n",
    "\nrun",
    ".hidden",
    "-rf",
    "ünïcode",
    "a" * 101,
]


@pytest.mark.parametrize("name", BAD_RUN_NAMES, ids=[repr(n)[:16] for n in BAD_RUN_NAMES])
def test_run_names_that_are_not_one_plain_folder_are_refused(tmp_path, name):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": name, "data": DIGITS, "stages": ["teacher"]}))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).startswith("name: expected letters, digits") and "\n" not in str(
        info.value
    )


BAD_STAGE_NAMES = [
    "../x",
    "a/b",
    "..",
    "",
    "recipe.yaml",
    "student.onnx",
    "x\n",
    ".git",
    5,
    None,
    ["a"],
]


@pytest.mark.parametrize("name", BAD_STAGE_NAMES, ids=[repr(n)[:16] for n in BAD_STAGE_NAMES])
def test_stage_names_that_are_not_one_plain_folder_are_refused(tmp_path, name):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": "ok", "data": DIGITS, "stages": ["teacher", {"export": {"name": name}}]}
        )
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).startswith(
        "stages[1].export.name: expected letters, digits, '_' or '-'"
    ) and "\n" not in str(info.value)


@pytest.mark.parametrize("field", ["out", "data.path", "teacher.checkpoint", "gates.baseline"])
@pytest.mark.parametrize(
    "value", ["", "  ", "dir\0name", "x" * 5000], ids=["empty", "blank", "nul", "too-long"]
)
def test_unusable_paths_are_recipe_errors(tmp_path, field, value):
    raw = {
        "name": "ok",
        "data": {"kind": "npz", "path": str(tmp_path)},
        "stages": ["teacher", "export", "bench"],
    }
    section, _, key = field.rpartition(".")
    (raw.setdefault(section, {}) if section else raw)[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    if field == "out" and value == "x" * 5000:
        assert load_recipe(path).out == value  # legal until a run creates it: then a StageError
        return
    with pytest.raises(RecipeError, match=rf"^{re.escape(field)}: ") as info:
        load_recipe(path)
    assert "\n" not in str(info.value)


def test_run_and_stage_folders_linked_outside_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    recipe = Recipe(name="run", out=str(out), stages=load_recipe(QUICKSTART).stages)
    (out / "run").symlink_to(outside, target_is_directory=True)
    with pytest.raises(RecipeError, match="name: 'run' would write outside the output folder"):
        prepare_run_dir(recipe)
    (out / "run").unlink()
    (out / "run").mkdir()
    (out / "run" / "distill").symlink_to(outside, target_is_directory=True)
    with pytest.raises(
        StageError,
        match=re.escape(
            f"{out / 'run' / 'distill'} links to {outside.resolve()}, outside the run folder"
        ),
    ):
        prepare_run_dir(recipe)
    assert not any(outside.iterdir())


# --- fuzzed recipes ------------------------------------------------------------------------------


def _quickstart() -> dict:
    return yaml.safe_load(QUICKSTART.read_text())


def _fuzz_base() -> dict:
    """The quickstart with every path-like field present, so that fuzzing reaches them too."""
    raw = _quickstart()
    raw["out"] = "exported"
    raw["data"]["unlabeled"] = {"path": None, "limit": None}
    raw["teacher"]["checkpoint"] = None
    raw["gates"] = {"baseline": None, "max_accuracy_drop": 0.5}
    return raw


# Real field names as well as random text, so an added key is sometimes a known one in a new place.
_CLASSES = (
    Recipe,
    DataConfig,
    SubsetConfig,
    UnlabeledConfig,
    TrainConfig,
    TeacherConfig,
    GatesConfig,
    MixConfig,
)
FIELD_NAMES = sorted(
    {
        f.name
        for cls in _CLASSES + tuple(kind.config for kind in STAGE_KINDS.values())
        for f in dataclasses.fields(cls)
    }
)


def _nodes(node, prefix=()):
    """Every (path, container) in the recipe: where a key can be dropped, replaced or added."""
    yield prefix, node
    children = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, value in children:
        yield from _nodes(value, prefix + (key,))


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12) | st.sampled_from(
    ["\n", "a\r\nb", "\t", "\x00", "\u202e", ""]
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    _text,
    st.sampled_from(
        ["", " ", "../..", "/etc/passwd", "a\0b", "ünï", "cpu", "kd", "teacher", "5e-4"]
    ),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**40]),
    st.floats(allow_nan=True, allow_infinity=True),
)
_garbage = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_text, inner, max_size=3)),
    max_leaves=6,
)
PLACES = [path for path, _ in _nodes(_fuzz_base())]


@st.composite
def mutated_recipes(draw) -> dict:
    """The quickstart with 1-3 edits: a key dropped, a value replaced by garbage, an unknown key
    added, or a key renamed by a typo."""
    raw = _fuzz_base()
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PLACES))
        parent, node = None, raw
        try:
            for key in path:
                parent, node = node, node[key]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed or replaced this place
        op = draw(st.sampled_from(["drop", "replace", "add", "rename"]))
        if op == "replace" or not path and op == "drop":
            if path:
                parent[path[-1]] = draw(_garbage)
            else:
                raw = draw(_garbage)
        elif op == "drop":
            del parent[path[-1]]
        elif op == "add" and isinstance(node, dict):
            node[draw(st.one_of(_text, st.sampled_from(FIELD_NAMES)))] = draw(_garbage)
        elif op == "rename" and isinstance(parent, dict):
            key = path[-1]
            parent[draw(st.sampled_from([key[:-1], key + "s", key.upper(), key + " "]))] = (
                parent.pop(key)
            )
    return raw


@settings(
    max_examples=200,
    deadline=10_000,  # ms per example: a hang (an alias bomb, a runaway loop) fails, not stalls CI
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutated_recipes())
def test_fuzzed_recipes_load_or_raise_one_line_recipe_error(tmp_path, raw):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    try:
        recipe = load_recipe(path)
    except RecipeError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    out = Path(recipe.out).resolve()
    run_dir = (out / recipe.name).resolve()
    assert run_dir.parent == out
    assert all((run_dir / stage.name).resolve().parent == run_dir for stage in recipe.stages)


def test_fp16_conversion_of_a_file_declaring_a_huge_input_is_one_line(tmp_path):
    """A file whose input is declared 3x100000x100000: its check inputs would be 112 GiB, so the
    conversion is refused by name instead of a numpy allocation traceback (issue 28)."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2, 3, 1, 1], np.ones(6, np.float32))
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "w"], ["c"]),
            helper.make_node("GlobalAveragePool", ["c"], ["p"]),
            helper.make_node("Flatten", ["p"], ["logits"]),
        ],
        "huge",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 100000, 100000])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [weight],
    )
    source = tmp_path / "huge.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), source)
    result = compress("export", source, "--format", "onnx-fp16")
    assert result.returncode == 2
    assert_one_line_error(
        result.stderr,
        "huge.onnx: its input [1, 3, 100000, 100000]",
        "compress checks inputs up to 1 GiB",
    )
    assert not (tmp_path / "huge.fp16.onnx").exists()


@st.composite
def mutated_json(draw, base) -> object:
    """``base`` (a JSON document) with 1-3 edits: a key dropped or a value replaced by garbage."""
    import copy

    raw = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from([path for path, _ in _nodes(raw)]))
        if not path:
            raw = draw(_garbage)
            continue
        parent = raw
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(_garbage)
    return raw


def _stage_record_json() -> dict:
    """A real stage record (a quantized network, metrics, a file) as record_stage writes it."""
    import json
    import tempfile

    from compress.core.fileio import write_bytes_atomic
    from compress.core.records import NetworkSpec, QuantSpec
    from compress.pipeline.artifacts import Artifact, record_stage

    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder)
        (run_dir / "quantize").mkdir()
        weights = write_bytes_atomic(run_dir / "quantize" / "model.pt", b"weights")
        network = NetworkSpec("cifar:resnet8", 10, True, QuantSpec("onnxruntime-cpu", ("fc",)))
        artifact = Artifact(
            "quantize",
            kind="quantize",
            files={"model": weights},
            key="k",
            role="student",
            network=network,
            metrics={"top1": 80.5, "params": 1000, "macs": 5000, "history": [{"epoch": 1}]},
        )
        record_stage(run_dir / "quantize", run_dir, artifact, {"mode": "ptq"}, {"name": "r"})
        return json.loads((run_dir / "quantize" / "stage.json").read_text())


JSON_FUZZ = settings(
    max_examples=150,
    deadline=5_000,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@JSON_FUZZ
@given(mutated_json(_stage_record_json()))
def test_fuzzed_stage_records_read_or_raise_one_model_error(tmp_path, raw):
    """Every field a stage record holds, dropped or replaced by any JSON value: the reader and
    the report either accept it or name the file in one line, never a traceback (issue 28)."""
    import json

    from compress.core.records import StageRecord
    from compress.errors import CompressError
    from compress.pipeline.report import build_report

    (tmp_path / "quantize").mkdir(exist_ok=True)
    (tmp_path / "quantize" / "model.pt").write_bytes(b"weights")
    (tmp_path / "quantize" / "stage.json").write_text(json.dumps(raw))
    try:
        record = StageRecord.read(tmp_path / "quantize")
    except ModelError as exc:
        assert "stage.json" in str(exc) and "\n" not in str(exc)
    else:
        assert record.stage is not None
    try:
        build_report(tmp_path)
    except CompressError as exc:
        assert "\n" not in str(exc)


@JSON_FUZZ
@given(mutated_json(bench_result_json()))
def test_fuzzed_bench_results_read_or_raise_one_data_error(tmp_path, raw):
    """The same for a bench.json, read as ``compress check`` reads a result and a baseline."""
    import json

    from compress.benchmark.rows import BenchResult
    from compress.pipeline.gates import check

    path = tmp_path / "bench.json"
    path.write_text(json.dumps(raw))
    try:
        result = BenchResult.read(path)
    except DataError as exc:
        assert "bench.json" in str(exc) and "\n" not in str(exc)
        return
    check(result, BenchResult.read(path), GatesConfig())


_DESCRS = st.sampled_from(["|u1", "<f4", "<i8", "|O", ">u2", "<U3", "|b1", "<c8", "|V4"])


@JSON_FUZZ  # the same budget: 150 examples, 5 s each
@given(
    st.lists(st.integers(0, 10**12), max_size=5),
    _DESCRS,
    st.binary(max_size=600),
    st.lists(st.integers(-(2**40), 2**40), max_size=6),
)
def test_fuzzed_npz_headers_are_loaded_or_refused_before_allocation(
    tmp_path, shape, descr, data, labels
):
    """Any declared shape and dtype over any few bytes: a DataError naming the file, never an
    allocation of what the header declares or a traceback (issue 28)."""
    import zipfile

    from compress.data.npz import load_npz

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": descr, "fortran_order": False, "shape": tuple(shape)}
    )
    label_bytes = io.BytesIO()
    np.save(label_bytes, np.asarray(labels, dtype=np.int64))
    for split in ("train", "test"):
        with zipfile.ZipFile(tmp_path / f"{split}.npz", "w") as archive:
            archive.writestr("x.npy", header.getvalue() + data)
            archive.writestr("y.npy", label_bytes.getvalue())
    try:
        load_npz(DataConfig(kind="npz", path=str(tmp_path), image_size=8))
    except DataError as exc:
        assert "\n" not in str(exc)


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "name: x\nseed: " + "9" * 5000 + "\n",
            "a value cannot be read (Exceeds the limit (4300 digits)",
        ),
        ("name: " + "[" * 5000 + "]" * 5000 + "\n", "it is nested too deeply"),
        (
            "name: x\nseed: 4294967296\nstages: [teacher]\n",
            "seed: expected 0..4294967295, got 4294967296",
        ),
        ("name: x\nseed: -1\nstages: [teacher]\n", "seed: expected 0..4294967295, got -1"),
        ('name: x\ndata: {"\\n": 1}\n', "data.'\\n': unknown field"),
        (b"\xff\xfe\x00garbage", "not a text file"),
    ],
    ids=["huge-int", "deep-nesting", "seed-too-big", "negative-seed", "newline-key", "binary"],
)
def test_pathological_yaml(tmp_path, text, message):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    "text,message",
    [
        (
            "name: !!python/object/apply:os.system ['touch {marker}']\nstages: [teacher]\n",
            "not valid YAML",
        ),
        ("name: ../../etc\nstages: [teacher]\n", "name: expected letters, digits"),
    ],
    ids=["python-tag", "escaping-name"],
)
def test_cli_validate_refuses_hostile_recipes(tmp_path, text, message):
    marker = tmp_path / "PWNED"
    path = tmp_path / "recipe.yaml"
    path.write_text(text.format(marker=marker))
    result = compress("validate", path)
    assert result.returncode == 2 and result.stdout == ""
    assert_one_line_error(result.stderr, message)
    assert not marker.exists()


@pytest.mark.slow
def test_cli_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("name: ../../etc\nstages: [teacher]\n")
    result = compress("validate", path, "--debug")
    assert result.returncode == 2
    assert (
        "Traceback (most recent call last)" in result.stderr
        and "compress.errors.RecipeError: name:" in result.stderr
    )
    assert (
        result.stderr.strip().splitlines()[-1].startswith("error: name: expected letters, digits")
    )


# --- bad images in an ImageFolder ----------------------------------------------------------------


def _png(path: Path, color=(10, 20, 30), size=(12, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _jpeg_bytes(size: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (size, size), np.random.default_rng(0).bytes(size * size * 3)).save(
        buffer, "JPEG"
    )
    return buffer.getvalue()


def _tree(root: Path, per_class: int = 3) -> Path:
    for split, count in (("train", per_class), ("val", 1)):
        for k, name in enumerate(("ant", "bee")):
            for i in range(count):
                _png(root / split / name / f"{i}.png", (120 * k, 40 * i, 7))
    return root


def test_bad_image_files_fail_at_load_naming_the_first_and_the_count(tmp_path):
    root = _tree(tmp_path / "imgs")
    (root / "train" / "ant" / "a_empty.png").write_bytes(b"")
    (root / "train" / "bee" / "text.jpg").write_text("just some text")
    (root / "val" / "ant" / "cut.jpg").write_bytes(_jpeg_bytes()[:300])  # cut inside the header
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(kind="imagefolder", path=str(root), image_size=8))
    first = root / "train" / "ant" / "a_empty.png"
    assert (
        str(info.value)
        == f"3 of 11 image files cannot be read (first: {first}: empty file); fix or remove them"
    )


def test_files_that_are_not_images_by_name_are_ignored(tmp_path):
    root = _tree(tmp_path / "imgs")
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    (root / "train" / "ant" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "train" / "bee" / "._0.png").write_bytes(
        b"\x00\x05\x16\x07 AppleDouble"
    )  # macOS metadata beside a copy
    _png(root / "train" / ".ipynb_checkpoints" / "0.png")  # not a class
    bundle = load_dataset(DataConfig(kind="imagefolder", path=str(root), image_size=8))
    assert bundle.classes == ("ant", "bee") and len(bundle.train) == 6


def test_only_the_files_a_split_uses_are_checked(tmp_path):
    _png(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"")
    files = ImageFileDataset(
        [str(tmp_path / "good.png"), str(tmp_path / "bad.png")], label=0, image_size=8
    )
    check_image_files(Subset(files, [0]))  # a subset without the bad file (e.g. --subset) is fine
    with pytest.raises(
        DataError,
        match=re.escape(
            f"1 of 2 image files cannot be read (first: {tmp_path / 'bad.png'}: empty file)"
        ),
    ):
        check_image_files(files)


def _tree_with_truncated_body(root: Path) -> Path:
    _tree(root)
    jpeg = _jpeg_bytes()
    bad = root / "train" / "ant" / "truncated.jpg"
    bad.write_bytes(jpeg[: int(len(jpeg) * 0.7)])  # the header is whole: only decoding finds it
    return bad


def test_truncated_image_in_a_worker_is_one_line_naming_it(tmp_path):
    bad = _tree_with_truncated_body(tmp_path / "imgs")
    cfg = DataConfig(
        kind="imagefolder", path=str(tmp_path / "imgs"), image_size=8, batch_size=16, workers=1
    )
    train, _ = make_loaders(load_dataset(cfg), cfg, seed=0)
    with pytest.raises(DataError) as info:
        next(iter(train))
    assert str(info.value).startswith(
        f"cannot decode image {bad}: image file is truncated"
    ) and "\n" not in str(info.value)
    assert any("Original Traceback" in note for note in info.value.__notes__)  # what --debug shows


@pytest.mark.slow
def test_truncated_image_mid_epoch_is_one_line_through_the_cli(tmp_path):
    bad = _tree_with_truncated_body(tmp_path / "imgs")
    data = {
        "kind": "imagefolder",
        "path": str(tmp_path / "imgs"),
        "image_size": 8,
        "batch_size": 4,
        "workers": 1,
    }
    result = compress("run", teacher_recipe(tmp_path, data=data))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, f"cannot decode image {bad}: image file is truncated")


# --- corrupt ONNX files --------------------------------------------------------------------------


def _onnx_model(weight_name: str = "W") -> onnx.ModelProto:
    weight = helper.make_tensor("W", TensorProto.FLOAT, [10, 48], np.ones(480, np.float32))
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", weight_name], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], [weight],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_the_onnx_model_is_valid():
    onnx.checker.check_model(_onnx_model(), full_check=True)


@pytest.mark.slow
@pytest.mark.parametrize("cut", [0.1, 0.5, 0.95])
def test_truncated_onnx_is_one_line(tmp_path, cut):
    real = _onnx_model().SerializeToString()
    path = tmp_path / "model.onnx"
    path.write_bytes(real[: int(len(real) * cut)])
    code, stderr = invoke("bench", path)
    assert code == 2
    assert_one_line_error(stderr, f"{path}: not a valid ONNX model")


def test_onnx_with_a_missing_node_input_is_one_line(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(_onnx_model(weight_name="W_missing"), path)
    code, stderr = invoke("bench", path)
    assert code == 2
    assert_one_line_error(stderr, f"{path}: not a valid ONNX model", "W_missing")


def test_onnx_whose_external_data_points_outside_is_refused(tmp_path):
    model = _onnx_model()
    weight = model.graph.initializer[0]
    weight.ClearField("float_data")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../../../../etc/hostname"), ("length", "1920")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    code, stderr = invoke("bench", path)
    assert code == 2
    assert_one_line_error(stderr, f"{path}: not a valid ONNX model", "outside")


def test_fuzz_places_reach_every_section():
    """The mutation places cover the whole quickstart, so fuzzing reaches every stage's settings."""
    assert {path[0] for path in PLACES if path} == set(_fuzz_base()) >= set(_quickstart())
    assert {path[:2] for path in PLACES if len(path) >= 2 and path[0] == "stages"} == {
        ("stages", i) for i in range(6)
    }


# --- tampered artifacts ---------------------------------------------------------------------


def test_pruned_structure_wider_than_the_network_is_refused_before_allocating(tmp_path):
    from compress.errors import ModelError
    from compress.nets.weights import load_weights

    model = build_model("torchvision:mobilenet_v2", num_classes=10, cifar_stem=True)
    hostile = tmp_path / "pruned.pt"
    torch.save(
        {
            "structure": {"features.0.0": {"in_channels": 3, "out_channels": 10**12, "groups": 1}},
            "state_dict": model.state_dict(),
        },
        hostile,
    )
    with pytest.raises(
        ModelError, match="out_channels 1000000000000 is wider than the unpruned layer's 32"
    ):
        load_weights(
            build_model("torchvision:mobilenet_v2", num_classes=10, cifar_stem=True), hostile
        )


def test_stage_record_pointing_outside_the_run_is_not_trusted(tmp_path):
    import json

    from compress.core.fileio import write_bytes_atomic
    from compress.pipeline.artifacts import Artifact, load_completed, record_stage

    run_dir, outside = tmp_path / "run", tmp_path / "secret.bin"
    (run_dir / "stage").mkdir(parents=True)
    weights = write_bytes_atomic(run_dir / "stage" / "model.pt", b"weights")
    record_stage(
        run_dir / "stage", run_dir, Artifact("stage", files={"model": weights}, key="k"), {}, {}
    )
    assert load_completed(run_dir / "stage", run_dir, "k") is not None
    outside.write_bytes(b"weights")
    record = json.loads((run_dir / "stage" / "stage.json").read_text())
    record["files"]["model"]["path"] = "../secret.bin"  # same hash, outside the run folder
    (run_dir / "stage" / "stage.json").write_text(json.dumps(record))
    assert load_completed(run_dir / "stage", run_dir, "k") is None


def test_report_shows_no_row_whose_record_or_files_lie_outside_the_run(tmp_path):
    """A record listing a file outside the run (or a stage.json linked in from elsewhere) is not
    this run's: its row is left out and the report says so, naming it (issue 28)."""
    import json

    from compress.core.fileio import write_bytes_atomic
    from compress.pipeline.artifacts import Artifact, record_stage
    from compress.pipeline.report import build_report, report_markdown

    run_dir = tmp_path / "run"
    for stage, top1 in (("teacher", 90.0), ("distill", 80.0), ("prune", 70.0)):
        (run_dir / stage).mkdir(parents=True)
        weights = write_bytes_atomic(run_dir / stage / "model.pt", stage.encode())
        artifact = Artifact(
            stage,
            kind=stage,
            files={"model": weights},
            key="k",
            metrics={"top1": top1, "params": 1000},
        )
        record_stage(run_dir / stage, run_dir, artifact, {}, {})
    assert [m["name"] for m in build_report(run_dir)["models"]] == ["distill", "prune", "teacher"]
    (tmp_path / "elsewhere.pt").write_bytes(b"distill")
    record = json.loads((run_dir / "distill" / "stage.json").read_text())
    record["files"]["model"]["path"] = "../elsewhere.pt"  # same bytes, outside the run
    (run_dir / "distill" / "stage.json").write_text(json.dumps(record))
    foreign = tmp_path / "other_run_prune.json"
    foreign.write_bytes((run_dir / "prune" / "stage.json").read_bytes())
    (run_dir / "prune" / "stage.json").unlink()
    (run_dir / "prune" / "stage.json").symlink_to(foreign)
    report = build_report(run_dir)
    assert [m["name"] for m in report["models"]] == ["teacher"]
    assert len(report["not_shown"]) == 2
    assert (
        "distill/stage.json: its model file ../elsewhere.pt lies outside" in report["not_shown"][0]
    )
    assert f"links to {foreign}, outside the run folder" in report["not_shown"][1]
    assert "## Not shown (not this run's records)" in report_markdown(report)


@pytest.mark.parametrize(
    ("mean", "std", "expected"),
    [
        ("nan,nan,nan", "1,1,1", "compress.mean='nan,nan,nan': expected finite numbers"),
        ("0.5,0.5,0.5", "0,0,0", "compress.std='0,0,0': expected finite numbers above 0"),
        ("1e309,0,0", "1,1,1", "expected finite numbers"),
        ("0.5,0.5,0.5", "-1,1,1", "above 0"),
    ],
)
def test_preprocessing_metadata_must_be_finite_with_a_positive_std(tmp_path, mean, std, expected):
    """A file whose metadata would make every input NaN or infinite is refused by name, never
    benched to a top-1 computed on NaNs (issue 28)."""
    from compress.benchmark.measure import normalisation
    from compress.errors import ExportError

    metadata = {"compress.mean": mean, "compress.std": std}
    with pytest.raises(ExportError, match="^m.onnx: metadata ") as caught:
        normalisation(metadata, tmp_path / "m.onnx")
    assert expected in str(caught.value)
    assert normalisation({"compress.mean": "0.5", "compress.std": "0.25"}, tmp_path) == (
        [0.5],
        [0.25],
    )


def _forged_npz(path, x_header_shape, x_bytes: bytes, y) -> None:
    """An npz whose x.npy header declares ``x_header_shape`` over ``x_bytes`` of data."""
    import io
    import zipfile

    import numpy as np

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": x_header_shape}
    )
    labels = io.BytesIO()
    np.save(labels, np.asarray(y, dtype=np.int64))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", header.getvalue() + x_bytes)
        archive.writestr("y.npy", labels.getvalue())


def test_an_npz_header_declaring_terabytes_is_refused_before_any_allocation(tmp_path):
    from compress.data.npz import load_npz
    from compress.data.spec import DataConfig
    from compress.errors import DataError

    _forged_npz(tmp_path / "train.npz", (10**7, 224, 224, 3), bytes(1024), [0, 1])
    _forged_npz(tmp_path / "test.npz", (2, 8, 8, 3), bytes(2 * 8 * 8 * 3), [0, 1])
    with pytest.raises(DataError, match=r"train\.npz: array 'x' declares shape \(10000000, 224"):
        load_npz(DataConfig(kind="npz", path=str(tmp_path), image_size=8))


def test_an_npz_label_of_a_billion_is_refused_before_naming_a_billion_classes(tmp_path):
    from compress.data.npz import MAX_CLASSES, load_npz
    from compress.data.spec import DataConfig
    from compress.errors import DataError

    _forged_npz(tmp_path / "train.npz", (2, 8, 8, 3), bytes(2 * 8 * 8 * 3), [0, 10**9])
    _forged_npz(tmp_path / "test.npz", (2, 8, 8, 3), bytes(2 * 8 * 8 * 3), [0, 1])
    with pytest.raises(DataError, match=f"up to 1,000,000,000; .* at most {MAX_CLASSES:,}"):
        load_npz(DataConfig(kind="npz", path=str(tmp_path), image_size=8))
    # the same archives with sane labels load
    _forged_npz(tmp_path / "train.npz", (2, 8, 8, 3), bytes(2 * 8 * 8 * 3), [0, 1])
    bundle = load_npz(DataConfig(kind="npz", path=str(tmp_path), image_size=8))
    assert len(bundle.train) == 2


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "deep", "huge"])
def test_records_read_back_are_bounded_regular_files(tmp_path, kind):
    """A FIFO planted as stage.json hung every command that reads records; a link to /dev/zero
    read until memory ran out; a JSON nested 100,000 deep raised RecursionError (exit 1). Each
    is now one line naming the file, at once (issue 28)."""
    import os

    from compress.core.fileio import MAX_RECORD_BYTES, UnreadableFile, read_json
    from compress.core.records import StageRecord
    from compress.errors import ModelError

    record = tmp_path / "export" / "stage.json"
    record.parent.mkdir()
    if kind == "fifo":
        os.mkfifo(record)
        expected = "a FIFO, not a file"
    elif kind == "dev-zero":
        record.symlink_to("/dev/zero")
        expected = "a device, not a file"
    elif kind == "deep":
        record.write_text("[" * 100_000 + "]" * 100_000)
        expected = "nested deeper than a record can be"
    else:
        with open(record, "wb") as handle:  # sparse: no disk used
            handle.truncate(MAX_RECORD_BYTES + 1)
        expected = f"a record is at most {MAX_RECORD_BYTES:,}"
    with pytest.raises(UnreadableFile, match=expected):
        read_json(record)
    with pytest.raises(ModelError, match=rf"stage\.json: not a finished stage \(.*{expected}"):
        StageRecord.read(record.parent)


def test_a_baseline_nested_100000_deep_is_bad_input_not_a_regression(tmp_path):
    from click.testing import CliRunner

    from compress.cli import cli

    baseline = tmp_path / "bench.json"
    baseline.write_text('{"rows": ' + "[" * 100_000 + "]" * 100_000 + "}")
    current = tmp_path / "current.json"
    current.write_text('{"rows": []}')
    result = CliRunner().invoke(cli, ["check", str(current), "--baseline", str(baseline)])
    assert result.exit_code == 2, result.output
    assert "nested deeper than a record can be" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        ({"bench": {"processes": 10_000}}, r"stages\[2\]\.bench\.processes: expected 1\.\.50 "),
        (
            {"bench": {"iterations": 10**7}},
            r"stages\[2\]\.bench\.iterations: expected 1\.\.100,000",
        ),
        ({"prune": {"steps": 10_000}}, r"stages\[2\]\.prune\.steps: expected 1\.\.100 "),
        (
            {"prune": {"target": {"latency_speedup": 1.5, "grid": 100_000}}},
            r"stages\[2\]\.prune\.target\.grid: expected 2\.\.64 ",
        ),
        (
            {"prune": {"target": {"latency_speedup": 1.5, "processes": 10_000}}},
            r"stages\[2\]\.prune\.target\.processes: expected 1\.\.50 ",
        ),
        ({"distill": {"train": {"epochs": 100_000}}}, r"train\.epochs: expected 0\.\.10,000 "),
    ],
)
def test_every_count_a_recipe_sets_has_an_upper_bound(stage, expected):
    """10^4 bench processes validated and would have run about 50 minutes per model (issue 28)."""
    from compress.errors import RecipeError
    from compress.pipeline.recipe.load import recipe_from_dict

    with pytest.raises(RecipeError, match=expected):
        recipe_from_dict({"name": "t", "stages": ["teacher", "distill", stage]}, source="t.yaml")


def test_bench_refuses_ten_thousand_processes_in_one_line(tmp_path):
    from click.testing import CliRunner

    from compress.cli import cli

    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    result = CliRunner().invoke(cli, ["bench", str(model), "--processes", "10000"])
    assert result.exit_code == 2 and "processes: expected 1..50" in result.output


@pytest.mark.parametrize("field", ["out", "data"])
def test_a_non_utf8_path_is_refused_before_any_work(tmp_path, field):
    """A non-UTF-8 byte in --out trained, failed at export, then crashed printing the error
    (three tracebacks, exit 1). Now one line naming the field, exit 2, nothing run (issue 28)."""
    import os
    import subprocess
    import sys

    bad = os.fsdecode(str(tmp_path).encode() + b"/\xff")  # as argv delivers it
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    args = [sys.executable, "-m", "compress", "run", str(recipe), f"--{field}", bad]
    proc = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=120)
    assert proc.returncode == 2, proc.stderr[-1000:]
    expected = "out" if field == "out" else "data.path"
    assert f"{expected}: the path" in proc.stderr and "not valid UTF-8" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    "args",
    [
        ("bench", "{bad}"),
        ("bench", "{model}", "--out", "{bad}"),
        ("bench", "{model}", "--data", "{bad}"),
        ("export", "{bad}", "--format", "onnx-fp16"),
        ("export", "{model}", "--format", "onnx-fp16", "--out", "{bad}/m.onnx"),
        ("report", "{bad}"),
        ("check", "{bad}"),
        ("check", "{model}", "--baseline", "{bad}"),
        ("validate", "{bad}"),
    ],
)
def test_every_path_argument_refuses_non_utf8_in_one_line(tmp_path, args):
    """Each command's path arguments, as argv delivers a non-UTF-8 byte: a usage error naming
    the argument, exit 2, nothing written (issue 28)."""
    import os
    import subprocess
    import sys

    bad = os.fsdecode(str(tmp_path).encode() + b"/\xff")
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    argv = [arg.format(bad=bad, model=model) for arg in args]
    proc = subprocess.run(
        [sys.executable, "-m", "compress", *argv],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-1000:]
    assert "is not valid UTF-8; rename it" in proc.stderr and "\\xff" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize("planted", ["fifo", "device", "folder"])
def test_what_is_not_a_file_is_named_for_what_it_is(tmp_path, planted):
    """A FIFO, /dev/zero or a folder given as a model, checkpoint or bench result was reported
    as "no such file", sending the user looking for a file that is there (issue 28)."""
    import os

    from compress.exporters.onnx.graph import load_onnx
    from compress.nets.weights import read_checkpoint
    from compress.pipeline.gates import load_bench_result

    if planted == "fifo":
        path, words = tmp_path / "planted", "a FIFO, not a file"
        os.mkfifo(path)
    elif planted == "device":
        path, words = Path("/dev/zero"), "a device, not a file"
    else:
        path, words = tmp_path, "a folder, not a file"
    with pytest.raises(ModelError, match=f"^checkpoint {re.escape(str(path))}: {words}$"):
        read_checkpoint(path)
    from compress.errors import ExportError

    with pytest.raises(ExportError, match=f"^{re.escape(str(path))}: {words}; expected an ONNX"):
        load_onnx(path)
    if planted != "folder":  # a folder is looked into for bench.json
        with pytest.raises(DataError, match=f"^{re.escape(str(path))}: {words}; no bench result"):
            load_bench_result(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"top1": 999.0}, "rows['student'].top1 is 999.0, not a percentage 0..100"),
        (
            {"latency": [{"batch_size": "one", "status": "ok", "latency_ms": {"p50": 1.0}}]},
            "rows['student'].latency batch_size is 'one', not a positive int",
        ),
    ],
)
def test_a_baseline_with_impossible_values_is_bad_input_not_a_regression(tmp_path, edit, message):
    """A top-1 of 999% read as a regression (exit 1), a non-numeric batch size was silently
    skipped: both are bad input, exit 2, naming the field (issue 28)."""
    import json

    (tmp_path / "current.json").write_text(json.dumps(bench_result_json()))
    (tmp_path / "baseline.json").write_text(json.dumps(bench_result_json(**edit)))
    result = compress("check", tmp_path / "current.json", "--baseline", tmp_path / "baseline.json")
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "baseline.json: " + message)
