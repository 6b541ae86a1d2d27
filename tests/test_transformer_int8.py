"""Vision transformers in INT8: their linear layers (attention's projections and the MLPs) compute
with INT8 weights and inputs, LayerNorm/softmax/GELU stay float, and the exported file proves
it like a CNN's: ONNX Runtime fuses every linear layer into an integer kernel, reproduces the
fake-quantized network, and the file is portable."""

import functools

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import optimized_nodes
from torch import nn

import compress
from compress.core.compat import torchvision
from compress.quantization.fake_quant import (
    QuantLinear,
    calibrate,
    prepare_quantized,
    quantized_layers,
)
from compress.quantization.split_attention import SplitAttention, with_split_attention
from compress.quantization.window_attention import WindowAttention, with_window_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def optimized_ops(path) -> dict[str, int]:
    """Op counts of ONNX Runtime's optimized graph of ``path`` (no hardware-specific layouts)."""
    nodes = optimized_nodes(path, "ORT_ENABLE_EXTENDED")
    return {op: sum(node.op_type == op for node in nodes) for op in {n.op_type for n in nodes}}


@pytest.mark.parametrize("batch_first", [True, False])
def test_split_attention_computes_what_multihead_attention_computes(batch_first):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 5, 32)
    split = SplitAttention(attention).eval()
    assert split.in_proj.weight is attention.in_proj_weight  # the same parameters, not copies
    with torch.no_grad():
        expected = attention(x, x, x, need_weights=False)[0]
        ours, weights = split(x, x, x, need_weights=False)
    assert weights is None and torch.allclose(ours, expected, atol=1e-5)
    with pytest.raises(ValueError, match="self-attention"):
        split(x, x.clone(), x)


def test_only_self_attention_of_one_width_is_split_and_the_model_is_not_modified():
    plain = nn.Sequential(nn.Linear(4, 4))
    assert with_split_attention(plain) is plain  # nothing to split: no copy
    model = nn.ModuleDict(
        {
            "self": nn.MultiheadAttention(8, 2),
            "cross": nn.MultiheadAttention(8, 2, kdim=4, vdim=4),
        }
    )
    split = with_split_attention(model)
    assert isinstance(split["self"], SplitAttention) and isinstance(model["self"], nn.Module)
    assert type(model["self"]) is nn.MultiheadAttention  # the original keeps its module
    assert type(split["cross"]) is nn.MultiheadAttention  # separate key/value sizes: left alone


def small_torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10,
    )  # fmt: skip
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts the head at zero
    return model.eval()


def test_torchvision_vit_quantizes_its_attention_projections_too(tmp_path):
    model = small_torchvision_vit()
    images = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    qmodel = prepare_quantized(model, target="onnxruntime-cpu", example_inputs=images[:2])
    layers = set(quantized_layers(qmodel))
    block = "encoder.layers.encoder_layer_0"
    assert {f"{block}.self_attention.in_proj", f"{block}.self_attention.out_proj"} <= layers
    assert {f"{block}.mlp.0", f"{block}.mlp.3", "conv_proj", "heads.head"} <= layers
    calibrate(qmodel, [images], method="minmax")
    record = compress.export(qmodel, tmp_path / "vit.onnx", check_inputs=images)
    assert record["top1_agreement"] >= 0.95
    assert record["portability"]["layers"] == len(layers) and record["portability"]["portable"]


@pytest.fixture(scope="module")
def trained_vit():
    """timm's ViT-Tiny (4x4 patches, 8x8 digits) trained until its logits have real margins."""
    pytest.importorskip("timm")
    from sklearn.datasets import load_digits

    from compress.nets.models import build_model

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1).repeat(1, 3, 1, 1)
    images, labels = images / 8 - 1, torch.tensor(digits.target)
    torch.manual_seed(0)
    model = build_model("timm:vit_tiny_patch16_224", 10, cifar_stem=True, image_size=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(4):
        for batch in torch.randperm(1500).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
    model.eval()
    train = [images[:1500][i : i + 250] for i in range(0, 1500, 250)]
    return model, train, images[1500:], labels[1500:]


def top1(logits, labels) -> float:
    return float((torch.as_tensor(logits).argmax(1) == labels).float().mean() * 100)


@pytest.mark.slow
def test_a_trained_vit_runs_its_linear_layers_in_int8_and_keeps_its_accuracy(tmp_path, trained_vit):
    model, train, test_images, test_labels = trained_vit
    with torch.no_grad():
        float_top1 = top1(model(test_images), test_labels)
    assert float_top1 > 70  # trained: the INT8 check below means something
    qmodel = compress.quantize(model, train)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert set(linears) <= set(quantized_layers(qmodel)) and len(linears) == 12 * 4 + 1
    assert all(isinstance(qmodel.get_submodule(n), QuantLinear) for n in linears)
    path = tmp_path / "vit_int8.onnx"
    record = compress.export(qmodel, path, check_inputs=test_images)
    assert record["qdq"]["int8_weights"] == len(quantized_layers(qmodel))
    assert record["portability"]["portable"]
    assert record["portability"]["layers"] == len(quantized_layers(qmodel))
    ops = optimized_ops(path)  # every linear layer of the blocks is an integer kernel in ORT
    assert ops.get("MatMulIntegerToFloat", 0) == 12 * 4, ops
    assert ops.get("LayerNormalization", 0) == 25 and "Softmax" in ops  # these stay float
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: test_images.numpy()})[0]
    assert np.isfinite(logits).all()
    assert top1(logits, test_labels) > float_top1 - 3  # INT8 keeps the accuracy (297 images)


class PadToEven(nn.Module):
    """Pads its input to an even size when it is odd: a Python ``if`` on a shape, as timm's
    MobileViT block does, which ``torch.fx`` cannot trace."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if x.shape[-1] % 2:
            x = nn.functional.pad(x, (0, 1, 0, 1))
        return self.conv(x)


def test_a_module_fx_cannot_trace_is_kept_whole_and_float_and_the_rest_is_int8(tmp_path):
    from conftest import randomised

    torch.manual_seed(0)
    model = randomised(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            PadToEven(),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 10),
        )
    )
    images = torch.randn(64, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    qmodel = prepare_quantized(model, target="onnxruntime-cpu", example_inputs=images[:2])
    assert qmodel.untraced == ("3",)
    assert set(quantized_layers(qmodel)) == {"0", "5", "9"}  # 3.conv stays float, inside "3"
    assert type(qmodel.get_submodule("3.conv")) is nn.Conv2d
    calibrate(qmodel, [images], method="minmax")
    record = compress.export(qmodel, tmp_path / "padded.onnx", check_inputs=images)
    assert record["qdq"]["fp32_conv_layers"] == ["3.conv"]
    assert record["top1_agreement"] >= 0.95


def test_a_network_whose_own_forward_cannot_be_traced_is_refused_in_one_line():
    from compress.errors import StageError

    model = PadToEven().eval()  # the untraceable code is the network's own forward
    with pytest.raises(StageError, match=r"^PadToEven cannot be traced by torch.fx") as caught:
        prepare_quantized(model, target="onnxruntime-cpu", example_inputs=torch.randn(2, 8, 5, 5))
    assert "\n" not in str(caught.value)


class TableBias(nn.Module):
    """Swin V2's continuous position bias: an MLP run on a coordinates table the module holds,
    its output added to the activations."""

    def __init__(self, channels=8):
        super().__init__()
        self.register_buffer("table", torch.linspace(-1, 1, 32).reshape(1, 4, 4, 2))
        self.mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, channels))
        self.conv, self.head = nn.Conv2d(3, channels, 3, padding=1), nn.Linear(channels, 10)

    def forward(self, x):
        bias = self.mlp(self.table).permute(0, 3, 1, 2)
        return self.head(torch.relu(self.conv(x) + bias).mean((2, 3)))


def test_a_layer_run_on_constants_alone_stays_float_and_the_file_passes(tmp_path):
    """Quantized, the MLP's input was the table, a weight fed to QuantizeLinear, and the INT8
    check failed (torchvision swin_v2_t: "relative_coords_table is not stored as INT8"). It
    computes a constant ONNX Runtime folds: it stays float, the rest is INT8."""
    torch.manual_seed(0)
    model, images = TableBias().eval(), torch.randn(64, 3, 4, 4)
    qmodel = compress.quantize(model, [images[:32]])
    assert {type(qmodel.get_submodule(name)) for name in ("mlp.0", "mlp.2")} == {nn.Linear}
    record = compress.export(qmodel, tmp_path / "table.onnx", check_inputs=images)
    assert record["qdq"]["int8_weights"] == 2 and record["qdq"]["qlinear_conv"] == 1


def small_torchvision_swin(v2: bool, window=(4, 4)) -> nn.Module:
    """Two stages of 2x2 patches and 4x4 windows: at 16 px its 8x8 map shifts every other block;
    at 20 px the map (10x10) is padded to whole windows."""
    from torchvision.models import swin_transformer as swin

    torch.manual_seed(0)
    layers = dict(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2)
    model = swin.SwinTransformer(
        patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=list(window),
        num_classes=10, **(layers if v2 else {}),
    )  # fmt: skip
    for parameter in model.parameters():  # torchvision starts biases and the head at zero
        nn.init.normal_(parameter, std=0.2)
    return model.eval()


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swin_v2"])
@pytest.mark.parametrize(
    ("size", "window"),
    [((16, 16), (4, 4)), ((20, 20), (4, 4)), ((12, 20), (4, 2)), ((20, 10), (2, 4))],
    ids=["square", "padded", "wide", "tall"],  # the last two: rows and columns not alike
)
def test_window_attention_computes_what_torchvision_swin_computes(v2, size, window):
    model = small_torchvision_swin(v2, window)
    rewritten = with_window_attention(model)
    attentions = [m for m in rewritten.modules() if isinstance(m, WindowAttention)]
    assert len(attentions) == 4 and not any(isinstance(m, WindowAttention) for m in model.modules())
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        assert torch.allclose(rewritten(x), model(x), atol=1e-5)
    if v2:  # the key's part of the qkv bias, which V2 never reads: zeroed in the copy only
        original, zeroed = model.features[1][0].attn.qkv.bias, attentions[0].qkv.bias
        assert original[16:32].abs().sum() > 0 and zeroed[16:32].eq(0).all()


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swin_v2"])
def test_torchvision_swin_quantizes_its_attention_projections_too(tmp_path, v2):
    """torchvision's Swin hands ``qkv.weight`` and ``proj.weight`` to a function torch.fx keeps
    whole: they stayed float. Rewritten, every linear layer but V2's position-bias MLP (run on
    constants) is INT8, and the file is proven."""
    model = small_torchvision_swin(v2)
    images = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    qmodel = compress.quantize(model, [images[:32]])
    layers = set(quantized_layers(qmodel))
    for stage, block in (("1", "0"), ("1", "1"), ("3", "0"), ("3", "1")):
        attention = f"features.{stage}.{block}.attn"  # the network's own names
        assert {f"{attention}.qkv", f"{attention}.proj"} <= layers
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "cpb" not in n}
    assert len(layers) == len(linears) + 1  # and the patch embedding's convolution
    assert layers <= {name for name, _ in model.named_modules()}
    record = compress.export(qmodel, tmp_path / "swin.onnx", check_inputs=images)
    assert record["qdq"]["int8_weights"] == len(layers)
    assert record["portability"]["portable"] and record["portability"]["layers"] == len(layers)


def test_a_saved_int8_swin_v2_reloads_as_the_stages_do(tmp_path):
    """A stage's INT8 network is rebuilt from a fresh float network prepared on zeros, then
    loaded: the rewrite (and V2's key bias zeroed in it) must give the same state to load into."""
    from conftest import rebuilt_as_stages_do

    model = small_torchvision_swin(v2=True)
    images = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    qmodel = compress.quantize(model, [images])
    build = functools.partial(small_torchvision_swin, v2=True)
    rebuilt = rebuilt_as_stages_do(qmodel, model, build, 16, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), qmodel.eval()(images))
