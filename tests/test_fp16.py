"""FP16 ONNX conversion: what the file holds, that it still reproduces PyTorch FP32 within the
stated bounds on a trained model and real images, and what it refuses to convert."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import randomised
from onnx import TensorProto, helper
from torch import nn

from compress.errors import ExportError
from compress.exporters.fp16 import FP16_MIN_AGREEMENT, FP16_TOLERANCE, convert_to_fp16
from compress.exporters.onnx.export import export_onnx, preprocessing_metadata
from compress.exporters.onnx.graph import read_onnx_info
from compress.exporters.onnx.verify import verify_onnx
from compress.nets.models import CifarResNet, build_model

SIZE = 8  # sklearn digits are 8x8


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels): sklearn's digits as 3-channel
    normalised float32, the real images the model is trained and checked on."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.repeat(data.images[:, None] / 16.0, 3, axis=1).astype(np.float32)
    images = (images - images.mean()) / images.std()
    return images[:1200], data.target[:1200], images[1200:], data.target[1200:]


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """(model, FP32 file): a CIFAR ResNet-20 trained a few seconds on digits (> 80% top-1)."""
    x, y, test_x, test_y = digits
    torch.manual_seed(0)
    model = CifarResNet(20, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(3):
        for i in range(0, len(x), 32):
            loss = nn.functional.cross_entropy(
                model(torch.from_numpy(x[i : i + 32])), torch.from_numpy(y[i : i + 32])
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        assert (model(torch.from_numpy(test_x)).argmax(1).numpy() == test_y).mean() > 0.8
    metadata = preprocessing_metadata([0.3] * 3, [0.4] * 3, SIZE, 10)
    path = tmp_path_factory.mktemp("fp32") / "resnet20.onnx"
    return model, export_onnx(model, path, image_size=SIZE, exporter="dynamo", metadata=metadata)


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    """(model, FP32 file): MobileNetV2 (depthwise convs, ReLU6 as Clip) with random non-trivial
    BatchNorm statistics and biases, exported by the tracer."""
    torch.manual_seed(0)
    model = build_model("torchvision:mobilenet_v2", num_classes=10, cifar_stem=True)
    randomised(model)
    model.eval()
    path = tmp_path_factory.mktemp("mobilenet") / "mobilenet_v2.onnx"
    return model, export_onnx(model, path, image_size=SIZE, exporter="torchscript")


def io_types(path) -> tuple[int, int]:
    graph = onnx.load(path).graph
    return graph.input[0].type.tensor_type.elem_type, graph.output[0].type.tensor_type.elem_type


def float_initializer_types(path) -> set[int]:
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16}
    return {
        init.data_type
        for init in onnx.load(path).graph.initializer
        if init.data_type in floats and init.dims
    }


# --- the converted file ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keep_io_types", "io"),
    [(False, TensorProto.FLOAT16), (True, TensorProto.FLOAT)],
    ids=["fp16-io", "fp32-io"],
)
@pytest.mark.slow
def test_weights_are_fp16_and_io_as_asked(trained, tmp_path, keep_io_types, io):
    _, fp32 = trained
    fp16 = convert_to_fp16(fp32, tmp_path / "m.fp16.onnx", keep_io_types=keep_io_types)
    assert float_initializer_types(fp32) == {TensorProto.FLOAT}
    assert float_initializer_types(fp16) == {TensorProto.FLOAT16}
    assert io_types(fp16) == (io, io)
    onnx.checker.check_model(
        onnx.load(fp16)
    )  # with FP32 IO the converter's casts needed re-sorting
    assert 0.45 < fp16.stat().st_size / fp32.stat().st_size < 0.55


def test_keeps_the_dynamic_batch_and_names(trained, tmp_path):
    _, fp32 = trained
    fp16 = convert_to_fp16(fp32, tmp_path / "m.fp16.onnx")
    session = ort.InferenceSession(str(fp16), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"] and [
        o.name for o in session.get_outputs()
    ] == ["logits"]
    for batch in (1, 3):
        out = session.run(None, {"input": np.zeros((batch, 3, SIZE, SIZE), np.float16)})[0]
        assert out.shape == (batch, 10) and out.dtype == np.float16
    before, after = read_onnx_info(fp32), read_onnx_info(fp16)
    assert {k: after[k] for k in ("input_shape", "params", "macs")} == {
        k: before[k] for k in ("input_shape", "params", "macs")
    }


def test_metadata_is_kept_and_precision_added(trained, tmp_path):
    _, fp32 = trained
    before = read_onnx_info(fp32)["metadata"]
    fp16 = convert_to_fp16(
        fp32, tmp_path / "m.fp16.onnx", metadata={"note": "x", "compress.precision": "fp32"}
    )
    assert read_onnx_info(fp16)["metadata"] == before | {"note": "x", "compress.precision": "fp16"}
    assert "compress.precision" not in read_onnx_info(fp32)["metadata"]  # the source is untouched


# --- proof against PyTorch ------------------------------------------------------------------


@pytest.mark.parametrize("keep_io_types", [False, True], ids=["fp16-io", "fp32-io"])
def test_trained_model_matches_torch_within_fp16_bounds(trained, digits, tmp_path, keep_io_types):
    model, fp32 = trained
    images = digits[2][:200]
    fp16 = convert_to_fp16(fp32, tmp_path / "m.fp16.onnx", keep_io_types=keep_io_types)
    result = verify_onnx(
        fp16,
        model,
        images,
        tolerance=FP16_TOLERANCE,
        min_agreement=FP16_MIN_AGREEMENT,
        relative=True,
    )
    exact = verify_onnx(fp32, model, images, tolerance=1e-4, min_agreement=1.0, relative=True)
    assert result["samples"] == 200 and result["top1_agreement"] >= FP16_MIN_AGREEMENT
    # Really half precision (far from FP32's error), yet well inside the bound.
    assert 30 * exact["max_rel_diff"] < result["max_rel_diff"] < FP16_TOLERANCE / 4


def test_mobilenet_matches_torch_within_fp16_bounds(mobilenet, digits, tmp_path):
    model, fp32 = mobilenet
    fp16 = convert_to_fp16(fp32, tmp_path / "m.fp16.onnx")
    result = verify_onnx(
        fp16,
        model,
        digits[2][:64],
        tolerance=FP16_TOLERANCE,
        min_agreement=FP16_MIN_AGREEMENT,
        relative=True,
    )
    assert 0 < result["max_rel_diff"] < FP16_TOLERANCE / 4
    with pytest.raises(
        ExportError, match="does not reproduce"
    ):  # the bound is tight enough to catch FP16 itself
        verify_onnx(fp16, model, digits[2][:64], tolerance=1e-5, min_agreement=0.0, relative=True)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_static_batch_survives_conversion(trained, digits, tmp_path, exporter):
    model, _ = trained
    fp32 = export_onnx(model, tmp_path / "static.onnx", image_size=SIZE, exporter=exporter, batch=4)
    fp16 = convert_to_fp16(fp32, tmp_path / "static.fp16.onnx")
    assert read_onnx_info(fp16)["input_shape"] == [4, 3, SIZE, SIZE]
    result = verify_onnx(
        fp16,
        model,
        digits[2][:10],
        tolerance=FP16_TOLERANCE,
        min_agreement=FP16_MIN_AGREEMENT,
        relative=True,
    )
    assert result["samples"] == 8  # whole batches of 4 only
    session = ort.InferenceSession(str(fp16), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        session.run(None, {"input": np.zeros((2, 3, SIZE, SIZE), np.float16)})


# --- refusals -------------------------------------------------------------------------------


def qdq_file(path) -> str:
    """A minimal INT8 QDQ graph: FP32 input, QuantizeLinear, DequantizeLinear, FP32 output."""
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "scale", "zero"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 10])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=[
            helper.make_tensor("scale", TensorProto.FLOAT, [], [0.1]),
            helper.make_tensor("zero", TensorProto.INT8, [], [0]),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_refuses_an_int8_qdq_file(tmp_path):
    path = qdq_file(tmp_path / "int8.onnx")
    with pytest.raises(
        ExportError, match=r"int8\.onnx: cannot convert to FP16: it is an INT8 \(QDQ\) model"
    ) as info:
        convert_to_fp16(path, tmp_path / "out.onnx")
    assert "\n" not in str(info.value) and "QuantizeLinear" in str(info.value)
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize(
    ("keep_io_types", "reason"),
    [
        (False, r"it is already FP16 \(FLOAT16 input\)"),
        (True, r"it is already FP16 \(FLOAT16 weights"),
    ],
)
def test_refuses_an_fp16_file(trained, tmp_path, keep_io_types, reason):
    _, fp32 = trained
    fp16 = convert_to_fp16(fp32, tmp_path / "once.onnx", keep_io_types=keep_io_types)
    with pytest.raises(ExportError, match=f"once.onnx: cannot convert to FP16: {reason}"):
        convert_to_fp16(fp16, tmp_path / "twice.onnx")
    assert not (tmp_path / "twice.onnx").exists()


@pytest.mark.parametrize(
    ("name", "content"), [("text.onnx", b"not a model"), ("missing.onnx", None)]
)
def test_refuses_a_file_that_is_not_onnx(tmp_path, name, content):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ExportError, match=name) as info:
        convert_to_fp16(path, tmp_path / "out.onnx")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out.onnx").exists()


def test_recipe_defaults_are_the_measured_bounds():
    from compress.exporters.fp16 import FP16_MIN_AGREEMENT, FP16_TOLERANCE
    from compress.exporters.spec import ExportConfig

    assert (ExportConfig().fp16_tolerance, ExportConfig().fp16_min_agreement) == (
        FP16_TOLERANCE,
        FP16_MIN_AGREEMENT,
    )
