"""Faults and attacks the README's promises must survive (issue 14): a full disk, two runs into
one folder, hostile YAML, corrupt npz files, stage records pointing outside their run, gates
that cannot be evaluated, and files that fail their proof. Each ends in one line (or a clear
gate verdict), leaves the run folder consistent, and never leaves an unverified file at a
deliverable path."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from conftest import assert_one_line_error, bench_result_json, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from torch import nn

from compress.core.records import StageRecord
from compress.data.spec import DataConfig
from compress.errors import (
    DataError,
    ExportError,
    ModelError,
    OutputError,
    StageError,
    output_error,
)
from compress.exporters.spec import ExportConfig

DIGITS = {
    "kind": "digits",
    "image_size": 8,
    "batch_size": 32,
    "augment": False,
    "subset": {"train": 64, "test": 32},
}
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def digits_recipe(
    folder: Path,
    name: str = "faults",
    epochs: int = 1,
    stages=("teacher",),
    model: str = "cifar:resnet8",
    **more,
) -> Path:
    raw = {
        "name": name,
        "data": DIGITS,
        "teacher": {"model": model, "train": {"epochs": epochs}},
        "student": {"model": "cifar:resnet8"},
        "stages": list(stages),
        "out": str(folder / "out"),
    } | more
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# --- full disk -----------------------------------------------------------------------------------


def test_torch_save_on_a_full_disk_is_an_oserror_and_the_old_file_survives(tmp_path, monkeypatch):
    from compress.nets.weights import save_weights

    path = save_weights(nn.Linear(2, 2), tmp_path / "model.pt")
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(
        shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10 << 20, 10 << 20, 0)
    )
    with pytest.raises(OSError) as info:
        save_weights(nn.Linear(2, 2), path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert "the disk is full" in str(output_error(info.value)) and str(path) in str(
        output_error(info.value)
    )
    assert path.read_bytes() == before and os.listdir(tmp_path) == [
        "model.pt"
    ]  # no temporary file left


def test_a_full_disk_during_any_atomic_write_names_the_file_not_its_temporary(
    tmp_path, monkeypatch
):
    import compress.core.fileio as fileio

    def full(_path):
        raise OSError(errno.ENOSPC, "No space left on device")  # no file name, as fsync raises

    monkeypatch.setattr(fileio, "_fsync", full)
    target = tmp_path / "bench.json"
    with pytest.raises(OSError) as info:
        fileio.write_json_atomic(target, {"rows": []})
    line = str(output_error(info.value))
    assert f"cannot write {target}: the disk is full" in line
    assert os.listdir(tmp_path) == []


def test_other_torch_save_errors_are_not_mistaken_for_a_full_disk(tmp_path, monkeypatch):
    from compress.nets.weights import save_weights

    monkeypatch.setattr(
        torch,
        "save",
        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("cannot pickle 'generator' object")),
    )
    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_weights(nn.Linear(2, 2), tmp_path / "model.pt")


@pytest.fixture
def full_disk(tmp_path):
    """A 2 MiB tmpfs (needs root and a kernel that lets this container mount one)."""
    mount = tmp_path / "full"
    mount.mkdir()
    if (
        not IS_ROOT
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True
        ).returncode
    ):
        pytest.skip(
            "cannot mount a small tmpfs here (needs root); the fault-injection tests above cover "
            "the code path"
        )
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


@pytest.mark.slow
def test_a_run_on_a_full_disk_ends_in_one_line_and_resumes_elsewhere(tmp_path, full_disk):
    recipe = digits_recipe(
        tmp_path, epochs=1, model="cifar:resnet56"
    )  # 3.4 MB of weights: more than the disk holds
    result = run_cli("run", recipe, "--out", full_disk)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write") and "the disk is full" in last
    assert f" {full_disk}/" in last and ".tmp" not in last  # names the file, not a temporary one
    assert not list(full_disk.rglob("*.tmp")) and not list(full_disk.rglob(".*.pt.*"))


# --- one run per folder --------------------------------------------------------------------------


HOLD = """
import sys, time
from pathlib import Path
from compress.pipeline.run_lock import run_lock
with run_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(run_dir: Path) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_into_the_same_folder_refuses_naming_the_holder(tmp_path):
    from compress.pipeline.run_lock import run_lock

    run_dir = tmp_path / "out" / "faults"
    holder = _holder(run_dir)
    try:
        with pytest.raises(
            StageError, match=rf"in use by another run \(pid {holder.pid} on .+ since \d{{4}}-"
        ) as info:
            with run_lock(run_dir):
                pass
        assert "--wait" in str(info.value)
        result = run_cli("run", digits_recipe(tmp_path), "--out", tmp_path / "out")
        assert result.returncode == 2
        assert_one_line_error(result.stderr, f"pid {holder.pid}")
        assert not (run_dir / "teacher").exists()  # refused before touching a stage
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_leaves_no_stale_lock_and_wait_queues(tmp_path):
    from compress.pipeline.run_lock import HOLDER_NAME, run_lock

    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    os.kill(holder.pid, signal.SIGKILL)  # no cleanup: the holder file stays, the OS drops the lock
    holder.wait()
    assert (run_dir / HOLDER_NAME).exists()
    with run_lock(run_dir):
        pass
    holder = _holder(run_dir)
    started = time.monotonic()
    subprocess.Popen(
        [sys.executable, "-c", f"import os, time; time.sleep(1.5); os.kill({holder.pid}, 9)"]
    )
    with run_lock(run_dir, wait=True):  # blocks until the holder is gone
        assert time.monotonic() - started > 1.0
    holder.wait()


# --- hostile YAML --------------------------------------------------------------------------------


LAUGHS = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)).replace(
    "*l0", '"lol"'
)


@pytest.mark.parametrize("field", ["name", "data.unlabeled.path", "stages"])
def test_billion_laughs_is_refused_before_it_expands(tmp_path, field):
    from compress.pipeline.recipe.load import load_recipe

    tail = {
        "name": "name: *l8\nstages: [teacher]\n",
        "data.unlabeled.path": "name: x\ndata: {unlabeled: {path: *l8}}\nstages: [teacher]\n",
        "stages": "name: x\nstages: *l8\n",
    }[field]
    path = tmp_path / "laughs.yaml"
    path.write_text(LAUGHS + tail)
    started = time.monotonic()
    with pytest.raises(Exception) as info:
        load_recipe(path)
    assert time.monotonic() - started < 5
    assert "aliases expand to more than 100,000 values" in str(info.value)


def test_a_long_list_without_aliases_is_called_big_not_an_alias_bomb(tmp_path):
    from compress.errors import RecipeError
    from compress.pipeline.recipe.load import load_recipe

    path = tmp_path / "big.yaml"
    path.write_text("name: x\nstages: [teacher]\nnotes: [" + "1, " * 200_000 + "1]\n")
    with pytest.raises(RecipeError, match="it holds more than 100,000 values") as info:
        load_recipe(path)
    assert "aliases" not in str(info.value).split(": ", 1)[1]


def test_a_recursive_alias_and_a_key_given_twice_are_refused(tmp_path):
    from compress.errors import RecipeError
    from compress.pipeline.recipe.load import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("name: x\nseed: 1\nstages: [teacher]\nseed: 2\n")
    with pytest.raises(
        RecipeError, match=r"the key 'seed' is given twice in one mapping \(lines 2 and 4\)"
    ):
        load_recipe(path)
    path.write_text("name: x\nstages: &s [teacher, *s]\n")
    with pytest.raises(RecipeError, match="alias refers to a value that contains it"):
        load_recipe(path)
    path.write_text(
        "base: &b {epochs: 1}\nname: x\nteacher: {train: {<<: *b, lr: 0.1}}\nstages: [teacher]\n"
    )
    with pytest.raises(
        RecipeError, match="base: unknown field"
    ):  # merge keys still work; the unknown key is caught as before
        load_recipe(path)


def test_a_huge_value_is_not_echoed_whole(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: {'a' * 5_000_000}\nstages: [teacher]\n")
    result = run_cli("validate", path)
    line = assert_one_line_error(result.stderr, "name: expected")
    assert len(line) < 800 and "characters]..." in line


# --- corrupt npz ---------------------------------------------------------------------------------


def _npz_folder(tmp_path: Path, train: bytes | None = None, classes: str | None = None) -> Path:
    folder = tmp_path / "npz"
    folder.mkdir(exist_ok=True)
    x, y = np.zeros((6, 8, 8, 3), np.uint8), np.array([0, 1, 2, 0, 1, 2])
    np.savez(folder / "train.npz", x=x, y=y)
    np.savez(folder / "test.npz", x=x, y=y)
    if train is not None:
        (folder / "train.npz").write_bytes(train)
    if classes is not None:
        (folder / "classes.txt").write_text(classes)
    return folder


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a valid numpy .npz archive (the file is empty)"),
        (os.urandom(400), "not a valid numpy .npz archive (it is not a zip archive"),
        (b"PK\x03\x04" + os.urandom(400), "not a valid numpy .npz archive, or truncated"),
    ],
)
def test_a_corrupt_npz_is_one_line_that_never_suggests_unpickling(tmp_path, content, message):
    from compress.data.npz import load_npz

    folder = _npz_folder(tmp_path, train=content)
    with pytest.raises(DataError, match=re.escape(message)) as info:
        load_npz(DataConfig(kind="npz", path=str(folder), image_size=8))
    assert "allow_pickle" not in str(info.value)


def test_a_zero_byte_npz_through_the_cli_is_an_error_line_not_aborted(tmp_path):
    folder = _npz_folder(tmp_path, train=b"")
    recipe = digits_recipe(
        tmp_path, data={"kind": "npz", "path": str(folder), "image_size": 8, "batch_size": 4}
    )
    result = run_cli("run", recipe, "--debug")
    assert result.returncode == 2 and "Aborted!" not in result.stderr
    assert "not a valid numpy .npz archive (the file is empty)" in result.stderr


def test_classes_txt_with_too_few_names_is_blamed_not_the_labels(tmp_path):
    from compress.data.npz import load_npz

    folder = _npz_folder(tmp_path, classes="a\nb\n")
    with pytest.raises(
        DataError, match=r"classes\.txt: names 2 classes, but the labels go up to 2"
    ):
        load_npz(DataConfig(kind="npz", path=str(folder), image_size=8))


def test_object_arrays_are_never_unpickled(tmp_path):
    from compress.data.npz import load_npz

    folder = _npz_folder(tmp_path)
    np.savez(folder / "train.npz", x=np.array([object()] * 6, dtype=object), y=np.arange(6))
    with pytest.raises(DataError, match="object arrays"):
        load_npz(DataConfig(kind="npz", path=str(folder), image_size=8))


@settings(
    max_examples=60,
    deadline=2000,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.one_of(st.binary(max_size=2000), st.integers(0, 99).map(lambda cut: ("cut", cut))))
def test_fuzzed_npz_files_raise_one_data_error(tmp_path, case):
    from compress.data.npz import load_npz

    folder = _npz_folder(tmp_path)
    if isinstance(case, tuple):  # a real archive, truncated
        data = (folder / "test.npz").read_bytes()
        case = data[: len(data) * case[1] // 100]
    (folder / "train.npz").write_bytes(case)
    with pytest.raises(DataError):
        load_npz(DataConfig(kind="npz", path=str(folder), image_size=8))


def _onnx_bytes() -> bytes:
    w = helper.make_tensor(
        "W",
        TensorProto.FLOAT,
        [3 * 8 * 8, 10],
        np.random.default_rng(0).standard_normal(1920).astype(np.float32),
    )
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["f"]),
            helper.make_node("MatMul", ["f", "W"], ["logits"]),
        ],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@settings(
    max_examples=60,
    deadline=5000,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.one_of(st.binary(max_size=3000), st.integers(0, 99).map(lambda cut: ("cut", cut))))
def test_fuzzed_onnx_files_raise_one_export_error(tmp_path, case):
    from compress.benchmark.measure import describe_artifact
    from compress.exporters.onnx.verify import open_session

    data = _onnx_bytes()
    content = data[: len(data) * case[1] // 100] if isinstance(case, tuple) else case
    path = tmp_path / "m.onnx"
    path.write_bytes(content)
    with pytest.raises(ExportError):
        describe_artifact(path, "onnx")
        open_session(path)


# --- stage records that point outside the run ----------------------------------------------------


@pytest.fixture(scope="module")
def finished_stage(tmp_path_factory) -> Path:
    """A run whose teacher stage is finished (1 epoch of cifar:resnet8 on 64 digits)."""
    folder = tmp_path_factory.mktemp("records")
    result = run_cli("run", digits_recipe(folder))
    assert result.returncode == 0, result.stderr[-2000:]
    return folder / "out" / "faults" / "teacher"


def _tampered_copy(stage: Path, tmp_path: Path, how: str) -> Path:
    run = tmp_path / "run"
    shutil.copytree(stage.parent, run)
    record_path, outside = run / "teacher" / "stage.json", tmp_path / "outside_model.pt"
    shutil.copy(run / "teacher" / "model.pt", outside)
    record = json.loads(record_path.read_text())
    if how == "path":
        record["files"]["model"]["path"] = "../outside_model.pt"
    elif how == "symlink":
        (run / "teacher" / "model.pt").unlink()
        (run / "teacher" / "model.pt").symlink_to(outside)
    elif how == "top1":
        record["metrics"]["top1"] = 999
    record_path.write_text(json.dumps(record))
    return run / "teacher"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["path", "symlink"])
def test_export_and_bench_refuse_records_pointing_outside_the_run(finished_stage, tmp_path, how):
    stage = _tampered_copy(finished_stage, tmp_path, how)
    for args in (
        ("export", stage, "--format", "onnx"),
        ("bench", stage, "--backend", "torch", "--iterations", "5"),
    ):
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stdout[-500:])
        assert_one_line_error(result.stderr, "lies outside the run folder; refusing to load it")
    assert not list(tmp_path.rglob("*.onnx"))


def test_impossible_metrics_in_a_record_are_refused(finished_stage, tmp_path):
    stage = _tampered_copy(finished_stage, tmp_path, "top1")
    with pytest.raises(ModelError, match="metric top1 = 999 is not a percentage"):
        StageRecord.read(stage)
    from compress.pipeline.artifacts import load_completed

    assert (
        load_completed(
            stage,
            stage.parent,
            StageRecord.from_json(json.loads((finished_stage / "stage.json").read_text())).key,
        )
        is None
    )


# --- gates that cannot be evaluated --------------------------------------------------------------


def _bench_result(path: Path, **student) -> Path:
    path.write_text(json.dumps(bench_result_json(**student)))
    return path


def test_a_gate_the_baseline_cannot_evaluate_fails_unless_allowed(tmp_path):
    current = _bench_result(tmp_path / "current.json")
    baseline = _bench_result(tmp_path / "baseline.json", top1=None)
    result = run_cli("check", current, "--baseline", baseline)
    assert (
        result.returncode == 1
        and "SKIPPED (fails; --allow-missing to accept)" in result.stdout
        and "could not be evaluated" in result.stdout
    )
    assert run_cli("check", current, "--baseline", baseline, "--allow-missing").returncode == 0
    zero = _bench_result(tmp_path / "zero.json", file_bytes=0)
    result = run_cli("check", current, "--baseline", zero)
    assert result.returncode == 1 and "baseline is 0" in result.stdout


def test_a_string_where_a_number_belongs_is_one_line(tmp_path):
    current = _bench_result(tmp_path / "current.json", top1="NaN")
    result = run_cli("check", current, "--baseline", _bench_result(tmp_path / "baseline.json"))
    assert result.returncode == 2
    assert_one_line_error(
        result.stderr, "rows['student'].top1 is 'NaN', not a finite non-negative number"
    )


def test_gating_another_network_warns(tmp_path):
    current = _bench_result(tmp_path / "current.json", params=20, macs=250)
    result = run_cli("check", current, "--baseline", _bench_result(tmp_path / "baseline.json"))
    assert (
        "warning: student is a different network than in the baseline "
        "(params 10 -> 20, macs 100 -> 250)" in result.stderr
    )


# --- files that fail their proof -----------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_a_file_that_fails_its_check_never_sits_at_the_deliverable_path(tmp_path, monkeypatch):
    import compress.exporters.network as network

    images = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    path = tmp_path / "student.onnx"
    network.export_network(
        _Tiny().eval(), path, ExportConfig(), images, {}, None, image_size=8, in_channels=3
    )
    assert path.is_file()  # a verified file from an earlier run...

    def wrong(path, *args, **kwargs):
        raise ExportError(f"{path.name} does not reproduce the PyTorch model on 8 images")

    monkeypatch.setattr(network, "verify_onnx", wrong)
    with pytest.raises(
        ExportError,
        match=(
            r"student\.onnx does not reproduce .* \(not written as student\.onnx; the file that "
            r"failed is kept as student\.onnx\.failed-check\)"
        ),
    ):
        network.export_network(
            _Tiny().eval(), path, ExportConfig(), images, {}, None, image_size=8, in_channels=3
        )
    assert not path.exists()  # ...is gone: it belonged to other inputs
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "student.onnx.failed-check",
        "student.onnx.failed-check.txt",
    ]
    assert "does not reproduce" in (tmp_path / "student.onnx.failed-check.txt").read_text()
    monkeypatch.undo()
    network.export_network(
        _Tiny().eval(), path, ExportConfig(), images, {}, None, image_size=8, in_channels=3
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "student.onnx"
    ]  # a passing export supersedes the failure


@pytest.mark.slow
def test_a_failed_re_export_leaves_nothing_of_the_earlier_run_downstream(tmp_path):
    """The earlier run's ``teacher.onnx``, bench results and report were made from inputs this
    run replaced: after its export fails they must not look like this run's deliverables."""
    bench = {"bench": {"iterations": 5, "warmup": 1, "time_budget_s": 1, "batch_size": 8}}
    recipe = digits_recipe(tmp_path, stages=("teacher", "export", bench))
    run_dir = tmp_path / "out" / "faults"
    assert run_cli("run", recipe).returncode == 0
    downstream = [
        "teacher.onnx",
        "export/stage.json",
        "bench/stage.json",
        "bench/bench.json",
        "report.md",
        "report.json",
    ]
    assert all((run_dir / name).is_file() for name in downstream)
    failed = run_cli("run", recipe, "--set", "stages.export.tolerance=1e-12")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: teacher.onnx does not reproduce the PyTorch model")
    assert [name for name in downstream if (run_dir / name).exists()] == []
    assert (run_dir / "teacher" / "stage.json").is_file()  # upstream of the failure: kept
    again = run_cli("run", recipe)
    assert again.returncode == 0 and "[teacher] running" not in again.stderr
    assert all((run_dir / name).is_file() for name in downstream)


@pytest.mark.slow
def test_a_re_run_stage_re_runs_every_later_one(tmp_path):
    """Keys chain recipe sections, not results: a stage re-run because its file was lost must
    not leave a later stage that was made from the lost file skipped."""
    recipe = digits_recipe(tmp_path, stages=("teacher", "export"))
    run_dir = tmp_path / "out" / "faults"
    assert run_cli("run", recipe).returncode == 0
    (run_dir / "teacher" / "model.pt").unlink()
    again = run_cli("run", recipe)
    assert again.returncode == 0
    assert "[teacher] running" in again.stderr and "[export] running" in again.stderr


@pytest.mark.slow
def test_converting_a_two_input_onnx_is_one_line_and_leaves_no_file(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["logits"])],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 8, 8]) for n in ("a", "b")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    source = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    result = run_cli("export", source, "--format", "onnx-fp16")
    assert result.returncode == 2
    assert_one_line_error(
        result.stderr, "has 2 inputs; compress converts and checks single-input image classifiers"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "two.fp16.onnx.failed-check",
        "two.fp16.onnx.failed-check.txt",
        "two.onnx",
    ]


# --- smaller ones --------------------------------------------------------------------------------


def test_a_malicious_checkpoint_message_names_what_it_would_import(tmp_path):
    from compress.nets.weights import read_checkpoint

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    torch.save({"conv1.weight": Payload()}, tmp_path / "model.pt")
    with pytest.raises(
        ModelError, match=r"it would import (posix|nt)\.system and only plain tensors are loaded"
    ):
        read_checkpoint(tmp_path / "model.pt")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.skipif(IS_ROOT, reason="root reads any folder: permissions cannot be tested as root")
def test_validate_refuses_an_unreadable_data_folder(tmp_path):
    folder = _npz_folder(tmp_path)
    os.chmod(folder / "train.npz", 0)
    try:
        result = run_cli(
            "validate",
            digits_recipe(tmp_path, data={"kind": "npz", "path": str(folder), "image_size": 8}),
        )
        assert result.returncode == 2
        assert_one_line_error(result.stderr, "data.path: cannot read")
    finally:
        os.chmod(folder / "train.npz", 0o644)


def test_validate_says_what_it_checked_of_the_data(tmp_path):
    folder = _npz_folder(tmp_path)
    result = run_cli(
        "validate",
        digits_recipe(tmp_path, data={"kind": "npz", "path": str(folder), "image_size": 8}),
    )
    assert (
        result.returncode == 0
        and "is readable (its content is read when the run loads it)" in result.stderr
    )


def test_output_error_covers_an_io_error(tmp_path):
    error = output_error(OSError(errno.EIO, "I/O error", str(tmp_path / "x")))
    assert isinstance(error, OutputError) and "an I/O error while writing" in str(error)
