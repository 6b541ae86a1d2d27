"""ONNX files over protobuf's 2 GiB limit: the weights go to a sidecar ``<name>.onnx.data`` that
is written, checked, proven, moved, measured, hashed and removed with the graph. The limit is
lowered here so a small network crosses it; one slow test crosses the real one."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import compress
import compress.exporters.onnx.files as onnx_files
from compress.core.fileio import content_bytes, content_sha256, sidecar
from compress.core.records import FileRecord, StageRecord
from compress.errors import ExportError, ModelError
from compress.exporters.network import proven
from compress.exporters.onnx.export import add_metadata, export_onnx
from compress.exporters.onnx.graph import load_onnx, read_onnx_info
from compress.exporters.onnx.verify import verify_onnx

SMALL_LIMIT = 4096  # bytes: the small network's weights (about 12 KB) are over it


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


@pytest.fixture
def low_limit(monkeypatch):
    monkeypatch.setattr(onnx_files, "PROTOBUF_LIMIT", SMALL_LIMIT)


def images(count: int = 8) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(count, 3, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_a_file_over_the_limit_keeps_its_weights_beside_it_and_runs(tmp_path, low_limit, exporter):
    model = small_cnn()
    path = export_onnx(model, tmp_path / "m.onnx", image_size=8, exporter=exporter)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]  # no scratch left
    convolutions = 4 * (3 * 16 * 9 + 16 * 16 * 9)  # bytes: the tensors over 1 KiB
    assert sidecar(path).stat().st_size >= convolutions
    record = verify_onnx(path, model, images(), tolerance=1e-4, min_agreement=1.0)
    assert record["max_abs_diff"] < 1e-4
    info = read_onnx_info(path)
    assert info["file_bytes"] == path.stat().st_size + sidecar(path).stat().st_size
    assert info["params"] == sum(p.numel() for p in model.parameters())


def test_metadata_is_added_to_a_file_with_a_sidecar(tmp_path, low_limit):
    model = small_cnn()
    path = export_onnx(model, tmp_path / "m.onnx", image_size=8, exporter="torchscript")
    add_metadata(path, {"compress.note": "kept"})
    assert {p.key: p.value for p in load_onnx(path).metadata_props}["compress.note"] == "kept"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(torch.from_numpy(images())).numpy()
    np.testing.assert_allclose(session.run(None, {"input": images()})[0], expected, atol=1e-4)


def test_a_smaller_file_written_over_a_larger_one_leaves_no_stale_sidecar(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    monkeypatch.setattr(onnx_files, "PROTOBUF_LIMIT", SMALL_LIMIT)
    export_onnx(small_cnn(), path, image_size=8, exporter="torchscript")
    assert sidecar(path).is_file()
    monkeypatch.setattr(onnx_files, "PROTOBUF_LIMIT", 2**31 - 1)
    export_onnx(small_cnn(), path, image_size=8, exporter="torchscript")
    assert os.listdir(tmp_path) == ["m.onnx"]
    assert load_onnx(path).graph.initializer[0].data_location == 0  # held in the file


def test_the_proof_moves_the_pair_and_a_failed_pair_is_kept_loadable(tmp_path, low_limit):
    model = small_cnn()
    path = tmp_path / "student.onnx"
    compress.export(model, path, check_inputs=images(), exporter="torchscript")
    assert sorted(os.listdir(tmp_path)) == ["student.onnx", "student.onnx.data"]

    with pytest.raises(ExportError, match="kept as student.onnx.failed-check"):
        with proven(path) as pending:
            export_onnx(model, pending, image_size=8, exporter="torchscript")
            raise ExportError("student.onnx does not reproduce the PyTorch model")
    kept = tmp_path / "student.onnx.failed-check"
    assert sorted(os.listdir(tmp_path)) == [kept.name, kept.name + ".txt"]
    kept = kept / "student.onnx"  # under its own name: the graph names its sidecar
    assert sidecar(kept).is_file()
    ort.InferenceSession(str(kept), providers=["CPUExecutionProvider"])  # loads as it is
    compress.export(model, path, check_inputs=images(), exporter="torchscript")  # supersedes it
    assert sorted(os.listdir(tmp_path)) == ["student.onnx", "student.onnx.data"]


def test_a_changed_sidecar_is_a_changed_file(tmp_path, low_limit):
    run = tmp_path / "run"
    path = export_onnx(small_cnn(), run / "export" / "m.onnx", image_size=8, exporter="torchscript")
    digest = content_sha256(path)
    assert content_bytes(path) == path.stat().st_size + sidecar(path).stat().st_size
    record = StageRecord(
        stage="export",
        kind="export",
        key="",
        files={"model": FileRecord("export/m.onnx", digest, 0)},
        folder=run / "export",
    )
    assert record.path("model") == path
    data = bytearray(sidecar(path).read_bytes())
    data[-1] ^= 1  # one weight's last byte
    sidecar(path).write_bytes(bytes(data))
    assert content_sha256(path) != digest
    with pytest.raises(ModelError, match="not the file the stage wrote"):
        record.path("model")


def test_simplify_refuses_a_file_over_the_limit_in_one_line(tmp_path, low_limit):
    with pytest.raises(ExportError, match="set export.simplify: false"):
        export_onnx(small_cnn(), tmp_path / "m.onnx", image_size=8, simplify=True)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_a_network_over_2_gib_exports_and_is_proven(tmp_path):
    """The real limit: 577M float weights (2.3 GB) through the default exporter and its proof
    (about 30 s and 7 GB of memory)."""

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Conv2d(3, 192_000, 1)
            self.head = nn.Linear(192_000, 3_000)

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))

    model = Wide().eval()
    path = tmp_path / "wide.onnx"
    record = compress.export(model, path, check_inputs=images(4)[:, :, :2, :2])
    assert record["max_abs_diff"] < 1e-3
    assert path.stat().st_size < 2**20 and sidecar(path).stat().st_size > 2**31
    assert sorted(os.listdir(tmp_path)) == ["wide.onnx", "wide.onnx.data"]
