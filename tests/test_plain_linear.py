"""timm's ``Linear`` (MobileNetV3's, LCNet's, GhostNet's classifier) is an ``nn.Linear`` subclass
that ``torch.fx`` traced into a bare ``linear`` call, so the classifier stayed float; held by a
plain ``nn.Linear`` it is quantized, and the file is proven like any other."""

import pytest
import torch
from conftest import randomised, rebuilt_as_stages_do
from torch import nn

import compress
from compress.quantization.fake_quant import quantized_layers
from compress.quantization.plain_linear import plain_subclass, with_plain_linears

pytestmark = [pytest.mark.usefixtures("one_thread")]


def mobilenet_v3() -> nn.Module:
    pytest.importorskip("timm")
    from compress.nets.models import build_model

    torch.manual_seed(0)
    return randomised(build_model("timm:mobilenetv3_small_050", num_classes=10).eval())


def test_the_plain_copy_computes_the_same_under_the_same_names():
    model = mobilenet_v3()
    assert plain_subclass(model.classifier)
    plain = with_plain_linears(model)
    assert type(plain.classifier) is nn.Linear
    assert plain_subclass(model.classifier)  # the caller's network is not modified
    assert plain.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)


def test_other_linear_subclasses_and_plain_networks_are_left_as_they_are():
    class Scaled(nn.Linear):  # a forward of its own: not what nn.Linear computes
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Linear(4, 4), Scaled(4, 2))
    assert not any(plain_subclass(m) for m in model.modules())
    assert with_plain_linears(model) is model


def test_timm_mobilenet_v3_classifier_is_int8_and_its_file_is_proven(tmp_path):
    model = mobilenet_v3()
    images = torch.randn(48, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    qmodel = compress.quantize(model, [images[:32]])
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert "classifier" in quantized_layers(qmodel)
    assert len(quantized_layers(qmodel)) == len(layers)
    record = compress.export(qmodel, tmp_path / "model.onnx", check_inputs=images[32:])
    assert record["qdq"]["int8_weights"] == len(layers) and record["portability"]["portable"]
    rebuilt = rebuilt_as_stages_do(qmodel, model, mobilenet_v3, 64, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), qmodel(images))
