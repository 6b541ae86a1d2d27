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
