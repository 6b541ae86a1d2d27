"""BatchNorm recalibration: statistics re-estimated from batches, nothing else touched."""

import pytest
import torch
from torch import nn

from compress.training.batchnorm import recalibrate_batchnorm


def test_statistics_become_the_average_over_the_batches_and_modes_are_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3, momentum=0.1), nn.Dropout(0.5), nn.Conv2d(3, 4, 1))
    norm = model[0]
    norm.running_mean.fill_(5.0)  # stale: statistics of a network that no longer exists
    norm.running_var.fill_(9.0)
    model.train()
    model[1].eval()  # a mixed-mode model keeps its modes
    shift = torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1)
    batches = [torch.randn(8, 3, 4, 4) * 2 + shift for _ in range(4)]

    seen = recalibrate_batchnorm(model, batches)

    assert seen == 32
    expected_mean = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    expected_var = torch.stack([b.var((0, 2, 3), unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(norm.running_mean, expected_mean)
    torch.testing.assert_close(norm.running_var, expected_var)
    assert norm.momentum == 0.1 and norm.num_batches_tracked == 4
    assert model.training and norm.training and not model[1].training


def test_the_weights_do_not_change_and_a_network_without_batchnorm_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k}
    recalibrate_batchnorm(model, [torch.randn(4, 3, 8, 8)])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k != "1.num_batches_tracked")

    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert recalibrate_batchnorm(plain, [torch.randn(4, 3, 8, 8)]) == 0


@pytest.mark.slow
def test_a_briefly_trained_student_with_slow_batchnorm_ends_with_current_statistics():
    """torchvision's MobileNetV3 updates its statistics with momentum 0.01: after 47 steps from
    scratch they still hold much of their start, and in eval mode the network was near chance
    (the coverage benchmark: 9.8% top-1). ``compress.distill`` re-estimates them after training."""
    from sklearn.datasets import load_digits

    import compress
    from compress.nets.models import build_model
    from compress.training.batchnorm import lagging_batchnorm

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1).repeat(1, 3, 1, 1)
    images, labels = images / 8 - 1, torch.tensor(digits.target)
    train = [(images[i : i + 32], labels[i : i + 32]) for i in range(0, 1500, 32)]
    torch.manual_seed(0)
    student = build_model("torchvision:mobilenet_v3_small", 10, cifar_stem=True)
    assert lagging_batchnorm(student) and not lagging_batchnorm(build_model("cifar:resnet8", 10))
    trained = compress.distill(
        student, None, train, losses=[compress.loss("ce")], optimizer="adamw", lr=0.003
    )
    with torch.no_grad():
        top1 = (trained.eval()(images[1500:]).argmax(1) == labels[1500:]).float().mean()
    assert top1 > 0.6, top1  # chance is 0.1
