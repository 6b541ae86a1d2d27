"""Multi-branch blocks (timm's RepVGG, MobileOne, FastViT, RepViT) are quantized in the form they
are deployed in: one convolution per block, folded from the trained branches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compress
from compress.core.compat import torchvision  # noqa: F401  (before timm: its CPU import)
from compress.quantization.fake_quant import QuantConv2d

byobnet = pytest.importorskip("timm.models.byobnet")


def multi_branch_net() -> nn.Module:
    """Two MobileOne blocks (a 3x3 and a 1x1 branch and an identity, each with BatchNorm) with
    BatchNorm statistics as training leaves them."""
    torch.manual_seed(0)
    net = nn.Sequential(
        byobnet.MobileOneBlock(3, 8, 3, num_conv_branches=2),
        byobnet.MobileOneBlock(8, 8, 3, num_conv_branches=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    return net.eval()


def test_each_block_is_quantized_as_the_one_convolution_it_folds_into(tmp_path):
    net = multi_branch_net()
    branches = sum(isinstance(m, nn.Conv2d) for m in net.modules())
    images = torch.randn(64, 3, 8, 8)
    qmodel = compress.quantize(net, [images[:32]])
    convs = [m for m in qmodel.modules() if isinstance(m, nn.Conv2d)]
    assert branches == 6 and len(convs) == 2  # 3 branches per block before, one conv after
    assert all(isinstance(conv, QuantConv2d) for conv in convs)
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == branches  # net left alone
    with torch.no_grad():
        assert (qmodel(images).argmax(1) == net(images).argmax(1)).float().mean() >= 0.9
    record = compress.export(qmodel, tmp_path / "folded.onnx", check_inputs=images)
    assert record["qdq"]["qlinear_conv"] == 2 and record["qdq"]["fp32_conv"] == 0


def test_a_pruned_block_timm_cannot_fold_is_quantized_as_its_branches(tmp_path):
    """timm folds from attributes a block was built with: a depthwise MobileOne block whose
    channels were cut keeps its old ``groups``, and its fold divided by zero (the sweep's
    MobileOne-S0 crashed in quantize). Such a block stays as its branches; the others fold."""
    torch.manual_seed(0)
    net = nn.Sequential(
        byobnet.MobileOneBlock(3, 16, 3, num_conv_branches=2),
        byobnet.MobileOneBlock(16, 16, 3, group_size=1, num_conv_branches=2),  # depthwise
        byobnet.MobileOneBlock(16, 16, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()
    images = torch.randn(64, 3, 8, 8)
    compress.prune(net, images[:2], compress.PruneSpec(speedup=1.5, round_to=1))
    assert net[1].groups == 16 > net[1].conv_kxk[0].conv.groups  # the stale attribute
    qmodel = compress.quantize(net, [images[:32]])
    convs = [name for name, m in qmodel.named_modules() if isinstance(m, nn.Conv2d)]
    assert any(name.startswith("1.conv_kxk") for name in convs)  # the pruned block: branches
    assert not any(name.startswith("0.conv_kxk") for name in convs)  # the others: folded
    record = compress.export(qmodel, tmp_path / "pruned.onnx", check_inputs=images)
    assert record["qdq"]["fp32_conv"] == 0


def test_a_saved_quantized_network_with_folded_blocks_reloads_as_the_stages_do(tmp_path):
    """A stage's INT8 network is rebuilt from a freshly built float network, resized to the pruned
    widths (uninitialised tensors), prepared on zeros, then loaded: the preparation must fold the
    same blocks whatever those weights hold, or the saved state does not fit."""
    from compress.nets.weights import load_weights, save_weights, structure_of
    from compress.quantization.fake_quant import prepare_quantized

    net = multi_branch_net()
    images = torch.randn(64, 3, 8, 8)
    compress.prune(net, images[:2], compress.PruneSpec(speedup=1.5, round_to=1))
    qmodel = compress.quantize(net, [images[:32]])
    path = save_weights(qmodel, tmp_path / "model.pt", structure=structure_of(net))

    def prepare(model):
        zeros = torch.zeros(2, 3, 8, 8)
        return prepare_quantized(model.eval(), target="onnxruntime-cpu", example_inputs=zeros)

    rebuilt = load_weights(multi_branch_net(), path, prepare=prepare).eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), qmodel.eval()(images))


def test_a_float_export_writes_each_block_as_one_convolution(tmp_path):
    """The FP32 file is the deployed network too (three convolutions per block run as one), and it
    is proven against the network with its branches, which is left as it was."""
    import onnx

    net = multi_branch_net()
    images = torch.randn(16, 3, 8, 8)
    record = compress.export(net, tmp_path / "float.onnx", check_inputs=images)
    convs = [n for n in onnx.load(tmp_path / "float.onnx").graph.node if n.op_type == "Conv"]
    assert len(convs) == 2  # six branch convolutions folded into two
    assert record["max_abs_diff"] <= 1e-4
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 6
