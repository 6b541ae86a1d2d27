"""Feature hooks capture named outputs and always leave the model clean."""

import pytest
import torch

from compress.errors import StageError
from compress.nets.models import build_model
from compress.training.hooks import FeatureHooks


def hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hooks_capture_outputs_and_are_removed():
    model = build_model("cifar:resnet20", num_classes=10).eval()
    with FeatureHooks(model, ["layer2", "layer3", "layer2"]) as features:
        assert hook_count(model) == 2
        model(torch.randn(2, 3, 32, 32))
        assert features.outputs["layer2"].shape == (2, 32, 16, 16)
        assert features.outputs["layer3"].shape == (2, 64, 8, 8)
    assert hook_count(model) == 0


def test_hooks_are_removed_when_training_fails():
    model = build_model("cifar:resnet20", num_classes=10)
    with pytest.raises(RuntimeError, match="boom"), FeatureHooks(model, ["layer1"]):
        raise RuntimeError("boom")
    assert hook_count(model) == 0


def test_unknown_layer_is_a_clear_error():
    with (
        pytest.raises(StageError, match="no layer 'layer9'"),
        FeatureHooks(build_model("cifar:resnet20", num_classes=10), ["layer9"]),
    ):
        pass
