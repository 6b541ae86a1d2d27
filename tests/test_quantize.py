"""INT8 quantization: quantizer placement, calibration, PTQ/QAT through the pipeline, and the QDQ
ONNX file (INT8 weights, the target's activation type, every conv a QLinearConv in ONNX Runtime)."""

import operator
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import yaml
from conftest import DIGITS_BASE, optimized_nodes, run_recipe
from torch import nn

import compress
from compress.errors import ExportError, SettingError
from compress.exporters.onnx.export import export_onnx
from compress.exporters.onnx.verify import open_session
from compress.exporters.qdq import check_qdq, float_ops, onnxruntime_qdq, store_int8_weights
from compress.nets.models import build_model
from compress.nets.weights import load_weights, save_weights
from compress.pipeline.recipe.load import load_recipe
from compress.pipeline.runner import run
from compress.quantization.fake_quant import (
    ActQuant,
    QuantConv2d,
    calibrate,
    float_convs,
    prepare_quantized,
)

TARGETS = ("onnxruntime-cpu", "tensorrt")
# Measured on 360 digits test images (resnet20, 8x8): ORT's integer requantisation vs PyTorch
# fake quantization, max |logit diff| 0.12 (mean 0.015, logits up to ~9) and 100% (QAT) / 99.2%
# (PTQ) top-1 agreement; ORT INT8 vs ORT FP32 top-1 agreement 95.6% after QAT (which moved the
# model: 92.2 -> 94.2% top-1) and 99.2% after PTQ. The bounds leave room.
ORT_TOLERANCE = 0.5
ORT_MIN_AGREEMENT = 0.98


def prepared(name="cifar:resnet20", target="onnxruntime-cpu", skip=(), size=16):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, cifar_stem=True).eval()
    return model, prepare_quantized(
        model, target=target, skip=skip, example_inputs=torch.zeros(2, 3, size, size)
    )


def nodes_of(qmodel, kind):
    modules = dict(qmodel.named_modules())
    return [
        n
        for n in qmodel.graph.nodes
        if n.op == "call_module" and isinstance(modules[n.target], kind)
    ]


@pytest.mark.parametrize("name", ["cifar:resnet20", "torchvision:mobilenet_v2"])
def test_quantizers_sit_after_activations_and_every_conv_is_quantized(name):
    model, qmodel = prepared(name)
    modules = dict(qmodel.named_modules())
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert len(nodes_of(qmodel, QuantConv2d)) == convs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules())  # folded
    for node in nodes_of(qmodel, QuantConv2d):
        (user,) = node.users  # conv -> ReLU/ReLU6 -> quantizer, or conv -> quantizer
        if isinstance(modules.get(user.target), nn.ReLU | nn.ReLU6):
            (user,) = user.users
        assert isinstance(modules.get(user.target), ActQuant), f"{node.name} feeds {user.name}"
        assert isinstance(modules.get(node.args[0].target), ActQuant), (
            f"{node.name} reads an unquantized input"
        )
    for quant in nodes_of(qmodel, ActQuant):  # never a quantizer between a layer and its activation
        assert not any(isinstance(modules.get(u.target), nn.ReLU | nn.ReLU6) for u in quant.users)


def test_skip_keeps_layers_fp32_and_rejects_patterns_that_match_nothing():
    model, qmodel = prepared(skip=("conv1", "layer3.2"))  # layer3.2 covers its two convs
    assert float_convs(qmodel) == ["conv1", "layer3.2.conv1", "layer3.2.conv2"]
    assert len(nodes_of(qmodel, QuantConv2d)) + 3 == sum(
        isinstance(m, nn.Conv2d) for m in model.modules()
    )
    with pytest.raises(SettingError, match=r"skip: 'layer9\*' matches no module"):
        prepared(skip=("layer9*",))


def test_calibration_methods_give_sane_ranges():
    _, qmodel = prepared()
    batches = [torch.randn(32, 3, 16, 16)]
    scales = {
        m: calibrate(qmodel, batches, method=m, percentile=99.9)
        for m in ("minmax", "percentile", "mse")
    }
    for name, (scale, zero_point) in scales["minmax"].items():
        assert 0 < scales["percentile"][name][0] <= scale * 1.001
        assert 0 < scales["mse"][name][0] <= scale * 1.001
        if "relu" in name:
            assert zero_point == 0  # a ReLU output starts at 0: ORT folds the ReLU away
    _, trt = prepared(target="tensorrt")
    assert all(zp == 0 for _, zp in calibrate(trt, batches, method="percentile").values())


def test_state_dict_round_trip_loads_strictly_and_gives_identical_outputs(tmp_path):
    _, qmodel = prepared(skip=("fc",))
    calibrate(qmodel, [torch.randn(16, 3, 16, 16)], method="mse")
    path = save_weights(qmodel, tmp_path / "q.pt")

    def prepare(model):
        return prepare_quantized(
            model.eval(),
            target="onnxruntime-cpu",
            skip=("fc",),
            example_inputs=torch.zeros(2, 3, 16, 16),
        )

    torch.manual_seed(1)  # a different random float model: every value must come from the file
    fresh = load_weights(
        build_model("cifar:resnet20", num_classes=10), path, prepare=prepare
    ).eval()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), qmodel(x))


def test_a_pruned_network_is_prepared_the_same_way():
    import torch_pruning as tp

    model = build_model("cifar:resnet20", num_classes=10).eval()
    example = torch.zeros(1, 3, 16, 16)
    pruner = tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(),
        pruning_ratio=0.5,
        ignored_layers=[model.fc],
    )
    pruner.step()
    qmodel = prepare_quantized(
        model, target="onnxruntime-cpu", example_inputs=example.expand(2, -1, -1, -1)
    )
    assert (
        qmodel.get_submodule("layer3.0.conv1").weight.shape[0] == 32
        and len(nodes_of(qmodel, QuantConv2d)) == 21
    )


def test_check_qdq_refuses_a_float_export(tmp_path):
    model, _ = prepared()
    path = export_onnx(model, tmp_path / "fp32.onnx", image_size=16, exporter="torchscript")
    with pytest.raises(ExportError, match="no QuantizeLinear"):
        check_qdq(path, target="onnxruntime-cpu")


def three_convs() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


def optimized_convs(path, level) -> list[str]:
    """``"domain:op"`` of each convolution in ONNX Runtime's optimized graph of ``path``."""
    return [
        f"{node.domain}:{node.op_type}"
        for node in optimized_nodes(path, level)
        if "Conv" in node.op_type
    ]


def test_float_ops_are_every_op_but_quantize_dequantize_and_the_integer_kernels():
    ops = Counter(
        QuantizeLinear=4, DequantizeLinear=6, QLinearConv=3, NhwcQLinearConv=1, QLinearMul=2,
        MatMulInteger=1, ConvInteger=1, QGemm=1, Sigmoid=2, Transpose=1, Conv=1,
    )  # fmt: skip
    assert float_ops(ops) == {"Conv": 1, "Sigmoid": 2, "Transpose": 1}


@pytest.mark.parametrize("transform", [store_int8_weights, onnxruntime_qdq])
def test_the_middle_conv_kept_in_float_runs_in_float_in_onnx_runtime(tmp_path, transform):
    """Conv 2 of three is kept in float. Written as it is (per-tensor DequantizeLinear -> Conv ->
    QuantizeLinear), ONNX Runtime quantizes it on load; written with onnxruntime_qdq it stays a
    float Conv in the optimized graph, at the extended level and at the full one (NCHWc), while
    its neighbours run as integer QLinearConv; and the file computes what PyTorch does."""
    model = three_convs()
    images = torch.randn(32, 3, 8, 8)
    qmodel = prepare_quantized(
        model, target="onnxruntime-cpu", skip=("2",), example_inputs=images[:2]
    )
    calibrate(qmodel, [images], method="minmax")
    path = export_onnx(
        qmodel, tmp_path / "middle.onnx", image_size=8, exporter="torchscript", transform=transform
    )
    for level in ("ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"):
        ops = sorted(optimized_convs(path, level))
        float_op = "com.microsoft.nchwc:Conv" if level == "ORT_ENABLE_ALL" else ":Conv"
        integer_op = "com.microsoft:QLinearConv" if level == "ORT_ENABLE_ALL" else ":QLinearConv"
        if transform is onnxruntime_qdq:
            assert ops == sorted([float_op, integer_op, integer_op]), (level, ops)
        else:
            assert ops == [integer_op] * 3, (level, ops)
    result = check_qdq(path, target="onnxruntime-cpu", float_convs=float_convs(qmodel))
    requantized = 0 if transform is onnxruntime_qdq else 1
    assert result["skipped_but_quantized_by_onnxruntime"] == requantized
    assert result["fp32_conv_layers"] == (["2"] if transform is onnxruntime_qdq else [])
    # the convolution kept in float is among the ops the file runs in float
    floats = result["float_ops"]
    assert floats.get("Conv", 0) == (1 if transform is onnxruntime_qdq else 0), floats
    ours = open_session(path).run(None, {"input": images.numpy()})[0]
    with torch.no_grad():
        theirs = qmodel(images).numpy()
    assert np.abs(ours - theirs).max() <= 0.02 * np.abs(theirs).max()


def test_without_float_layers_the_onnxruntime_file_is_the_plain_one(tmp_path):
    qmodel = prepare_quantized(
        three_convs(), target="onnxruntime-cpu", example_inputs=torch.zeros(2, 3, 8, 8)
    )
    calibrate(qmodel, [torch.randn(16, 3, 8, 8)], method="minmax")
    files = [
        export_onnx(
            qmodel,
            tmp_path / f"{t.__name__}.onnx",
            image_size=8,
            exporter="torchscript",
            transform=t,
        )
        for t in (store_int8_weights, onnxruntime_qdq)
    ]
    plain, kept = (onnx.load(f) for f in files)
    assert plain.graph.SerializeToString() == kept.graph.SerializeToString()


# --- through the pipeline, on real digits ----------------------------------------------------

BASE = DIGITS_BASE | {
    "name": "quant",
    "data": DIGITS_BASE["data"] | {"subset": {"train": 600, "test": 360}},
    "stages": [
        "teacher",
        {
            "distill": {
                "loss": "kd",
                "train": {"epochs": 2, "optimizer": "adamw", "lr": 0.003, "weight_decay": 0.0},
            }
        },
        {
            "quantize": {
                "name": "ptq",
                "mode": "ptq",
                "calibration": "percentile",
                "calibration_images": 256,
            }
        },
        {
            "quantize": {
                "name": "qat",
                "mode": "qat",
                "calibration_images": 256,
                "train": {"epochs": 1, "optimizer": "adamw", "lr": 0.0005, "weight_decay": 0.0},
            }
        },
    ],
}


@pytest.fixture(scope="module")
def quant_run(tmp_path_factory, digits_teacher):
    folder = tmp_path_factory.mktemp("quant")
    path = folder / "quant.yaml"
    path.write_text(
        yaml.safe_dump(BASE | {"teacher": BASE["teacher"] | {"checkpoint": digits_teacher}})
    )
    recipe = load_recipe(path, out=str(folder / "out"))
    return recipe, run(recipe, show_progress=False)


def digit_images(quant_run):
    from compress.data.load import load_dataset
    from compress.data.loaders import test_arrays

    recipe, _ = quant_run
    data = load_dataset(recipe.data, seed=0)
    images, labels = test_arrays(data)
    mean, std = np.array(data.mean).reshape(1, -1, 1, 1), np.array(data.std).reshape(1, -1, 1, 1)
    return ((images / 255.0 - mean) / std).astype(np.float32), labels


def loaded(artifact):
    settings = artifact.metrics.get("quantization")
    model = build_model("cifar:resnet20", num_classes=10).eval()

    def prepare(m):
        return prepare_quantized(
            m,
            target=settings["target"],
            skip=tuple(settings["skip"]),
            example_inputs=torch.zeros(2, 3, 8, 8),
        )

    return load_weights(
        model, artifact.files["model"], prepare=prepare if settings else None
    ).eval()


@pytest.mark.slow
def test_ptq_stays_close_to_fp32_and_qat_keeps_it(quant_run):
    _, artifacts = quant_run
    ptq, qat = artifacts["ptq"].metrics, artifacts["qat"].metrics
    assert ptq["fp32_top1"] > 80, ptq
    assert ptq["source_stage"] == qat["source_stage"] == "distill"
    assert ptq["agreement_with_fp32"] >= 0.97 and ptq["ptq_top1"] >= ptq["fp32_top1"] - 2, ptq
    assert ptq["top1"] == ptq["ptq_top1"] and ptq["history"] == []
    assert qat["top1"] >= qat["ptq_top1"] - 1, qat
    best_ptq = max(c["holdout_top1"] for c in qat["candidates"] if c["name"] != "qat")
    trained = next(c for c in qat["candidates"] if c["name"] == "qat")
    if qat["shipped"] == "qat":  # QAT better than the best PTQ on the held-out images
        assert len(qat["history"]) == 1 and trained["holdout_top1"] > best_ptq
    else:
        assert qat["history"] == [] and trained["holdout_top1"] <= best_ptq
    settings = dict(qat["quantization"])
    assert settings.pop("calibration") in ("minmax", "percentile", "mse")  # auto's choice
    assert settings.pop("bias_correction") in (True, False)  # so is the correction
    assert settings == {
        "mode": "qat",
        "target": "onnxruntime-cpu",
        "skip": [],
        "weight_range": "pair-limit",
        "untraced_float": [],  # torch.fx traced all of it
        "percentile": 99.99,
        "calibration_images": 256,
        "integer_products": True,  # onnxruntime-cpu's default
        "product_activations": ["hardswish", "silu"],
        "float_where_slower": False,
        "float_layers_for_speed": [],
    }


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_int8_onnx_export_is_small_integer_and_matches_pytorch(quant_run, tmp_path, target):
    recipe, artifacts = quant_run
    images, _ = digit_images(quant_run)
    fp32 = loaded(artifacts["distill"])
    if target == "onnxruntime-cpu":
        qmodel = loaded(artifacts["qat"])
    else:
        qmodel = prepare_quantized(fp32, target=target, example_inputs=torch.zeros(2, 3, 8, 8))
        calibrate(qmodel, [torch.from_numpy(images[:128])], method="minmax")
    fp32_path = export_onnx(fp32, tmp_path / "fp32.onnx", image_size=8, exporter="torchscript")
    path = export_onnx(
        qmodel,
        tmp_path / "int8.onnx",
        image_size=8,
        exporter="torchscript",
        transform=store_int8_weights,
    )
    result = check_qdq(path, target=target)
    assert result["activation_type"] == ("uint8" if target == "onnxruntime-cpu" else "int8")
    assert result["int8_weights"] == 22 and result["quantize_nodes"] > 0
    assert 3.4 < fp32_path.stat().st_size / path.stat().st_size < 4.1
    if target == "onnxruntime-cpu":
        assert result["qlinear_conv"] == 21 and result["fp32_conv"] == 0
    # The onnxruntime-cpu file has portable weights: ONNX Runtime's default kernels are exact on
    # every CPU. The TensorRT file keeps full-range weights (GPU kernels add in 32 bits), which
    # x86 CPUs without VNNI saturate: it is checked with the exact u8u8 kernels on every CPU.
    ours = open_session(path, exact_int8=target == "tensorrt").run(None, {"input": images})[0]
    with torch.no_grad():
        theirs = qmodel(torch.from_numpy(images)).numpy()
    floats = open_session(fp32_path).run(None, {"input": images})[0]
    assert np.abs(ours - theirs).max() < ORT_TOLERANCE
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= ORT_MIN_AGREEMENT
    assert (ours.argmax(1) == floats.argmax(1)).mean() >= 0.92


@pytest.mark.slow
def test_skipped_convs_stay_fp32_in_onnx_runtime(quant_run, tmp_path):
    _, artifacts = quant_run
    qmodel = prepare_quantized(
        loaded(artifacts["distill"]),
        target="onnxruntime-cpu",
        skip=("conv1",),
        example_inputs=torch.zeros(2, 3, 8, 8),
    )
    calibrate(qmodel, [torch.randn(32, 3, 8, 8)], method="minmax")
    path = export_onnx(
        qmodel,
        tmp_path / "skip.onnx",
        image_size=8,
        exporter="torchscript",
        transform=store_int8_weights,
    )
    assert float_convs(qmodel) == ["conv1"]
    result = check_qdq(path, target="onnxruntime-cpu", float_convs=["conv1"])
    assert result["fp32_conv_layers"] == ["conv1"] and result["qlinear_conv"] == 20
    with pytest.raises(ExportError, match="stay FP32"):
        check_qdq(path, target="onnxruntime-cpu")


@pytest.mark.slow
def test_a_skipped_layer_between_quantized_ones_stays_float_in_onnx_runtime(quant_run, tmp_path):
    _, artifacts = quant_run
    qmodel = prepare_quantized(
        loaded(artifacts["distill"]),
        target="onnxruntime-cpu",
        skip=("layer2.0.conv1",),
        example_inputs=torch.zeros(2, 3, 8, 8),
    )
    calibrate(qmodel, [torch.randn(32, 3, 8, 8)], method="minmax")
    results = {}
    for transform in (store_int8_weights, onnxruntime_qdq):
        path = export_onnx(
            qmodel,
            tmp_path / f"{transform.__name__}.onnx",
            image_size=8,
            exporter="torchscript",
            transform=transform,
        )
        results[transform] = check_qdq(
            path, target="onnxruntime-cpu", float_convs=float_convs(qmodel)
        )
    plain, kept = results[store_int8_weights], results[onnxruntime_qdq]
    assert plain["int8_weights"] == kept["int8_weights"] == 21  # float in both files ...
    assert plain["skipped_but_quantized_by_onnxruntime"] == 1  # ONNX Runtime quantizes it ...
    assert plain["fp32_conv"] == 0 and plain["qlinear_conv"] == 21
    assert kept["skipped_but_quantized_by_onnxruntime"] == 0  # ... unless its input is per axis
    assert kept["fp32_conv_layers"] == ["layer2.0.conv1"] and kept["qlinear_conv"] == 20


@pytest.mark.slow
def test_simplified_int8_export_is_smaller_and_computes_the_same(quant_run, tmp_path):
    images, _ = digit_images(quant_run)
    qmodel = loaded(quant_run[1]["qat"])
    plain = export_onnx(
        qmodel,
        tmp_path / "plain.onnx",
        image_size=8,
        exporter="torchscript",
        transform=store_int8_weights,
    )
    slim = export_onnx(
        qmodel,
        tmp_path / "slim.onnx",
        image_size=8,
        exporter="torchscript",
        transform=store_int8_weights,
        simplify=True,
    )
    assert len(onnx.load(slim).graph.node) < len(onnx.load(plain).graph.node)
    assert check_qdq(slim, target="onnxruntime-cpu")["fp32_conv"] == 0
    ours, theirs = (open_session(p).run(None, {"input": images})[0] for p in (slim, plain))
    assert np.abs(ours - theirs).max() <= 1e-5


def narrow_bn_network(gain: float) -> nn.Module:
    """conv -> BatchNorm -> ReLU twice, then a classifier; every BatchNorm scales its conv by
    about ``gain`` (|gamma| / sqrt(running var)), as in a trained narrow network."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.weight.copy_(torch.empty(8).uniform_(0.5, 1.5) * torch.tensor([1.0, -1.0] * 4))
            bn.running_var.copy_((bn.weight / gain).square() * torch.empty(8).uniform_(0.8, 1.2))
            bn.running_mean.normal_(0, 0.1)
    return model.eval()


def test_qat_gradients_are_those_of_the_conv_with_its_batchnorm_kept_frozen():
    """SGD on a folded weight w_f = c * w (c = |gamma| / sqrt(var + eps) per channel) must move
    it as SGD on w moves c * w: the gradient of w_f is scaled by c^2. Checked against c computed
    here from the BatchNorm, through the same quantized forward pass."""
    model = narrow_bn_network(gain=0.1)
    images = torch.randn(16, 3, 8, 8)
    qmodel = prepare_quantized(model, target="onnxruntime-cpu", example_inputs=images)
    calibrate(qmodel, [images], method="minmax")
    conv, bn = qmodel.get_submodule("0"), model[1]
    gain = (bn.weight.abs() / (bn.running_var + bn.eps).sqrt()).detach().reshape(-1, 1, 1, 1)

    qmodel.train()
    qmodel(images).square().sum().backward()
    assert conv.bias.grad is not None and conv.bias.grad.abs().sum() > 0  # folded biases train

    unfolded = (conv.weight.detach() / gain).requires_grad_(True)
    qmodel.eval()  # the same weight scales, without the preconditioner
    out = torch.func.functional_call(qmodel, {"0.weight": unfolded * gain}, (images,))
    out.square().sum().backward()
    torch.testing.assert_close(conv.weight.grad, gain * unfolded.grad, rtol=1e-4, atol=1e-6)


def test_qat_trains_in_fp32_unless_the_recipe_names_a_precision():
    from compress.pipeline.config import QuantizeConfig
    from compress.training.loop import train_config_for
    from compress.training.spec import TrainConfig

    float_net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    qat_net = prepare_quantized(
        float_net, target="onnxruntime-cpu", example_inputs=torch.zeros(1, 3, 8, 8)
    )
    auto = QuantizeConfig().train
    assert train_config_for(qat_net, auto).precision == "fp32"  # auto: bf16 on a GPU otherwise
    assert train_config_for(float_net, auto) is auto  # a float network keeps auto
    chosen = TrainConfig(precision="bf16")
    assert train_config_for(qat_net, chosen) is chosen


def conv_codes_network() -> nn.Sequential:
    """Conv -> ReLU -> Conv -> ReLU -> 1x1 max-pool: the second conv's quantized output reaches
    the graph output code for code (a max-pool reuses its input's quantizer)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(1),
        nn.Flatten(),
    )
    with torch.no_grad():
        for conv in (model[0], model[2]):
            conv.bias.uniform_(-0.5, 0.5)  # far from any multiple of the int32 bias step
    return model.eval()


def test_biases_are_rounded_as_the_integer_kernel_adds_them(tmp_path):
    """ONNX Runtime fuses DQ -> Conv -> Q into a QLinearConv whose bias is int32 at scale
    input_scale * weight_scale. With a float bias the fake-quantized graph flipped 0.1-0.6% of a
    conv's output codes against ONNX Runtime's, which squeeze-excitation networks (EfficientNet)
    amplified into 30% disagreement; with the bias rounded as the kernel rounds it the codes are
    the same (a rare +-1 from float summation order aside)."""
    model = conv_codes_network()
    images = torch.randn(16, 3, 16, 16)
    qmodel = prepare_quantized(model, target="onnxruntime-cpu", example_inputs=images[:2])
    calibrate(qmodel, [images], method="minmax")
    second = qmodel.get_submodule("2")
    step = second.input_quant.scale * second.weight_scale
    steps = second.quantized_bias() / step
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    path = export_onnx(qmodel, tmp_path / "codes.onnx", image_size=16, exporter="torchscript")
    assert "com.microsoft:QLinearConv" in optimized_convs(path, "ORT_ENABLE_ALL")
    ours = open_session(path).run(None, {"input": images.numpy()})[0]
    with torch.no_grad():
        theirs = qmodel(images).numpy()
    code = np.diff(np.unique(theirs)).min()  # the output quantizer's step
    flips = np.abs(ours - theirs) > code / 2
    assert flips.mean() < 1e-4, f"{flips.sum()} of {flips.size} output codes differ"


@pytest.mark.parametrize(("size", "output"), [((2, 2), (7, 7)), ((1, 1), 6), ((5, 3), (2, 2))])
def test_the_exportable_adaptive_pool_computes_what_adaptive_avg_pool_computes(size, output):
    from compress.quantization.fake_quant import ExportableAdaptiveAvgPool2d

    x = torch.randn(2, 3, *size)
    expected = nn.functional.adaptive_avg_pool2d(x, output)
    assert torch.allclose(ExportableAdaptiveAvgPool2d(output)(x), expected, atol=1e-6)


def test_an_adaptive_pool_whose_output_does_not_divide_its_input_exports_in_int8(tmp_path):
    """AlexNet's (6, 6) and VGG's (7, 7) pools on a 2x2 map: the TorchScript exporter refused."""
    from conftest import randomised

    torch.manual_seed(0)
    model = randomised(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, stride=4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d((3, 3)),
            nn.Flatten(),
            nn.Linear(72, 10),
        )
    )
    images = torch.randn(32, 3, 8, 8)
    qmodel = prepare_quantized(model, target="onnxruntime-cpu", example_inputs=images[:2])
    calibrate(qmodel, [images], method="minmax")
    record = compress.export(qmodel, tmp_path / "pool.onnx", check_inputs=images)
    assert record["top1_agreement"] >= 0.95 and record["qdq"]["int8_weights"] == 2


# --- PTQ or QAT, decided on held-out images -------------------------------------------------


def test_calibration_auto_keeps_the_method_with_the_best_held_out_top1(trained_digits):
    model, images, labels = trained_digits
    holdout = [(images[1000:1400], labels[1000:1400])]
    with pytest.raises(ValueError, match="calibration auto keeps the method"):
        compress.quantize(model, [images[:256]], calibration="auto")
    qmodel = compress.quantize(model, [images[:256]], calibration="auto", holdout=holdout)
    tried = qmodel.calibration_candidates
    assert {c["method"] for c in tried} == {"minmax", "percentile", "mse"}
    assert tried[0]["method"] == qmodel.calibration_method
    ranks = [(c["holdout_top1"], c["holdout_agreement"], -c["holdout_kl"]) for c in tried]
    assert ranks[0] == max(ranks)  # top-1 first, then agreement, then KL from the float network
    with torch.no_grad():
        top1 = 100.0 * float((qmodel(holdout[0][0]).argmax(1) == holdout[0][1]).float().mean())
        same = float((qmodel(holdout[0][0]).argmax(1) == model(holdout[0][0]).argmax(1)).sum())
    assert top1 == pytest.approx(tried[0]["holdout_top1"])  # the shipped network is that one
    assert tried[0]["holdout_agreement"] == pytest.approx(same / 400)
    assert compress.api.holdout_scores(model, model, holdout)[1:] == (1.0, 0.0)


def test_a_held_out_top1_tie_goes_to_the_candidate_closer_to_the_float_network():
    from compress.api import holdout_rank

    assert holdout_rank(96.67, 1.0) > holdout_rank(96.67, 0.99)  # the same images right
    assert holdout_rank(97.0, 0.90) > holdout_rank(96.67, 1.0)  # top-1 decides first
    assert holdout_rank(96.67, 0.99, 0.01) > holdout_rank(96.67, 0.99, 0.02)  # then the KL
    assert holdout_rank(None, None) < holdout_rank(0.0, 0.0, 5.0)


def test_the_stage_records_every_candidate_and_never_ships_qat_below_the_best_ptq(
    tmp_path, digits_teacher
):
    raw = DIGITS_BASE | {
        "name": "candidates",
        "teacher": DIGITS_BASE["teacher"] | {"checkpoint": digits_teacher},
        "stages": [
            "teacher",
            {"distill": {"train": {"epochs": 1, "optimizer": "adamw", "lr": 0.003}}},
            {
                "quantize": {
                    "holdout_images": 120,
                    "calibration_images": 128,
                    # a learning rate that wrecks the INT8 network: QAT must not be shipped
                    "train": {"epochs": 1, "optimizer": "sgd", "lr": 5.0},
                }
            },
        ],
    }
    metrics = run_recipe(tmp_path, raw)["quantize"].metrics
    names = [c["name"] for c in metrics["candidates"]]
    assert sorted(names) == [  # each method with and without bias correction, then QAT
        "ptq-minmax", "ptq-minmax+bias", "ptq-mse", "ptq-mse+bias", "ptq-percentile",
        "ptq-percentile+bias", "qat",
    ]  # fmt: skip
    ptq_best = max(c["holdout_top1"] for c in metrics["candidates"] if c["name"] != "qat")
    qat = next(c for c in metrics["candidates"] if c["name"] == "qat")
    assert qat["holdout_top1"] <= ptq_best  # the wrecked QAT
    assert all(0 <= c["holdout_agreement"] <= 1 for c in metrics["candidates"])
    assert all(c["holdout_kl"] >= 0 for c in metrics["candidates"])
    settings = metrics["quantization"]
    bias = "+bias" if settings["bias_correction"] else ""
    assert metrics["shipped"] == f"ptq-{settings['calibration']}{bias}"
    # the shipped network's correction is recorded, with what each of its rounds found
    assert ("bias_correction" in metrics) is settings["bias_correction"]
    assert metrics["history"] == [] and metrics["top1"] == pytest.approx(metrics["ptq_top1"])
    for candidate in metrics["candidates"]:
        assert 0 <= candidate["agreement_with_fp32"] <= 1 and candidate["test_top1"] >= 0


@pytest.mark.parametrize(
    ("settings", "best_ptq", "float_holdout", "expected"),
    [
        ({"mode": "qat"}, 90.0, 90.0, True),  # asked for
        ({"mode": "qat", "train": {"epochs": 0}}, 80.0, 90.0, False),  # no epochs: nothing to run
        ({"mode": "ptq"}, 80.0, 90.0, False),  # no budget: PTQ as asked
        ({"mode": "ptq", "max_drop": 0.5}, 89.6, 90.0, False),  # PTQ within the budget
        ({"mode": "ptq", "max_drop": 0.5}, 89.0, 90.0, True),  # PTQ misses it: QAT first
    ],
)
def test_qat_runs_when_asked_or_when_ptq_misses_the_budget(
    monkeypatch, settings, best_ptq, float_holdout, expected
):
    from compress import api
    from compress.pipeline.recipe.load import recipe_from_dict
    from compress.pipeline.stages.quantize import wants_qat

    raw = {"name": "t", "stages": ["teacher", "distill", {"quantize": settings}]}
    cfg = recipe_from_dict(raw, source="t.yaml").stages[2].config
    monkeypatch.setattr(api, "holdout_top1", lambda network, holdout: float_holdout)
    assert wants_qat(cfg, best_ptq, nn.Identity(), [(torch.zeros(1), torch.zeros(1))]) is expected


def test_qat_is_taught_by_the_float_student_unless_a_stage_is_named(tmp_path):
    from compress.errors import RecipeError
    from compress.pipeline.recipe.load import recipe_from_dict

    stages = ["teacher", "distill", "quantize"]
    assert (
        recipe_from_dict({"name": "t", "stages": stages}, source="t.yaml").stages[2].config.teacher
        == "self"
    )
    named = ["teacher", "distill", {"quantize": {"teacher": "teacher"}}]
    assert (
        recipe_from_dict({"name": "t", "stages": named}, source="t.yaml").stages[2].config.teacher
        == "teacher"
    )
    # "self" names the student only where a stage quantizes it
    with pytest.raises(RecipeError, match=r"stages\[1\]\.distill\.teacher: expected an earlier"):
        recipe_from_dict(
            {"name": "t", "stages": ["teacher", {"distill": {"teacher": "self"}}]}, source="t.yaml"
        )


def test_hard_swish_and_gate_products_run_as_integer_products_in_onnx_runtime(tmp_path):
    """MobileNetV3's hard-swishes and squeeze-excitation gates are products of activations:
    quantized like ONNX Runtime's own PTQ does it (both factors and the product), they become
    QLinearMul, and no float activation between integer kernels forces layout transposes."""
    torch.manual_seed(0)
    model = build_model("torchvision:mobilenet_v3_small", num_classes=10).eval()
    images = torch.randn(16, 3, 64, 64)
    qmodel = compress.quantize(model, [images], calibration="minmax")
    modules = dict(qmodel.named_modules())
    assert not any(
        node.op == "call_module" and isinstance(modules[node.target], nn.Hardswish)
        for node in qmodel.graph.nodes
    )  # each written as x * hardsigmoid(x)
    products = [
        node
        for node in qmodel.graph.nodes
        if node.op == "call_function" and node.target.__name__ == "mul"
    ]
    # every product but the classifier's hard-swish (between two float-output linears) is
    # quantized: its factors and its result pass through quantizers
    quantized = [
        node
        for node in products
        if all(arg.op == "call_module" and arg.target.startswith("quant_") for arg in node.args)
    ]
    assert len(quantized) == len(products) - 1
    path = tmp_path / "mv3.onnx"
    record = compress.export(qmodel, path, check_inputs=images)
    assert record["top1_agreement"] == 1.0
    ops = [node.op_type for node in optimized_nodes(path, "ORT_ENABLE_EXTENDED")]
    assert ops.count("QLinearMul") == len(quantized)
    assert ops.count("Transpose") <= 2  # the network's input and output ends only
    assert "HardSwish" not in ops


def test_silu_and_its_gates_run_as_integer_tables_and_products_in_onnx_runtime(tmp_path):
    """EfficientNet's SiLUs (``x * sigmoid(x)``) and squeeze-excitation gates, quantized like
    ONNX Runtime's own PTQ does it: every sigmoid runs as a ``QLinearSigmoid`` table, every
    product as ``QLinearMul``, no float activation is left between the integer kernels. Left
    whole (before), each SiLU ran in float between Dequantize and Quantize with layout
    transposes around it, and the INT8 file was 1.6x slower than the FP32 one at batch 16."""
    torch.manual_seed(0)
    model = build_model("torchvision:efficientnet_b0", num_classes=10).eval()
    images = torch.randn(16, 3, 32, 32)
    silus = sum(isinstance(m, nn.SiLU) for m in model.modules())
    gates = sum(isinstance(m, nn.Sigmoid) for m in model.modules())  # squeeze-excitation
    qmodel = compress.quantize(model, [images], calibration="minmax")
    assert qmodel.quant_spec.product_activations == ("hardswish", "silu")
    modules = dict(qmodel.named_modules())
    assert not any(isinstance(modules.get(n.target), nn.SiLU) for n in qmodel.graph.nodes)
    path = tmp_path / "effnet.onnx"
    compress.export(qmodel, path, check_inputs=images)  # raises unless the file is proven
    ops = Counter(node.op_type for node in optimized_nodes(path, "ORT_ENABLE_EXTENDED"))
    assert ops["QLinearSigmoid"] == ops["QLinearMul"] == silus + gates
    assert "Sigmoid" not in ops and "Mul" not in ops
    assert ops["Transpose"] <= 2  # the network's input and output ends only


def test_integer_products_off_keeps_hard_swish_whole_and_old_records_rebuild_without_them():
    from compress.core.records import QuantSpec

    torch.manual_seed(0)
    model = build_model("torchvision:mobilenet_v3_small", num_classes=10).eval()
    images = torch.randn(8, 3, 64, 64)
    off = compress.quantize(model, [images], calibration="minmax", integer_products=False)
    on = compress.quantize(model, [images], calibration="minmax")  # onnxruntime-cpu: on
    assert (off.quant_spec.integer_products, on.quant_spec.integer_products) == (False, True)
    modules = dict(off.named_modules())
    assert any(isinstance(modules.get(n.target), nn.Hardswish) for n in off.graph.nodes)
    assert len(on.state_dict()) > len(off.state_dict())  # the products' quantizers
    # a network recorded before the setting existed was quantized without them
    assert QuantSpec.from_json({"target": "onnxruntime-cpu"}).integer_products is False
    # and one recorded before SiLU was written as a product, with the hard-swish's alone: it
    # is rebuilt with its SiLUs whole, so its saved values load strictly
    before_silu = QuantSpec.from_json({"target": "onnxruntime-cpu", "integer_products": True})
    assert before_silu.product_activations == ("hardswish",)
    assert on.quant_spec.product_activations == ("hardswish", "silu")
    assert off.quant_spec.product_activations == ()
    effnet = build_model("torchvision:efficientnet_b0", num_classes=10).eval()
    old = prepare_quantized(
        effnet,
        target="onnxruntime-cpu",
        example_inputs=images[:2, :, :32, :32],
        integer_products=True,
        product_activations=before_silu.product_activations,
    )
    modules = dict(old.named_modules())
    assert any(isinstance(modules.get(n.target), nn.SiLU) for n in old.graph.nodes)
    trt = compress.quantize(model, [images], calibration="minmax", target="tensorrt")
    assert trt.quant_spec.integer_products is False


def test_default_qat_stays_near_ptq_where_sgd_is_thrown_by_large_batchnorm_gains():
    """A depthwise channel whose BatchNorm saw almost no variance folds in a gain of ~100, and
    QAT's gradient preconditioning (gain squared, so the folded weights move as the unfolded
    ones would) turns SGD's 0.001 into 10 for it. The stage's default, AdamW at a small rate,
    normalises each weight's step and stays near the PTQ network it started from (measured:
    KL from the float network 2.2x PTQ's by default, 19x with SGD at 0.001)."""
    import copy
    import dataclasses

    from compress import api
    from compress.pipeline.config import QuantizeConfig
    from compress.quantization.fake_quant import clone

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    ).train()  # fmt: skip
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(64, 3, 8, 8))
        model.eval()[4].running_var[:4] = 1e-4  # four nearly constant depthwise channels
    images, labels = torch.randn(256, 3, 8, 8), torch.randint(0, 4, (256,))
    batches = [(images[i : i + 32], labels[i : i + 32]) for i in range(0, 256, 32)]
    held = [(torch.randn(128, 3, 8, 8), torch.randint(0, 4, (128,)))]
    ptq = compress.quantize(model, [images])
    kd = [compress.loss("kd", temperature=4, alpha=0.9)]

    def kl_after_qat(**settings) -> float:
        qat = clone(ptq).train()
        settings = {"epochs": 3} | settings
        compress.distill(
            qat, copy.deepcopy(model), batches, losses=kd, recalibrate_batchnorm=False, **settings
        )
        return api.holdout_scores(qat.eval(), model, held)[2]

    start = api.holdout_scores(ptq, model, held)[2]
    default = dataclasses.asdict(QuantizeConfig().train) | {"epochs": 3}
    assert kl_after_qat(**default) < 4 * start
    assert kl_after_qat(optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=0.0) > 8 * start


class LayerScaled(nn.Module):
    """A convolution whose output is scaled per channel by a learned ``gamma`` (timm's
    LayerScale in FastViT and EfficientFormer), then a hard-swish: one product of an activation
    with a weight, one of two activations."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((8,), 0.5))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.conv(x) * self.gamma.view(1, -1, 1, 1)
        return self.head(nn.functional.hardswish(x)).mean((2, 3))


def test_a_layer_scale_is_a_weight_not_a_second_activation_to_quantize(tmp_path):
    torch.manual_seed(0)
    model = LayerScaled().eval()
    images = torch.randn(32, 3, 8, 8)
    qmodel = prepare_quantized(model, target="onnxruntime-cpu", example_inputs=images[:2])
    calibrate(qmodel, [images], method="minmax")
    modules = dict(qmodel.named_modules())
    quantized = {
        n.args[0].name
        for n in qmodel.graph.nodes
        if n.op == "call_module" and isinstance(modules[n.target], ActQuant)
    }
    assert not any("gamma" in name or name.startswith("view") for name in quantized)
    assert any(n.target is torch.mul or n.target == operator.mul for n in qmodel.graph.nodes)
    record = compress.export(qmodel, tmp_path / "scaled.onnx", check_inputs=images)
    assert record["qdq"]["int8_weights"] == 2  # the two convolutions; gamma stays a float scale


def test_no_pixel_of_an_8_bit_image_sits_on_a_rounding_tie_of_the_input_quantizer():
    """Images normalised to [-1, 1] (mean 0.5, std 0.5) quantized over their plain range have a
    zero point of 127.5, rounded: every pixel lands half-way between two codes, black on a tie
    that float error decides either way (1e-6 of input noise moved every image of an INT8
    MNASNet). The input's lowest value now gets an exact code and no pixel is near a tie."""
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (16, 3, 8, 8))
    pixels[:, :, :2] = 0  # a black border: the most common value, and the lowest
    images = (pixels / 255 - 0.5) / 0.5
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)
    ).eval()
    qmodel = compress.quantize(net, [images])
    (quantizer,) = [m for m in qmodel.modules() if isinstance(m, ActQuant) and m.network_input]
    codes = images / quantizer.scale + quantizer.zero_point
    assert codes.min().item() == pytest.approx(0, abs=1e-4)  # black, exactly
    assert codes.max().item() <= 255
    assert ((codes - codes.floor()) - 0.5).abs().min().item() > 1e-3  # no pixel on a tie
    noisy = images * (1 + 1e-6 * torch.randn(images.shape))
    assert torch.equal(quantizer(noisy), quantizer(images))  # float noise moves no code
    assert quantizer.scale.item() == pytest.approx(2 / 255, rel=1 / 64)  # barely coarser
