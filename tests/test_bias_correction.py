"""Bias correction (compress.quantization.bias_correction): each layer's bias takes back the mean
error of its own INT8 rounding, the INT8 network gets closer to the float one, the file still
exports exactly, and PTQ candidates are tried with and without it where held-out images decide.
"""

import pytest
import torch
from torch import nn

import compress
from compress.nets.models import build_model
from compress.quantization.bias_correction import _biased_layers, correct_bias, layer_errors
from compress.quantization.fake_quant import calibrate, clone, prepare_quantized


def float_network(name: str, size: int = 32) -> nn.Module:
    """A seeded network whose BatchNorm statistics come from images (not the identity: a fresh
    BatchNorm makes every channel's mean 0, which hides a shift)."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, cifar_stem=True).train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(32, 3, size, size))
    return model.eval()


def calibrated(model: nn.Module, batches, method: str = "minmax"):
    qmodel = prepare_quantized(model, target="onnxruntime-cpu", example_inputs=batches[0])
    calibrate(qmodel, batches, method=method)
    return qmodel


def error_vs_float(qmodel, model, images) -> float:
    with torch.no_grad():
        return float((qmodel(images) - model(images)).square().mean())


@pytest.mark.parametrize("name", ["torchvision:mobilenet_v2", "cifar:resnet20"])
def test_correction_removes_each_layers_mean_error_and_brings_the_network_closer_to_float(name):
    model = float_network(name)
    torch.manual_seed(1)
    batches = [torch.randn(32, 3, 32, 32) for _ in range(4)]
    unseen = torch.randn(128, 3, 32, 32)  # not the calibration images
    before = calibrated(model, batches)
    after = clone(before)
    record = correct_bias(after, batches, rounds=2)
    assert after.bias_correction is record and record.layers == len(_biased_layers(after))
    # the second round finds far less to correct than the first: the correction converged
    assert record.relative_shifts[1] < 0.3 * record.relative_shifts[0]
    # measured against the float biases, what each layer's own rounding leaves is near zero
    layers = _biased_layers(after)
    float_biases = {n: m.bias.detach().clone() for n, m in _biased_layers(before).items()}
    left = layer_errors(after, layers, float_biases, batches)
    first = layer_errors(before, _biased_layers(before), float_biases, batches)
    assert sum(float(s.abs().mean()) for s, _ in left.values()) < 0.3 * sum(
        float(s.abs().mean()) for s, _ in first.values()
    )
    # and the whole network computes closer to the float one on images it never saw
    # (measured: 75x smaller squared error on MobileNetV2, 1.4x on ResNet-20)
    assert error_vs_float(after, model, unseen) < 0.9 * error_vs_float(before, model, unseen)


def test_layers_without_a_bias_keep_none_and_the_saved_parameters_keep_their_names():
    model = nn.Sequential(  # no BatchNorm to fold: the first conv has no bias at all
        nn.Conv2d(3, 8, 3, bias=False), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()  # fmt: skip
    torch.manual_seed(0)
    batches = [torch.randn(16, 3, 12, 12)]
    qmodel = calibrated(model, batches)
    keys = set(qmodel.state_dict())
    record = correct_bias(qmodel, batches)
    assert qmodel.get_submodule("0").bias is None
    assert record.layers == 2  # the second conv and the linear layer
    assert set(qmodel.state_dict()) == keys
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        correct_bias(qmodel, batches, rounds=0)


def test_a_corrected_network_exports_and_the_file_reproduces_it(tmp_path):
    model = float_network("torchvision:mobilenet_v2", size=16)
    torch.manual_seed(2)
    batches = [torch.randn(32, 3, 16, 16) for _ in range(2)]
    qmodel = calibrated(model, batches, method="percentile")
    shifted = {n: m.bias.detach().clone() for n, m in _biased_layers(qmodel).items()}
    correct_bias(qmodel, batches)
    layers = _biased_layers(qmodel)
    moved = sum(float((m.bias.detach() - shifted[n]).abs().max()) > 0 for n, m in layers.items())
    assert moved > 40  # of 53 layers with a bias
    record = compress.export(qmodel, tmp_path / "corrected.onnx", check_inputs=batches[0])
    assert record["qdq"]["int8_weights"] > 0
    assert record["max_rel_diff"] <= 0.2  # within the export check's own tolerance


def test_corrected_biases_are_saved_and_a_rebuilt_network_computes_the_same(tmp_path):
    from compress.nets.weights import load_weights, save_weights

    model = float_network("cifar:resnet20", size=16)
    batches = [torch.randn(16, 3, 16, 16)]
    qmodel = calibrated(model, batches)
    correct_bias(qmodel, batches)
    path = save_weights(qmodel, tmp_path / "model.pt")
    rebuilt = load_weights(
        float_network("cifar:resnet20", size=16),
        path,
        prepare=lambda m: prepare_quantized(m, target="onnxruntime-cpu", example_inputs=batches[0]),
    ).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(batches[0]), qmodel(batches[0]))


def test_candidates_with_and_without_correction_where_held_out_images_decide(trained_digits):
    model, images, labels = trained_digits
    calibration, holdout = [images[:256]], [(images[1000:1400], labels[1000:1400])]

    qmodel = compress.quantize(model, calibration, calibration="minmax", holdout=holdout)
    tried = qmodel.calibration_candidates
    assert [(c["method"], c["bias_corrected"]) for c in tried] in (
        [("minmax", False), ("minmax", True)],
        [("minmax", True), ("minmax", False)],
    )
    ranks = [(c["holdout_top1"], c["holdout_agreement"], -c["holdout_kl"]) for c in tried]
    assert ranks[0] == max(ranks)
    assert hasattr(qmodel, "bias_correction") is tried[0]["bias_corrected"]

    never = compress.quantize(
        model, calibration, calibration="minmax", holdout=holdout, bias_correction=False
    )
    assert [c["bias_corrected"] for c in never.calibration_candidates] == [False]
    assert not hasattr(never, "bias_correction")
    # without held-out images nothing can decide: off unless asked for
    unasked = compress.quantize(model, calibration, calibration="minmax")
    assert not hasattr(unasked, "bias_correction")
    always = compress.quantize(model, calibration, calibration="minmax", bias_correction=True)
    assert always.bias_correction.layers > 0
    assert [c["bias_corrected"] for c in always.calibration_candidates] == [True]


def test_the_accuracy_budget_corrects_each_recalibrated_network_again(monkeypatch):
    """After PTQ, keep_float calibrates each network with more float layers again; a shipped
    bias-corrected candidate's networks are corrected again too (the float layers' biases
    would otherwise keep corrections made for rounded weights)."""
    from compress import api
    from compress.quantization import budget

    model = float_network("cifar:resnet20", size=16)
    batches = [torch.randn(16, 3, 16, 16)]
    qmodel = calibrated(model, batches)
    seen = {}

    def search(qmodel, model, holdout, *, recalibrate, **_):
        network = clone(qmodel)
        recalibrate(network)
        seen["corrected"] = getattr(network, "bias_correction", None)
        network.accuracy_budget = None
        return network, None

    monkeypatch.setattr(budget, "keep_float", search)
    holdout = [(batches[0], torch.zeros(16, dtype=torch.long))]
    api.keep_float(qmodel, model, holdout, max_drop=0.5, calibration_data=batches)
    assert seen["corrected"] is None
    api.keep_float(
        qmodel, model, holdout, max_drop=0.5, calibration_data=batches, bias_correction=True
    )
    assert seen["corrected"] is not None and seen["corrected"].layers > 0
