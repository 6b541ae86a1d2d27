"""Model zoo: building by name, CIFAR stems, parameter counts, the timm extra's absence, and safe
checkpoint loading (timm models themselves: test_timm.py)."""

from __future__ import annotations

import sys

import pytest
import torch
import yaml
from conftest import DIGITS_BASE

from compress.errors import ModelError, RecipeError
from compress.nets.models import build_model, count_params_macs, model_names, unknown_model
from compress.nets.weights import load_weights

TORCHVISION = [
    "torchvision:resnet18",
    "torchvision:resnet34",
    "torchvision:resnet50",
    "torchvision:mobilenet_v2",
    "torchvision:mobilenet_v3_small",
    "torchvision:mobilenet_v3_large",
]
CIFAR = [
    "cifar:resnet8",
    "cifar:resnet14",
    "cifar:resnet20",
    "cifar:resnet32",
    "cifar:resnet44",
    "cifar:resnet56",
    "cifar:resnet110",
]
# He et al. 2016, Table 6 (CIFAR-10): parameters of the 6n+2 ResNets.
HE_PARAMS = {20: 0.27e6, 32: 0.46e6, 44: 0.66e6, 56: 0.85e6, 110: 1.7e6}


class Payload:
    """Any class instance: weights_only loading must refuse to unpickle it."""

    def __init__(self):
        self.value = 42


def test_required_names_are_registered():
    names = model_names()
    assert set(TORCHVISION + CIFAR) <= set(names) and names == sorted(names)


@pytest.mark.parametrize("name", TORCHVISION + CIFAR)
def test_builds_and_classifies_32px(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, cifar_stem=True).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", TORCHVISION)
def test_cifar_stem_keeps_more_resolution(name):
    stem_params, stem_macs = count_params_macs(build_model(name, 10, cifar_stem=True), 32)
    plain_params, plain_macs = count_params_macs(build_model(name, 10), 32)
    assert stem_macs > 4 * plain_macs  # at least 2x less downsampling in each direction
    assert abs(stem_params - plain_params) / plain_params < 0.01  # same network otherwise


@pytest.mark.parametrize("name", ["torchvision:mobilenet_v2", "torchvision:mobilenet_v3_small"])
def test_mobilenet_cifar_stem_downsamples_by_8(name):
    model = build_model(name, 10, cifar_stem=True).eval()
    with torch.no_grad():
        features = model.features(torch.zeros(1, 3, 32, 32))
    assert features.shape[-2:] == (4, 4)


def test_resnet_cifar_stem_shape():
    model = build_model("torchvision:resnet18", 10, cifar_stem=True)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)


@pytest.mark.parametrize("depth", sorted(HE_PARAMS))
def test_cifar_resnet_params_match_he_et_al(depth):
    params = sum(p.numel() for p in build_model(f"cifar:resnet{depth}", 10).parameters())
    assert abs(params - HE_PARAMS[depth]) / HE_PARAMS[depth] < 0.05


def test_count_params_macs_of_resnet20():
    model = build_model("cifar:resnet20", 10)
    params, macs = count_params_macs(model, 32)
    assert params == sum(p.numel() for p in model.parameters())
    assert 38e6 < macs < 45e6  # the commonly quoted ~41M multiply-adds of resnet20 at 32x32
    # cifar_stem is ignored: the network is already CIFAR-shaped.
    assert count_params_macs(build_model("cifar:resnet20", 10, cifar_stem=True), 32) == (
        params,
        macs,
    )


def test_count_params_macs_restores_modes():
    model = build_model("cifar:resnet20", 10)
    model.layer2.eval()
    count_params_macs(model, 32)
    assert model.training and not model.layer2.training and model.layer3.training


@pytest.mark.parametrize(
    "name", ["torchvision:resnet18", "torchvision:mobilenet_v3_small", "cifar:resnet20"]
)
def test_in_channels_replaces_first_conv(name):
    model = build_model(name, 5, cifar_stem=True, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)


def test_unsupported_adaptations_raise():
    with pytest.raises(ModelError, match="cifar_stem"):
        build_model("torchvision:squeezenet1_1", 10, cifar_stem=True)
    with pytest.raises(ModelError, match="in_channels=1"):
        build_model("torchvision:squeezenet1_1", 10, in_channels=1)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ModelError, match=r"did you mean 'torchvision:resnet18'"):
        build_model("torchvision:resnet81", 10)


def test_without_the_extra_a_timm_name_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    expected = "timm:resnet10t needs the timm extra: pip install -e '.[timm]'"
    with pytest.raises(ModelError) as info:
        build_model("timm:resnet10t", 10)
    assert str(info.value) == expected
    assert unknown_model("timm:resnet10t") == expected and unknown_model("cifar:resnet8") is None
    from compress.pipeline.recipe.load import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(DIGITS_BASE | {"student": {"model": "timm:resnet10t"}}))
    with pytest.raises(RecipeError, match=r"^student\.model: timm:resnet10t needs the timm extra"):
        load_recipe(path)


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_load_weights_round_trip(tmp_path, wrap):
    torch.manual_seed(0)
    source = build_model("cifar:resnet20", 10)
    with torch.no_grad():  # move BN statistics away from their defaults so they must be loaded
        source(torch.randn(4, 3, 32, 32) * 3 + 1)
    source.eval()
    state = source.state_dict()
    path = tmp_path / "w.pt"
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, path)
    target = load_weights(build_model("cifar:resnet20", 10).eval(), path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_load_weights_wrong_num_classes(tmp_path):
    path = tmp_path / "ten.pt"
    torch.save(build_model("cifar:resnet20", 10).state_dict(), path)
    with pytest.raises(ModelError) as info:
        load_weights(build_model("cifar:resnet20", 100), path)
    message = str(info.value)
    assert (
        "\n" not in message
        and str(path) in message
        and "cifar:resnet20 (num_classes=100)" in message
    )
    assert "size mismatch for fc.weight: checkpoint (10, 64) vs model (100, 64)" in message


@pytest.mark.parametrize(
    ("saved", "loaded", "problem"), [(20, 32, "missing"), (32, 20, "unexpected")]
)
def test_load_weights_missing_and_unexpected_keys(tmp_path, saved, loaded, problem):
    path = tmp_path / "other.pt"
    torch.save(build_model(f"cifar:resnet{saved}", 10).state_dict(), path)
    with pytest.raises(
        ModelError, match=rf"{problem} keys layer1\.3\.conv1\.weight, .*\(\+\d+ more\)$"
    ):
        load_weights(build_model(f"cifar:resnet{loaded}", 10), path)


def test_load_weights_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save(Payload(), path)
    with pytest.raises(ModelError, match="refused"):
        load_weights(build_model("cifar:resnet20", 10), path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        (b"this is not a checkpoint", "is not a PyTorch checkpoint"),
        (b"", "is not a PyTorch checkpoint"),
        ([1, 2, 3], "holds no state_dict"),
    ],
)
def test_load_weights_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(ModelError, match=message) as info:
        load_weights(build_model("cifar:resnet20", 10), path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
