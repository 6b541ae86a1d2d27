"""Stage records: a stage counts as complete only with the same inputs and intact files."""

import json

import pytest
import torch

from compress.core.records import NetworkSpec, QuantSpec, StageRecord
from compress.errors import ModelError
from compress.nets.models import build_model
from compress.nets.weights import load_weights, save_weights
from compress.pipeline.artifacts import Artifact, input_key, load_completed, record_stage


def completed_stage(tmp_path):
    run_dir = tmp_path / "run"
    folder = run_dir / "distill"
    model = torch.nn.Linear(3, 2)
    path = save_weights(model, folder / "model.pt")
    artifact = Artifact(
        "distill", files={"model": path}, metrics={"top1": 50.0}, role="student", key="abc"
    )
    artifact.peak_rss_mb = 123.45
    record_stage(folder, run_dir, artifact, config={"epochs": 1}, recipe={"name": "run"})
    return run_dir, folder, path


def test_complete_stage_is_found_with_its_files_and_metrics(tmp_path):
    run_dir, folder, path = completed_stage(tmp_path)
    found = load_completed(folder, run_dir, "abc")
    assert found is not None and found.skipped
    assert (
        found.files == {"model": path}
        and found.metrics == {"top1": 50.0}
        and found.role == "student"
        and found.peak_rss_mb == 123.5  # kept to 0.1 MiB
    )
    record = json.loads((folder / "stage.json").read_text())
    assert (
        record["files"]["model"]["path"] == "distill/model.pt"
    )  # relative: the run folder can move


def test_changed_inputs_or_tampered_files_mean_not_complete(tmp_path):
    run_dir, folder, path = completed_stage(tmp_path)
    assert load_completed(folder, run_dir, "other-key") is None
    path.write_bytes(path.read_bytes() + b"x")
    assert load_completed(folder, run_dir, "abc") is None
    path.unlink()
    assert load_completed(folder, run_dir, "abc") is None


def test_corrupt_or_missing_record_means_not_complete(tmp_path):
    run_dir, folder, _ = completed_stage(tmp_path)
    (folder / "stage.json").write_text("{ half a reco")
    assert load_completed(folder, run_dir, "abc") is None
    (folder / "stage.json").unlink()
    assert load_completed(folder, run_dir, "abc") is None


def test_input_key_is_stable_and_order_independent_for_mappings():
    assert input_key({"a": 1, "b": [1, 2]}) == input_key({"b": [1, 2], "a": 1})
    assert input_key({"a": 1}) != input_key({"a": 2})


def test_saved_weights_reload_with_weights_only(tmp_path):
    model = build_model("cifar:resnet20", num_classes=10).eval()
    path = save_weights(model, tmp_path / "m.pt")
    again = load_weights(build_model("cifar:resnet20", num_classes=10), path).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), again(x))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_network_spec_round_trips_through_the_stage_record(tmp_path):
    run_dir, folder = tmp_path / "run", tmp_path / "run" / "quantize"
    spec = NetworkSpec(
        "cifar:resnet8",
        num_classes=10,
        cifar_stem=True,
        quantization=QuantSpec("onnxruntime-cpu", ("fc",), "pair-limit"),
    )
    path = save_weights(torch.nn.Linear(3, 2), folder / "model.pt")
    record_stage(
        folder,
        run_dir,
        Artifact(
            "quantize",
            files={"model": path},
            metrics={"top1": 80.0},
            role="student",
            network=spec,
            key="k",
        ),
        {},
        {"data": {"image_size": 32}},
    )
    record = StageRecord.read(folder)
    assert record.network == spec and record.metrics == {"top1": 80.0} and record.image_size == 32
    assert record.network_file() == path and record.run_dir == run_dir
    found = load_completed(folder, run_dir, "k")
    assert found.network == spec and found.quantized


def test_records_written_before_network_specs_still_load(tmp_path):
    """Old run folders kept the network's identity in the metrics: they still resume and reload."""
    run_dir, folder, path = completed_stage(tmp_path)
    raw = json.loads((folder / "stage.json").read_text())
    raw.pop("network", None)
    raw["metrics"] |= {
        "model": "cifar:resnet20",
        "cifar_stem": True,
        "num_classes": 10,
        "quantization": {"mode": "qat", "target": "onnxruntime-cpu", "skip": []},
    }
    (folder / "stage.json").write_text(json.dumps(raw))
    found = load_completed(folder, run_dir, "abc")
    assert found.network == NetworkSpec(
        "cifar:resnet20",
        num_classes=10,
        cifar_stem=True,
        quantization=QuantSpec("onnxruntime-cpu", (), "full"),
    )


def test_a_record_that_is_not_one_names_the_file(tmp_path):
    (tmp_path / "stage.json").write_text('{"metrics": {}}')
    with pytest.raises(
        ModelError, match=r"stage\.json: not a finished stage \(no 'stage' recorded\)"
    ):
        StageRecord.read(tmp_path)
    with pytest.raises(ModelError, match="no such file"):
        StageRecord.read(tmp_path / "elsewhere")
    run_dir, folder, _ = completed_stage(tmp_path)
    with pytest.raises(ModelError, match="not a finished stage holding a network"):
        StageRecord.read(folder).network_file()  # a stage without a network spec


def test_each_stage_reads_its_own_peak_memory_not_the_process_lifetime_peak():
    import numpy as np

    from compress.pipeline.memory import stage_peak_rss

    with stage_peak_rss() as big:
        block = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
        del block
    with stage_peak_rss() as small:
        block = np.ones(50 * 2**20 // 8)
        del block
    assert big.mb > 400 and small.mb is not None
    try:
        open("/proc/self/clear_refs", "w").close()
    except OSError:
        pytest.skip("this OS cannot reset a process's peak: the lifetime peak is recorded")
    assert small.mb < big.mb - 300  # the 400 MiB of the earlier stage are not counted again
