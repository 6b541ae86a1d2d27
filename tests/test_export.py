"""ONNX export, its proof against PyTorch, and what read_onnx_info reads back from the file."""

from __future__ import annotations

import copy
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch_pruning as tp
from conftest import randomised
from torch import nn

import compress.core.fileio
from compress.core.compat import torchvision
from compress.errors import ExportError
from compress.exporters.formats import FORMATS
from compress.exporters.onnx.export import export_onnx, preprocessing_metadata
from compress.exporters.onnx.graph import read_onnx_info
from compress.exporters.onnx.verify import verify_onnx

EXPORTERS = ("dynamo", "torchscript")
SIZE = 32


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def tv_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomised(getattr(torchvision.models, name)(num_classes=10))


MODELS = {"small": small_cnn, "mobilenet_v2": lambda: tv_model("mobilenet_v2")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, path) for every model x exporter, exported once for the whole file."""
    folder = tmp_path_factory.mktemp("exported")
    out = {}
    for name, build in MODELS.items():
        model = build()
        for exporter in EXPORTERS:
            path = export_onnx(
                model, folder / f"{name}_{exporter}.onnx", image_size=SIZE, exporter=exporter
            )
            out[name, exporter] = (model, path)
    return out


@pytest.fixture(scope="module")
def resnet18_onnx(tmp_path_factory):
    model = tv_model("resnet18")
    path = tmp_path_factory.mktemp("resnet") / "resnet18.onnx"
    return model, export_onnx(model, path, image_size=SIZE, exporter="torchscript")


def ort_logits(path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": images})[0]


# --- export ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_onnx_matches_torch_with_dynamic_batch(exported, name, exporter):
    model, path = exported[name, exporter]
    for batch in (1, 5):
        images = np.random.default_rng(batch).standard_normal(
            (batch, 3, SIZE, SIZE), dtype=np.float32
        )
        with torch.no_grad():
            expected = model(torch.from_numpy(images)).numpy()
        got = ort_logits(path, images)
        assert got.shape == (batch, 10)
        assert np.abs(got - expected).max() < 1e-4
    graph = onnx.load(path).graph
    assert [v.name for v in graph.input] == ["input"] and [v.name for v in graph.output] == [
        "logits"
    ]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert not graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")  # dynamic batch


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_export_is_one_self_contained_file(exported, exporter):
    _, path = exported["mobilenet_v2", exporter]
    model = onnx.load(path, load_external_data=False)
    assert all(init.data_location == onnx.TensorProto.DEFAULT for init in model.graph.initializer)
    assert sorted(os.listdir(path.parent)) == sorted(
        f"{n}_{e}.onnx" for n in MODELS for e in EXPORTERS
    )


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_metadata_round_trip(tmp_path, exporter):
    metadata = preprocessing_metadata([0.5, 0.25, 0.125], [0.2, 0.3, 0.4], SIZE, ["cat", "dog"])
    metadata["note"] = "any string, even with, commas"
    path = export_onnx(
        small_cnn(), tmp_path / "m.onnx", image_size=SIZE, exporter=exporter, metadata=metadata
    )
    assert read_onnx_info(path)["metadata"] == metadata
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map == metadata
    assert (
        metadata["compress.mean"] == "0.5,0.25,0.125" and metadata["compress.classes"] == "cat,dog"
    )


def test_export_leaves_model_as_it_came(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten())
    model.train()
    model[2].eval()  # a mixed state must survive too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "m.onnx", image_size=8, exporter="torchscript")
    assert [m.training for m in model.modules()] == [True, True, True, False, True]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN stats untouched: eval mode
    assert all(p.device.type == "cpu" for p in model.parameters())


class DataDependent(nn.Module):
    def forward(self, x):
        return x.mean((2, 3)) if x.sum() > 0 else x.amax((2, 3))


class Svd(nn.Module):
    def forward(self, x):
        return torch.linalg.svd(x.flatten(2))[1]


@pytest.mark.parametrize(
    ("model", "exporter", "reason"),
    [(DataDependent(), "dynamo", "data-dependent"), (Svd(), "torchscript", "svd")],
)
def test_exporter_failure_is_one_line_and_keeps_old_file(tmp_path, model, exporter, reason):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous export")
    with pytest.raises(ExportError) as info:
        export_onnx(model, path, image_size=8, exporter=exporter)
    message = str(info.value)
    assert "\n" not in message and exporter in message and "m.onnx" in message
    assert reason in message.lower()
    assert path.read_bytes() == b"previous export"
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_interrupted_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous export")

    def interrupted(_path):
        raise KeyboardInterrupt

    monkeypatch.setattr(compress.core.fileio, "_fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(small_cnn(), path, image_size=8, exporter="torchscript")
    assert path.read_bytes() == b"previous export"
    assert os.listdir(tmp_path) == ["m.onnx"]


@pytest.mark.parametrize(
    ("exporter", "opset"),
    [("torchscript", 13), ("torchscript", 17), ("dynamo", 18), ("dynamo", 20)],
)
def test_file_is_written_at_the_opset_asked(tmp_path, exporter, opset):
    path = export_onnx(
        small_cnn(), tmp_path / "m.onnx", image_size=8, opset=opset, exporter=exporter
    )
    assert read_onnx_info(path)["opset"] == opset


def test_opset_the_exporter_cannot_write_is_refused_not_mislabelled(tmp_path, capfd):
    """dynamo exports at 18+; torch's own down-conversion of a mean-pooled net fails and kept
    opset 18 (with tracebacks on stderr) for a run whose record said 17."""
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous export")
    with pytest.raises(ExportError) as info:
        export_onnx(small_cnn(), path, image_size=8, opset=17, exporter="dynamo")
    message = str(info.value)
    assert "\n" not in message and "opset 17" in message
    assert "use opset >= 18 or exporter: torchscript" in message
    assert path.read_bytes() == b"previous export"
    assert "Traceback" not in capfd.readouterr().err


def test_torchscript_opset_above_what_it_implements_is_refused():
    from compress.errors import RecipeError
    from compress.exporters.spec import ExportConfig

    with pytest.raises(RecipeError, match="opset: the torchscript exporter writes opsets up to 20"):
        ExportConfig(exporter="torchscript", opset=21)


def test_unknown_exporter(tmp_path):
    with pytest.raises(ExportError, match="unknown ONNX exporter 'jit'"):
        export_onnx(small_cnn(), tmp_path / "m.onnx", image_size=8, exporter="jit")


def test_formats_table():
    from compress.core.records import QuantSpec
    from compress.exporters.formats import format_of_file
    from compress.exporters.fp16 import build_from_onnx, convert_onnx

    onnx_fmt, fp16 = FORMATS.get("onnx"), FORMATS.get("onnx-fp16")
    assert (onnx_fmt.suffix, onnx_fmt.needs_gpu, onnx_fmt.artifact) == (".onnx", False, "onnx")
    with pytest.raises(ExportError, match="base format"):
        onnx_fmt.builder  # noqa: B018  (ONNX is exported, every other format is built from it)
    assert (fp16.builder, fp16.converter, fp16.artifact) == (build_from_onnx, convert_onnx, "onnx")
    assert [format_of_file(n).name for n in ("m.onnx", "m.fp16.onnx", "m.engine", "m.plan")] == [
        "onnx",
        "onnx-fp16",
        "tensorrt",
        "tensorrt",
    ]
    assert format_of_file("m.bin") is None
    int8 = QuantSpec("onnxruntime-cpu")
    assert onnx_fmt.not_applicable(int8) is None and fp16.not_applicable(None) is None
    assert fp16.not_applicable(int8) == "an INT8 model: an FP16 ONNX file holds a float model"
    assert (
        FORMATS.get("tensorrt").not_applicable(int8)
        == "quantized for onnxruntime-cpu; an INT8 TensorRT engine needs quantize.target: tensorrt"
    )
    assert FORMATS.get("tensorrt").not_applicable(QuantSpec("tensorrt")) is None
    with pytest.raises(ExportError, match="known: onnx"):
        FORMATS.get("tensorrt-int4")


# --- static batch ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("batch", [1, 3])  # 1: the size torch.export would specialise anyway
def test_static_batch_is_fixed_in_the_graph_and_runs(exported, tmp_path, exporter, batch):
    model, dynamic = exported["mobilenet_v2", exporter]
    path = export_onnx(
        model, tmp_path / "static.onnx", image_size=SIZE, exporter=exporter, batch=batch
    )
    graph = onnx.load(path).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_value == batch
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_value == batch
    info = read_onnx_info(path)
    assert info["input_shape"] == [batch, 3, SIZE, SIZE]
    assert info["macs"] == read_onnx_info(dynamic)["macs"]  # per image, whatever the batch
    images = np.random.default_rng(0).standard_normal((batch, 3, SIZE, SIZE), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    assert np.abs(ort_logits(path, images) - expected).max() < 1e-4


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_static_batch_rejects_another_batch_size(exported, tmp_path, exporter):
    # What the benchmark must respect: ONNX Runtime refuses any other batch size.
    model, _ = exported["small", exporter]
    path = export_onnx(model, tmp_path / "static.onnx", image_size=SIZE, exporter=exporter, batch=4)
    for wrong in (1, 5):
        with pytest.raises(Exception, match=r"(?i)invalid.*dimension|got: \d+ expected: 4"):
            ort_logits(path, np.zeros((wrong, 3, SIZE, SIZE), np.float32))


@pytest.mark.parametrize(("count", "samples"), [(7, 6), (2, 3), (3, 3)])
def test_verify_feeds_whole_static_batches(exported, tmp_path, count, samples):
    # Whole chunks of exactly 3 images; fewer than 3 are repeated to fill one.
    model, _ = exported["small", "dynamo"]
    path = export_onnx(model, tmp_path / "static.onnx", image_size=SIZE, exporter="dynamo", batch=3)
    images = np.random.default_rng(0).standard_normal((count, 3, SIZE, SIZE), dtype=np.float32)
    result = verify_onnx(path, model, images, tolerance=1e-4, min_agreement=1.0)
    assert result["samples"] == samples and result["top1_agreement"] == 1.0


@pytest.mark.parametrize("batch", [0, -2, 2.0, True, "4"])
def test_static_batch_must_be_a_positive_int(tmp_path, batch):
    with pytest.raises(ExportError, match="batch: expected None"):
        export_onnx(small_cnn(), tmp_path / "m.onnx", image_size=8, batch=batch)
    assert not (tmp_path / "m.onnx").exists()


# --- verification ---------------------------------------------------------------------------


def test_verify_passes_and_reports(exported):
    model, path = exported["mobilenet_v2", "dynamo"]
    images = np.random.default_rng(0).standard_normal(
        (70, 3, SIZE, SIZE), dtype=np.float32
    )  # 2 chunks
    result = verify_onnx(path, model, images, tolerance=1e-4, min_agreement=1.0)
    assert (
        result["samples"] == 70 and result["top1_agreement"] == 1.0 and result["tolerance"] == 1e-4
    )
    assert 0 <= result["mean_abs_diff"] <= result["max_abs_diff"] < 1e-4


def test_verify_fails_on_a_different_model(exported):
    model, path = exported["small", "torchscript"]
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed[-1].weight.add_(0.05 * torch.randn_like(perturbed[-1].weight))
    images = np.random.default_rng(0).standard_normal((20, 3, SIZE, SIZE), dtype=np.float32)
    with pytest.raises(ExportError) as info:
        verify_onnx(path, perturbed, images, tolerance=1e-4, min_agreement=0.0)
    result = info.value.result
    assert result["max_abs_diff"] > 1e-4
    message = str(info.value)
    assert f"{result['max_abs_diff']:.3g}" in message and "tolerance 0.0001" in message
    assert f"top-1 agreement {result['top1_agreement']:.2%}" in message


def test_fp32_tolerance_scales_with_huge_logits(exported, tmp_path):
    """An undertrained network can have logits of 10^4 (seen on a 1-epoch CIFAR-10 ResNet18):
    float rounding then differs by 10^-2 between two correct runtimes, which the absolute bound
    must not call a wrong file; a really different model still fails."""
    model, _ = exported["small", "torchscript"]
    loud = copy.deepcopy(model)
    with torch.no_grad():
        loud[-1].weight.mul_(3e4)
        loud[-1].bias.mul_(3e4)
    path = export_onnx(loud, tmp_path / "loud.onnx", image_size=SIZE, exporter="torchscript")
    images = np.random.default_rng(0).standard_normal((20, 3, SIZE, SIZE), dtype=np.float32)
    result = verify_onnx(path, loud, images, tolerance=1e-6, min_agreement=1.0)
    assert (
        result["max_abs_logit"] > 1e3 and result["max_abs_diff"] <= 1e-6 * result["max_abs_logit"]
    )
    with torch.no_grad():
        loud[-1].weight.add_(0.05 * 3e4 * torch.randn_like(loud[-1].weight))
    with pytest.raises(ExportError, match="x the largest logit"):
        verify_onnx(path, loud, images, tolerance=1e-6, min_agreement=0.0)


def test_verify_fails_on_agreement(exported):
    model, path = exported["small", "torchscript"]
    images = np.random.default_rng(0).standard_normal((8, 3, SIZE, SIZE), dtype=np.float32)
    flipped = nn.Sequential(model, nn.Flatten(), _Negate())  # same magnitude, other top-1
    agreement = (
        r"top-1 agreement 0\.00% on the \d+ images that are not near ties \(minimum 99\.00%\)"
    )
    with pytest.raises(ExportError, match=agreement):
        verify_onnx(path, flipped, images, tolerance=1e3, min_agreement=0.99)


class _Negate(nn.Module):
    def forward(self, x):
        return -x


# --- reading back ---------------------------------------------------------------------------


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_info_params_equal_torch_without_batchnorm(exported, exporter):
    model, path = exported["small", exporter]
    info = read_onnx_info(path)
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert info["input_shape"][1:] == [3, SIZE, SIZE] and isinstance(info["input_shape"][0], str)
    assert info["opset"] == 18 and info["file_bytes"] == path.stat().st_size


def _bn_channels(model: nn.Module) -> int:
    return sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_info_params_with_batchnorm_folded(exported, exporter):
    # The documented rule: each conv->BN pair folds BN's 2*C scale/shift into a C-element conv
    # bias, so the file holds C fewer numbers per BN than PyTorch's parameters().
    model, path = exported["mobilenet_v2", exporter]
    torch_params = sum(p.numel() for p in model.parameters())
    assert read_onnx_info(path)["params"] == torch_params - _bn_channels(model)


def _tp_counts(model: nn.Module) -> tuple[float, float]:
    """torch_pruning's total ops, and its ops of Conv2d/Linear layers alone."""
    total, _, layer_ops, _ = tp.utils.count_ops_and_params(
        model, torch.randn(1, 3, SIZE, SIZE), layer_wise=True
    )
    conv_linear = sum(v or 0 for m, v in layer_ops.items() if isinstance(m, (nn.Conv2d, nn.Linear)))
    return total, conv_linear


def test_info_macs_agree_with_torch_pruning_on_resnet18(resnet18_onnx):
    model, path = resnet18_onnx
    info = read_onnx_info(path)
    total, conv_linear = _tp_counts(model)
    assert info["macs_skipped"] == 0
    assert info["macs"] == pytest.approx(total, rel=0.01)
    assert info["macs"] == pytest.approx(conv_linear, rel=0.01)
    assert info["params"] == sum(p.numel() for p in model.parameters()) - _bn_channels(model)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_info_macs_agree_with_torch_pruning_on_mobilenet_v2(exported, exporter):
    # torch_pruning's total also counts BN and ReLU6 elementwise work, ~6% of MobileNetV2's
    # (depthwise convs are cheap); we count Conv/Gemm/MatMul only, so compare those layers.
    model, path = exported["mobilenet_v2", exporter]
    info = read_onnx_info(path)
    total, conv_linear = _tp_counts(model)
    assert info["macs"] == pytest.approx(conv_linear, rel=0.01)
    assert 0.9 * total < info["macs"] < total


def test_info_macs_conv_transpose_and_matmul(tmp_path):
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 2, stride=2), nn.Flatten(2), _MatMul())
    path = export_onnx(model, tmp_path / "m.onnx", image_size=8, exporter="torchscript")
    convt = 3 * 8 * 8 * 4 * 2 * 2  # input elements * Cout * kH * kW
    matmul = 4 * 256 * 5  # (4 x 256) @ (256 x 5)
    assert read_onnx_info(path)["macs"] == convt + matmul


class _MatMul(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(256, 5))

    def forward(self, x):
        return x @ self.weight


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("random.onnx", os.urandom(2048)),
        ("empty.onnx", b""),
        ("notes.txt", b"not a model\n"),
        ("missing.onnx", None),
    ],
)
def test_info_rejects_broken_files(tmp_path, name, content):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ExportError) as info:
        read_onnx_info(path)
    assert name in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_simplified_export_still_matches_torch(tmp_path, exported, exporter):
    model, plain = exported["mobilenet_v2", exporter]
    slim = export_onnx(
        model, tmp_path / "slim.onnx", image_size=SIZE, exporter=exporter, simplify=True
    )
    assert len(onnx.load(slim).graph.node) <= len(onnx.load(plain).graph.node)
    images = np.random.default_rng(0).standard_normal((8, 3, SIZE, SIZE), dtype=np.float32)
    assert (
        verify_onnx(slim, model, images, tolerance=1e-4, min_agreement=1.0)["max_abs_diff"] <= 1e-4
    )
    assert read_onnx_info(slim)["metadata"] == read_onnx_info(plain)["metadata"]
