"""Float where INT8 is slower (:func:`compress.float_where_slower`, the quantize stage's option).

No timing decides a test here: a fake runtime's "latency" is a deterministic function of the
ONNX file. In it a depthwise convolution costs more as an integer kernel than in float (as ONNX
Runtime's CPU kernels behave), a dense one the other way round, so does a linear layer on tokens
(``MatMul``: a small hybrid's), and a float convolution between INT8 layers pays a transition
cost that the two fakes set differently: cheap (the mixed network is faster: kept) or dear (the
cells say float, the whole network says no: not kept).
"""

import numpy as np
import onnx
import pytest
import torch
from conftest import register_fake_backend
from torch import nn

import compress
from compress.quantization.fake_quant import quantized_layers
from compress.quantization.speed import MARGIN, FloatWhereSlower, LayerSpeed

DEPTHWISE_INT8_MS, DEPTHWISE_FLOAT_MS = 2.0, 1.0
DENSE_INT8_MS, DENSE_FLOAT_MS = 1.0, 2.0
TOKENS_INT8_MS, TOKENS_FLOAT_MS = 2.0, 1.0
CHEAP_TRANSITION_MS, DEAR_TRANSITION_MS = 0.1, 5.0


def layer_costs(model: onnx.ModelProto, transition_ms: float) -> float:
    """Fake runtime: each Conv by its kind (depthwise or dense) and each MatMul by precision
    (integer when its weight comes out of a DequantizeLinear, through a Transpose for a
    MatMul); a float Conv fed by a DequantizeLinear (a float layer between INT8 ones) also pays
    ``transition_ms``."""
    producers = {out: node for node in model.graph.node for out in node.output}

    def integer(weight: str) -> bool:
        node = producers.get(weight)
        while node is not None and node.op_type == "Transpose":
            node = producers.get(node.input[0])
        return node is not None and node.op_type == "DequantizeLinear"

    total = 0.0
    for node in model.graph.node:
        if node.op_type == "MatMul":
            total += TOKENS_INT8_MS if integer(node.input[1]) else TOKENS_FLOAT_MS
        if node.op_type != "Conv":
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        integer_conv = integer(node.input[1])
        source = producers.get(node.input[0])
        if group > 1:
            total += DEPTHWISE_INT8_MS if integer_conv else DEPTHWISE_FLOAT_MS
        else:
            total += DENSE_INT8_MS if integer_conv else DENSE_FLOAT_MS
        if not integer_conv and source is not None and source.op_type == "DequantizeLinear":
            total += transition_ms
    return total


def _network(path, batch_sizes, transition_ms):
    cost = layer_costs(onnx.load(path), transition_ms)
    return {
        "status": "ok",
        "batches": [{"batch_size": batch_sizes[0], "status": "ok", "latency_ms": {"p50": cost}}],
    }


def cheap_network(path, *, batch_sizes, **_):
    return _network(path, batch_sizes, CHEAP_TRANSITION_MS)


def dear_network(path, *, batch_sizes, **_):
    return _network(path, batch_sizes, DEAR_TRANSITION_MS)


def cells(paths, **_):
    """One-layer files: the cell of a float layer between INT8 ones has no transition cost
    here (only whole networks pay it), so the cells always say "float" for depthwise layers."""
    return {
        "status": "ok",
        "ms": [layer_costs(onnx.load(p), 0.0) for p in paths],
        "spread": [0.0 for _ in paths],
    }


def fake_runtime(monkeypatch, name: str, network: str) -> str:
    entry, cells_entry = f"test_float_where_slower:{network}", "test_float_where_slower:cells"
    return register_fake_backend(monkeypatch, name, entry, cells_entry).name


def mobile_block() -> nn.Module:
    """stem conv -> depthwise 3x3 -> pointwise 1x1 -> classifier, each conv with BN and ReLU."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()


@pytest.fixture
def quantized():
    model = mobile_block()
    batches = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    qmodel = compress.quantize(model, batches, calibration="minmax")
    return model, qmodel, batches


def test_depthwise_layer_goes_float_when_the_whole_network_is_faster(monkeypatch, quantized):
    model, qmodel, batches = quantized
    backend = fake_runtime(monkeypatch, "fake-cheap", "cheap_network")
    result = compress.float_where_slower(qmodel, model, batches[0], backend=backend, processes=3)
    record = result.float_where_slower
    assert record.float_layers == ("3",)  # the depthwise conv alone
    assert record.kept and result is not qmodel
    assert "3" not in quantized_layers(result) and {"0", "6"} <= set(quantized_layers(result))
    assert "3" in result.quant_spec.skip
    # all-INT8: 1 + 2 + 1 = 4; mixed: 1 + 1 + 0.1 + 1 = 3.1 (plus the classifier: no Conv)
    assert record.ratio == pytest.approx(3.1 / 4.0)
    # the float layer keeps the INT8 network's values: same outputs elsewhere, close overall
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(result(x), qmodel(x), atol=0.5)


def test_mixed_network_is_not_kept_when_measured_slower(monkeypatch, quantized):
    model, qmodel, batches = quantized
    backend = fake_runtime(monkeypatch, "fake-dear", "dear_network")
    result = compress.float_where_slower(qmodel, model, batches[0], backend=backend, processes=3)
    record = result.float_where_slower
    assert record.float_layers == ("3",)  # the cells alone say float...
    assert not record.kept and result is qmodel  # ...the whole network says no
    assert record.ratio == pytest.approx((1 + 1 + 5 + 1) / 4.0)
    assert set(quantized_layers(result)) == {"0", "3", "6", "11"}


def test_nothing_measured_when_every_layer_is_faster_in_int8(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 4))
    batches = [torch.randn(4, 3, 16, 16)]
    qmodel = compress.quantize(model.eval(), batches, calibration="minmax")
    backend = fake_runtime(monkeypatch, "fake-cheap", "cheap_network")
    result = compress.float_where_slower(qmodel, model, batches[0], backend=backend)
    assert result is qmodel
    assert result.float_where_slower.float_layers == ()
    assert result.float_where_slower.int8_ms == () and result.float_where_slower.ratio is None


def test_the_rule_margins():
    assert LayerSpeed("a", 1.0, (1 - MARGIN) * 0.99).float_is_faster
    assert not LayerSpeed("a", 1.0, 1.0 - MARGIN / 2).float_is_faster

    def measured(int8_ms, mixed_ms):
        return FloatWhereSlower("x", 1, 1, (), ("a",), tuple(int8_ms), tuple(mixed_ms))

    assert measured([1.0, 1.0, 1.0], [0.9, 0.97, 0.95]).pays  # median ratio 0.95
    assert not measured([1.0, 1.0, 1.0], [0.9, 0.99, 1.2]).pays  # median 0.99: within noise
    assert not measured([], []).pays  # nothing measured
    record = FloatWhereSlower("x", 1, 1, (), ("a",), (2.0, 2.0), (1.0, 3.0), False)
    assert record.to_json()["ratio"] == pytest.approx(1.0)


def test_float_in_int8_cell_is_a_float_conv_between_uint8_ends():
    from compress.pruning.latency_table import FLOAT_IN_INT8, layer_model, layer_sites

    site = next(s for s in layer_sites(mobile_block(), torch.randn(1, 3, 16, 16)) if s.depthwise)
    cell = layer_model(site, 16, 16, FLOAT_IN_INT8)
    ops = [node.op_type for node in cell.graph.node]
    assert ops.count("DequantizeLinear") == 1 and "QuantizeLinear" in ops  # activations only
    assert cell.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert cell.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    conv = next(node for node in cell.graph.node if node.op_type == "Conv")
    weight = next(i for i in cell.graph.initializer if i.name == conv.input[1])
    assert weight.data_type == onnx.TensorProto.FLOAT
    import onnxruntime as ort

    session = ort.InferenceSession(cell.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": np.zeros((2, 16, 16, 16), np.uint8)})[0]
    assert out.shape == (2, 16, 16, 16) and out.dtype == np.uint8


class TokenBlock(nn.Module):
    """conv stem -> its map as 256 tokens -> a linear layer on them -> mean -> classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.mlp, self.head = nn.Linear(16, 32), nn.Linear(32, 10)

    def forward(self, x):
        tokens = torch.relu(self.stem(x)).flatten(2).transpose(1, 2)
        return self.head(torch.relu(self.mlp(tokens)).mean(1))


def test_a_linear_layer_on_tokens_goes_float_when_the_whole_network_is_faster(monkeypatch):
    torch.manual_seed(0)
    model, batches = TokenBlock().eval(), [torch.randn(8, 3, 16, 16) for _ in range(2)]
    qmodel = compress.quantize(model, batches, calibration="minmax")
    backend = fake_runtime(monkeypatch, "fake-cheap", "cheap_network")
    result = compress.float_where_slower(qmodel, model, batches[0], backend=backend, processes=3)
    record = result.float_where_slower
    assert {layer.name for layer in record.layers} == {"stem", "mlp", "head"}  # all judged
    assert record.float_layers == ("mlp",) and record.kept
    assert set(quantized_layers(result)) == {"stem", "head"}
    assert record.ratio == pytest.approx((1 + 1) / (1 + 2))  # stem + mlp, float vs INT8


def test_a_linear_cell_multiplies_the_layers_tokens_as_the_exported_network_does(tmp_path):
    """INT8: the input quantized, the int8 weight dequantized, transposed, ``MatMul`` and the
    bias ``Add`` (what torch exports for a ``QuantLinear`` on tokens), which ONNX Runtime fuses
    into ``MatMulIntegerToFloat``; its float cell is the FP32 layer (no transition)."""
    import onnxruntime as ort
    from conftest import optimized_nodes

    from compress.pruning.latency_table import FLOAT_IN_INT8, layer_model, layer_sites

    sites = {s.name: s for s in layer_sites(TokenBlock().eval(), torch.randn(1, 3, 16, 16))}
    assert (sites["mlp"].tokens, sites["head"].tokens) == (256, 1)
    feed = {"input": np.random.default_rng(0).standard_normal((2, 256, 16)).astype(np.float32)}
    outputs = {}
    for precision in ("int8", "fp32", FLOAT_IN_INT8):
        cell = layer_model(sites["mlp"], 16, 32, precision)
        session = ort.InferenceSession(cell.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs[precision] = session.run(None, feed)[0]
        assert outputs[precision].shape == (2, 256, 32)
    assert np.array_equal(outputs["fp32"], outputs[FLOAT_IN_INT8])
    assert np.abs(outputs["int8"] - outputs["fp32"]).max() < 0.05 * np.abs(outputs["fp32"]).max()
    path = tmp_path / "cell.onnx"
    onnx.save(layer_model(sites["mlp"], 16, 32, "int8"), path)
    assert "MatMulIntegerToFloat" in {n.op_type for n in optimized_nodes(path, "ORT_ENABLE_ALL")}
    head = layer_model(sites["head"], 32, 10, "fp32")  # a classifier: one vector, a Gemm
    assert [n.op_type for n in head.graph.node] == ["Gemm"]


@pytest.mark.slow
def test_the_stage_keeps_depthwise_layers_float_and_the_file_runs_them_in_float(
    monkeypatch, tmp_path, digits_teacher
):
    from conftest import DIGITS_BASE, run_recipe

    fake_runtime(monkeypatch, "onnxruntime", "cheap_network")  # what the stage measures on
    raw = DIGITS_BASE | {
        "name": "speed",
        "teacher": DIGITS_BASE["teacher"] | {"checkpoint": digits_teacher},
        "student": {"model": "torchvision:mobilenet_v2"},
        "stages": [
            "teacher",
            {"distill": {"loss": "kd", "train": {"epochs": 1, "optimizer": "adamw", "lr": 3e-3}}},
            {
                "quantize": {
                    "mode": "ptq",
                    "calibration": "minmax",
                    "calibration_images": 64,
                    "float_where_slower": True,
                }
            },
            {"export": {"check_samples": 64}},
        ],
    }
    artifacts = run_recipe(tmp_path, raw)
    metrics = artifacts["quantize"].metrics
    speed = metrics["float_where_slower"]
    depthwise = [layer["name"] for layer in speed["layers"] if layer["float_ms"] < layer["int8_ms"]]
    assert len(depthwise) == 17  # MobileNetV2's depthwise convolutions
    assert speed["kept"] and speed["ratio"] < 1
    assert metrics["quantization"]["float_layers_for_speed"] == depthwise
    qdq = artifacts["export"].metrics["student"]["qdq"]
    assert qdq["fp32_conv"] == len(depthwise)  # the file computes them in float
