"""KD losses against values derived by hand from the papers' formulas."""

import math

import pytest
import torch

from compress.errors import RecipeError
from compress.losses import LOSSES, build_loss
from compress.losses.kd import KDParams


def test_kd_matches_hand_computed_value_with_t_squared_scaling():
    # Two classes, student logits [0, 0] (p_s = [1/2, 1/2]), teacher logits [ln 3, 0], label 0.
    # At T = 2 the teacher's soft targets are softmax([ln3 / 2, 0]) = [r/(r+1), 1/(r+1)], r = sqrt(3).
    r = math.sqrt(3)
    p_t = [r / (r + 1), 1 / (r + 1)]
    kl = sum(p * math.log(p / 0.5) for p in p_t)
    ce = math.log(2)
    expected = 0.9 * (2**2) * kl + 0.1 * ce  # alpha * T^2 * KL + (1 - alpha) * CE
    assert expected == pytest.approx(0.200132, abs=1e-5)

    loss = build_loss("kd", KDParams(temperature=2.0, alpha=0.9))
    out = loss(torch.zeros(1, 2), torch.tensor([[math.log(3), 0.0]]), torch.tensor([0]))
    assert out.total.item() == pytest.approx(expected, rel=1e-5)
    assert out.terms["kd"].item() == pytest.approx(4 * kl, rel=1e-5)
    assert out.terms["ce"].item() == pytest.approx(ce, rel=1e-6)


def test_kd_soft_term_scales_with_t_squared_and_is_batch_mean():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    for temperature in (1.0, 4.0):
        out = build_loss("kd", KDParams(temperature=temperature, alpha=1.0))(s, t, y)
        p_t = torch.softmax(t / temperature, 1)
        log_p_s = torch.log_softmax(s / temperature, 1)
        kl_per_sample = (p_t * (p_t.log() - log_p_s)).sum(1)
        assert out.total.item() == pytest.approx(temperature**2 * kl_per_sample.mean().item(), rel=1e-5)


def test_kd_alpha_zero_is_plain_cross_entropy_and_teacher_gets_no_gradient():
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    out = build_loss("kd", KDParams(temperature=3.0, alpha=0.0))(s, t, y)
    assert out.total.item() == pytest.approx(torch.nn.functional.cross_entropy(s, y).item(), rel=1e-6)
    build_loss("kd", KDParams())(s, t, y).total.backward()
    assert s.grad is not None and t.grad is None


def test_kd_identical_logits_have_zero_soft_term():
    logits = torch.randn(3, 7)
    out = build_loss("kd", KDParams(alpha=1.0))(logits, logits.clone(), torch.tensor([0, 1, 2]))
    assert out.total.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=-1.0), dict(alpha=1.5), dict(alpha=-0.1)])
def test_kd_rejects_out_of_range_parameters(params):
    with pytest.raises(RecipeError):
        KDParams(**params)


def test_registry_lists_known_losses_on_typo():
    with pytest.raises(RecipeError, match="did you mean 'kd'"):
        LOSSES.get("kdd")
