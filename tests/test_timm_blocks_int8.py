"""timm's blocks that ``torch.fx`` cannot trace (TinyViT's windows, MobileViT's patches,
EfficientViT's linear attention) are swapped for twins that compute the same thing and trace, so
INT8 reaches every layer of those networks and the exported file is proven like any other."""

import functools

import pytest
import torch
from conftest import randomised, rebuilt_as_stages_do
from torch import nn

import compress
from compress.quantization.fake_quant import quantized_layers
from compress.quantization.lite_mla import TracedLiteMLA
from compress.quantization.mobile_vit_block import TracedMobileVitBlock, TracedMobileVitV2Block
from compress.quantization.timm_blocks import TRACED_TWINS, with_traced_timm_blocks
from compress.quantization.tiny_vit_block import TracedTinyVitBlock

pytestmark = [pytest.mark.usefixtures("one_thread")]

# network: the twin its blocks become, how many, all its Conv2d and Linear layers, and whether
# its random weights are given logits of order 1 (conftest.randomised) for the export check. An
# untrained network's top-1 is chaotic or not by chance, and the check refuses a chaotic one
# (tested in test_export): as built, MobileViT's top-1 flips under inputs changed by 1e-6;
# randomised, TinyViT's does.
NETWORKS = {
    "timm:tiny_vit_5m_224": (TracedTinyVitBlock, 10, 68, False),
    "timm:mobilevit_xxs": (TracedMobileVitBlock, 3, 72, True),
    "timm:mobilevitv2_050": (TracedMobileVitV2Block, 3, 65, True),
    "timm:efficientvit_b0": (TracedLiteMLA, 4, 52, True),
}


def timm_network(name: str, size: int) -> nn.Module:
    pytest.importorskip("timm")
    from compress.nets.models import build_model

    torch.manual_seed(0)
    model = build_model(name, num_classes=10, image_size=size).eval()
    for parameter_name, parameter in model.named_parameters():
        if "attention_biases" in parameter_name:  # TinyViT's: timm starts them at zero
            nn.init.normal_(parameter)
    return model


def test_every_twin_is_declared_once_and_only_for_timm_blocks():
    assert len(set(TRACED_TWINS.values())) == len(TRACED_TWINS)
    assert all(module.startswith("timm.models.") for module, _ in TRACED_TWINS)


@pytest.mark.parametrize(
    "name,size",
    [
        ("timm:tiny_vit_5m_224", 64),  # maps padded to whole windows
        ("timm:tiny_vit_5m_224", 224),  # maps of one window
        ("timm:mobilevit_xxs", 64),
        ("timm:mobilevit_xxs", 72),  # 9x9 maps: resized to whole patches and back
        ("timm:mobilevitv2_050", 64),
        ("timm:mobilevitv2_050", 80),  # 5x5 maps: resized up to whole patches
        ("timm:efficientvit_b0", 64),
    ],
)
def test_a_traced_twin_computes_what_the_timm_block_computes(name, size):
    model = timm_network(name, size)
    twin, count, _, _ = NETWORKS[name]
    traced = with_traced_timm_blocks(model)
    assert sum(isinstance(m, twin) for m in traced.modules()) == count
    assert not any(isinstance(m, twin) for m in model.modules())  # the caller's is untouched
    # the same modules under the same names: a user's quantize.skip names what they see
    assert [n for n, _ in traced.named_modules()] == [n for n, _ in model.named_modules()]
    assert traced.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=1e-5)


def test_a_network_without_such_blocks_is_returned_as_it_is():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    assert with_traced_timm_blocks(model) is model


@pytest.mark.parametrize("name", NETWORKS)
def test_every_layer_of_a_hybrid_timm_network_is_int8_and_its_file_is_proven(tmp_path, name):
    """Untraceable, these blocks were kept whole and float: TinyViT-5M had 18 of its 68 layers
    INT8, MobileViT-XXS 24 of 72, MobileViTV2-050 20 of 65, EfficientViT-B0 36 of 52."""
    _, _, layers, randomise = NETWORKS[name]
    model = timm_network(name, 64)
    model = randomised(model) if randomise else model
    images = torch.randn(48, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    qmodel = compress.quantize(model, [images[:32]])
    assert not qmodel.untraced
    convs_and_linears = [
        n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    assert len(quantized_layers(qmodel)) == len(convs_and_linears) == layers
    # written only when ONNX Runtime reproduces the fake-quantized network (export's own check)
    record = compress.export(qmodel, tmp_path / "model.onnx", check_inputs=images[32:])
    assert record["qdq"]["int8_weights"] == layers and record["portability"]["portable"]


def test_a_saved_int8_mobile_vit_reloads_as_the_stages_do(tmp_path):
    """A stage's INT8 network is rebuilt from a fresh float network prepared on zeros, then
    loaded: the twins must give the state the saved network had."""
    model = timm_network("timm:mobilevit_xxs", 64)
    images = torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    qmodel = compress.quantize(model, [images])
    build = functools.partial(timm_network, "timm:mobilevit_xxs", 64)
    rebuilt = rebuilt_as_stages_do(qmodel, model, build, 64, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), qmodel.eval()(images))


@pytest.mark.parametrize("name", ["timm:mobilevit_xxs", "timm:efficientvit_b0"])
def test_quantization_aware_training_trains_the_layers_inside_the_twins(name):
    """QAT fine-tunes the fake-quantized network: its gradients reach the attention's layers
    through the functions ``torch.fx`` kept whole."""
    model = randomised(timm_network(name, 64))
    images = torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(32) % 10
    qmodel = compress.quantize(model, [images])
    inside = "stages.3.1.transformer.0.attn.qkv" if "mobilevit" in name else None
    inside = inside or "stages.3.blocks.1.context_module.main.qkv.conv"
    before = qmodel.get_submodule(inside).weight.detach().clone()

    def loss() -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(qmodel.eval()(images), labels))

    start = loss()
    ce = [compress.loss("ce")]
    compress.distill(qmodel.train(), None, [(images, labels)] * 15, losses=ce, epochs=1, lr=1e-3)
    assert loss() < 0.5 * start
    assert not torch.equal(qmodel.get_submodule(inside).weight, before)


def test_a_block_is_kept_float_by_the_name_the_network_gives_it():
    model = randomised(timm_network("timm:mobilevit_xxs", 64))
    images = torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    qmodel = compress.quantize(model, [images], skip=("stages.3.1.transformer",))
    layers = set(quantized_layers(qmodel))
    assert len(layers) == 72 - 4 * 4  # its four transformer blocks' qkv, proj, fc1, fc2 float
    assert not any(name.startswith("stages.3.1.transformer") for name in layers)
    assert "stages.3.1.conv_1x1" in layers and "stages.2.1.transformer.0.attn.qkv" in layers
