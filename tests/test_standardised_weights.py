"""Weight-standardised convolutions (timm's StdConv2d, ScaledStdConv2d: NF-ResNet, NFNet, BiT)
quantize as the plain convolutions they compute, so ONNX Runtime runs them as QLinearConv; and
layers with equal weights (zero-initialised ones of an untrained network) export; and a
pruned one keeps each channel's gain."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from torch import nn

import compress
from compress.core.compat import torchvision  # noqa: F401  (before timm: its CPU import)
from compress.nets.weights import load_weights, save_weights, structure_of
from compress.quantization.standardised_weights import with_plain_convolutions

timm_layers = pytest.importorskip("timm.layers")


def standardised_net(*convs: nn.Module) -> nn.Module:
    """``convs`` (default: a ScaledStdConv2d and a StdConv2d), each followed by a ReLU, then a
    10-way classifier; each gain as trained ones are (one per channel), each bias the channel's
    number (which channel it is, after a cut)."""
    torch.manual_seed(0)  # the default layers' weights; callers seed their own
    convs = convs or (
        timm_layers.ScaledStdConv2d(3, 8, 3, padding=1),
        timm_layers.StdConv2d(8, 16, 3, padding=1),
    )
    layers = [layer for conv in convs for layer in (conv, nn.ReLU())]
    net = nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(convs[-1].out_channels, 10)
    )
    with torch.no_grad():
        for conv in convs:
            if hasattr(conv, "gain"):
                conv.gain.uniform_(0.5, 2.0)
            if conv.bias is not None:
                conv.bias.copy_(torch.arange(conv.out_channels))
    return net.eval()


def test_the_plain_convolutions_compute_what_the_standardised_ones_do():
    net = standardised_net()
    plain = with_plain_convolutions(net)
    assert [type(m).__name__ for m in plain[:3]] == ["Conv2d", "ReLU", "Conv2d"]
    assert type(net[0]).__name__ == "ScaledStdConv2d"  # the network itself is left alone
    images = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(plain(images), net(images), atol=1e-5, rtol=1e-5)


def test_a_standardised_network_exports_int8_convolutions(tmp_path):
    net = standardised_net()
    images = torch.randn(64, 3, 8, 8)
    qmodel = compress.quantize(net, [images[:32]])
    record = compress.export(qmodel, tmp_path / "std.onnx", check_inputs=images)
    assert record["qdq"]["qlinear_conv"] == 2 and record["qdq"]["fp32_conv"] == 0


def test_equal_weights_export_under_names_of_their_own(tmp_path):
    """Two layers with the same weights, which the exporter shares as one constant: each is
    quantized, under a name of its own (it failed the ONNX checker: 'initializer name is not
    unique')."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        conv,
        nn.ReLU(),
        copy.deepcopy(conv),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    ).eval()
    images = torch.randn(64, 3, 8, 8)
    qmodel = compress.quantize(net, [images[:32]])
    record = compress.export(qmodel, tmp_path / "twins.onnx", check_inputs=images)
    assert record["qdq"]["qlinear_conv"] == 3
    weights = onnx.load(tmp_path / "twins.onnx").graph.initializer
    int8 = [w.name for w in weights if w.data_type == onnx.TensorProto.INT8 and len(w.dims) > 1]
    assert len(int8) == len(set(int8)) >= 3  # unique names (the twins' weight was shared)


def prunable_standardised_net() -> nn.Module:
    torch.manual_seed(0)
    return standardised_net(
        timm_layers.ScaledStdConv2d(3, 16, 3, padding=1),
        timm_layers.ScaledStdConv2d(16, 32, 3, padding=1),
        timm_layers.ScaledStdConv2d(32, 32, 3, padding=1, groups=32),  # depthwise
        timm_layers.ScaledStdConv2d(32, 32, 1),
    )


def test_pruning_cuts_each_gain_with_its_channels():
    """Torch-Pruning cuts a convolution's weight and bias only: the gain of ScaledStdConv2d stayed
    at the old width and the next forward broke (NF-ResNet-26 was refused). Each channel kept
    keeps its own gain; and every layer is cut (traced with its weight's standardisation, all
    but the last kept their width)."""
    net = prunable_standardised_net()
    before = copy.deepcopy(net)
    example = torch.randn(2, 3, 16, 16)
    compress.prune(net, example, compress.PruneSpec(speedup=1.5))
    for old, new in zip(before[:8:2], net[:8:2], strict=True):
        assert new.out_channels < old.out_channels  # the depthwise one too
        kept = new.bias.round().long()  # each channel's bias was its number before the cut
        torch.testing.assert_close(new.gain, old.gain[kept])
    with torch.no_grad():
        assert net(example).shape == (2, 10)


def test_a_pruned_standardised_network_reloads_identically(tmp_path):
    net = prunable_standardised_net()
    example = torch.randn(2, 3, 16, 16)
    compress.prune(net, example, compress.PruneSpec(speedup=1.5))
    path = save_weights(net, tmp_path / "model.pt", structure=structure_of(net))
    fresh = load_weights(prunable_standardised_net(), path).eval()
    assert [len(conv.gain) for conv in fresh[:8:2]] == [len(conv.gain) for conv in net[:8:2]]
    with torch.no_grad():
        assert torch.equal(fresh(example), net(example))
