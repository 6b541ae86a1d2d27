"""timm models: built by name without weights, CIFAR stems, clear errors, pruned and reloaded (a
ViT loses whole heads and MLP width, never its token width), and a CNN and a ViT student through
distill, prune, INT8 quantization and export."""

import subprocess
import sys

import pytest
import torch
from conftest import DIGITS_BASE as BASE
from conftest import run_recipe

from compress.errors import ModelError
from compress.nets.models import build_model, count_params_macs
from compress.nets.rebuild import load_stage_network
from compress.nets.weights import apply_structure, load_weights, save_weights, structure_of
from compress.pipeline.config import PruneConfig
from compress.pruning.channels import ChannelPruner, prune_network

VIT = "timm:vit_tiny_patch16_224"
CNNS = ["timm:resnet10t", "timm:resnet18", "timm:mobilenetv3_small_050"]


@pytest.fixture(scope="module", autouse=True)
def timm():
    return pytest.importorskip("timm")


pytestmark = pytest.mark.usefixtures("one_thread")


def vit(image_size: int = 8, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(VIT, 10, cifar_stem=True, image_size=image_size, **kwargs).eval()


def images(size: int, batch: int = 2, channels: int = 3) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))


# --- building ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compress_imports_timm_only_when_a_timm_model_is_built():
    code = (
        "import sys, compress.nets.models as m; before = 'timm' in sys.modules; "
        "m.build_model('timm:resnet10t', 10); print(before, 'timm' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["False", "True"], result.stderr[-2000:]


@pytest.mark.parametrize("name", CNNS)
def test_cnn_cifar_stem_keeps_resolution_and_takes_any_channels(name):
    stem = build_model(name, 7, cifar_stem=True, in_channels=1).eval()
    with torch.no_grad():
        assert stem(images(32, channels=1)).shape == (2, 7)
    _, stem_macs = count_params_macs(stem, 32, in_channels=1)
    _, plain_macs = count_params_macs(build_model(name, 7, in_channels=1), 32, in_channels=1)
    assert stem_macs > 4 * plain_macs  # at least 2x less downsampling in each direction


def test_resnet_stems_become_cifar_shaped():
    deep = build_model("timm:resnet10t", 10, cifar_stem=True)  # three 3x3 convs
    plain = build_model("timm:resnet18", 10, cifar_stem=True)  # one 7x7 conv
    assert deep.conv1[0].stride == (1, 1) and isinstance(deep.maxpool, torch.nn.Identity)
    assert plain.conv1.kernel_size == (3, 3) and plain.conv1.stride == (1, 1)
    assert isinstance(plain.maxpool, torch.nn.Identity)


def test_a_model_whose_tables_are_sized_to_its_input_is_built_for_the_runs_images():
    """LeViT's attention biases are sized to the input: built for 224 px it refused 64 px."""
    model = build_model("timm:levit_128s", 10, image_size=64).eval()
    with torch.no_grad():
        assert model(images(64)).shape == (2, 10)
    cnn = build_model("timm:resnet10t", 10, image_size=64)  # no img_size argument: built as is
    assert cnn(images(64)).shape == (2, 10)


def test_vit_cifar_stem_is_4x4_patches_at_the_run_image_size():
    model = vit(image_size=16, in_channels=1)
    assert model.patch_embed.proj.kernel_size == (4, 4) and model.patch_embed.proj.in_channels == 1
    assert model.pos_embed.shape == (1, 1 + 4 * 4, 192)  # class token + a 4x4 grid
    with torch.no_grad():
        assert model(images(16, channels=1)).shape == (2, 10)
    plain = build_model(VIT, 10, image_size=32)  # its own 16x16 patches, at the image size
    assert plain.patch_embed.proj.kernel_size == (16, 16) and plain.pos_embed.shape[1] == 1 + 4


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("timm:convnext_atto", {}, "timm:convnext_atto: cifar_stem is only known for timm ResNets"),
        (VIT, {}, "cifar_stem needs image_size"),
        (VIT, {"image_size": 10}, "image_size must be a multiple of 4, got 10"),
        ("timm:resnet10", {}, "unknown model 'timm:resnet10' (did you mean 'timm:resnet10t'"),
    ],
)
def test_what_cannot_be_built_is_a_one_line_model_error(name, options, message):
    with pytest.raises(ModelError) as info:
        build_model(name, 10, cifar_stem=True, **options)
    assert message in str(info.value) and "\n" not in str(info.value)


# --- pruning and reloading -----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "size"), [(CNNS[0], 8), (CNNS[2], 16), (VIT, 8)])
def test_pruned_timm_network_reloads_identically(tmp_path, name, size):
    torch.manual_seed(0)
    model = build_model(name, 10, cifar_stem=True, image_size=size).eval()
    _, macs = count_params_macs(model, size)
    prune_network(model, images(size), PruneConfig(pruning_ratio=0.5, round_to=1), num_classes=10)
    assert count_params_macs(model, size)[1] < 0.75 * macs
    path = save_weights(model, tmp_path / "model.pt", structure=structure_of(model))
    fresh = build_model(name, 10, cifar_stem=True, image_size=size)
    fresh = load_weights(fresh, path).eval()
    with torch.no_grad():
        assert torch.equal(fresh(images(size)), model(images(size)))


def test_vit_loses_whole_heads_and_mlp_width_but_keeps_its_token_width():
    model = vit()
    cfg = PruneConfig(pruning_ratio=0.7)
    pruner = ChannelPruner(model, images(8), cfg, num_classes=10, rounds=3)
    heads = []
    for _ in range(3):
        pruner.prune()
        heads.append({block.attn.num_heads for block in model.blocks})
    # 3 heads: ratio 0.23 keeps all, 0.47 two, 0.7 one (Torch-Pruning alone would empty them)
    assert heads == [{3}, {2}, {1}]
    for block in model.blocks:
        attn = block.attn
        assert attn.head_dim == 64 and attn.attn_dim == 64 and attn.qkv.out_features == 3 * 64
        assert block.mlp.fc1.out_features < 768 * 0.35
    assert model.cls_token.shape == (1, 1, 192) and model.pos_embed.shape == (1, 5, 192)
    assert model.patch_embed.proj.out_channels == 192 and model.norm.normalized_shape == (192,)
    structure = structure_of(model)
    assert structure["blocks.0.attn"] == {"num_heads": 1}
    assert structure["blocks.0.norm1"] == {"normalized_shape": 192}


def test_vit_global_ranking_prunes_mlp_width_and_keeps_heads():
    model = vit()
    prune_network(
        model, images(8), PruneConfig(pruning_ratio=0.5, global_ranking=True), num_classes=10
    )
    assert {block.attn.num_heads for block in model.blocks} == {3}
    assert sum(block.mlp.fc1.out_features for block in model.blocks) < 12 * 768 * 0.6


def test_stored_heads_and_layer_norms_are_checked():
    model = vit()
    with pytest.raises(ModelError, match="'blocks.0.attn' num_heads 4 is wider than the unpruned"):
        apply_structure(model, {"blocks.0.attn": {"num_heads": 4}})
    with pytest.raises(ModelError, match="'norm' must give positive integers normalized_shape"):
        apply_structure(model, {"norm": {"num_features": 8}})
    apply_structure(model, {"norm": {"normalized_shape": 96}, "blocks.1.attn": {"num_heads": 2}})
    assert model.norm.weight.shape == (96,) and model.blocks[1].attn.attn_dim == 128


# --- the pipeline -------------------------------------------------------------------------------

TRAIN = {"epochs": 2, "optimizer": "adamw", "lr": 0.002, "weight_decay": 0.0}


def timm_recipe(name: str, student: str, checkpoint: str, quantize: bool) -> dict:
    stages = [
        "teacher",
        {"distill": {"loss": "kd", "train": TRAIN}},
        {"prune": {"train": TRAIN | {"epochs": 1}, "pruning_ratio": 0.5, "round_to": 1}},
    ]
    stages += [{"quantize": {"mode": "ptq", "calibration_images": 64}}] if quantize else []
    return BASE | {
        "name": name,
        "teacher": BASE["teacher"] | {"checkpoint": checkpoint},
        "student": {"model": student},
        "stages": [*stages, {"export": {"check_samples": 64}}],
    }


@pytest.mark.slow
@pytest.mark.parametrize(("student", "quantize"), [(CNNS[0], True), (VIT, True)])
def test_timm_student_is_distilled_pruned_quantized_and_exported(
    tmp_path, digits_teacher, student, quantize
):
    artifacts = run_recipe(
        tmp_path, timm_recipe("timm_run", student, digits_teacher, quantize=quantize)
    )
    distilled, pruned = artifacts["distill"].metrics, artifacts["prune"].metrics
    assert distilled["top1"] > 20 and pruned["macs_reduction"] > 1.5  # 10 classes
    model, network = load_stage_network(artifacts["prune"].files["model"].parent)
    assert network.spec.model == student and network.spec.cifar_stem
    assert count_params_macs(model, 8)[1] == pruned["macs"]
    exported = artifacts["export"].metrics
    assert exported["student_fp32" if quantize else "student"]["max_abs_diff"] < 1e-3
    if quantize:
        assert artifacts["quantize"].metrics["agreement_with_fp32"] > 0.9
        assert exported["student"]["qdq"]["int8_weights"] > 0
        assert exported["student"]["portability"]["portable"]
