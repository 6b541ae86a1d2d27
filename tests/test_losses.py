"""KD losses against values derived by hand from the papers' formulas, and their gradient flow."""

import math
import types
import typing

import pytest
import torch
import torch.nn.functional as F

from compress.data.spec import UNLABELED
from compress.errors import RecipeError
from compress.training.loss_params import ATParams, DKDParams, FitNetParams, HybridParams, KDParams
from compress.training.losses import LOSSES, LayerPair, build_loss
from compress.training.losses.base import DistillBatch, hard_ce
from compress.training.losses.composite import CompositeLoss, build_distill_loss
from compress.training.losses.dkd import DecoupledKD, dkd_target, nckd, tckd
from compress.training.losses.features import AttentionTransfer, FitNet
from compress.training.losses.kd import soft_kl
from compress.training.spec import LossConfig

LN3 = math.log(3)


def batch_of(student, teacher, labels, **kwargs):
    return DistillBatch(
        torch.as_tensor(student, dtype=torch.float32),
        torch.as_tensor(teacher, dtype=torch.float32),
        torch.as_tensor(labels),
        **kwargs,
    )


def two_class_kl(temperature):
    """KL(softmax([ln3, 0] / T) || [1/2, 1/2]) by hand: teacher soft targets [r/(r+1), 1/(r+1)],
    r = 3^(1/T)."""
    r = 3 ** (1 / temperature)
    return sum(p * math.log(p / 0.5) for p in (r / (r + 1), 1 / (r + 1)))


# ---------------------------------------------------------------------------- kd


def test_kd_matches_hand_computed_value_with_t_squared_scaling():
    # Two classes, student logits [0, 0] (p_s = [1/2, 1/2]), teacher logits [ln 3, 0], label 0.
    # At T = 2 the teacher's soft targets are softmax([ln3 / 2, 0]) = [r/(r+1), 1/(r+1)],
    # r = sqrt(3).
    r = math.sqrt(3)
    p_t = [r / (r + 1), 1 / (r + 1)]
    kl = sum(p * math.log(p / 0.5) for p in p_t)
    ce = math.log(2)
    expected = 0.9 * (2**2) * kl + 0.1 * ce  # alpha * T^2 * KL + (1 - alpha) * CE
    assert expected == pytest.approx(0.200132, abs=1e-5)

    out = build_loss("kd", KDParams(temperature=2.0, alpha=0.9))(
        batch_of([[0.0, 0.0]], [[LN3, 0.0]], [0])
    )
    assert out.total.item() == pytest.approx(expected, rel=1e-5)
    assert out.terms["kd"].item() == pytest.approx(4 * kl, rel=1e-5)
    assert out.terms["ce"].item() == pytest.approx(ce, rel=1e-6)


def test_kd_beta_normalises_the_two_weights():
    out = build_loss("kd", KDParams(temperature=2.0, alpha=0.9, beta=0.3))(
        batch_of([[0.0, 0.0]], [[LN3, 0.0]], [0])
    )
    expected = (0.9 * 4 * two_class_kl(2.0) + 0.3 * math.log(2)) / (0.9 + 0.3)
    assert out.total.item() == pytest.approx(expected, rel=1e-5)


def test_kd_soft_term_scales_with_t_squared_and_is_batch_mean():
    torch.manual_seed(0)
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    for temperature in (1.0, 4.0):
        out = build_loss("kd", KDParams(temperature=temperature, alpha=1.0))(
            DistillBatch(s, t, torch.randint(0, 10, (8,)))
        )
        p_t = torch.softmax(t / temperature, 1)
        log_p_s = torch.log_softmax(s / temperature, 1)
        kl_per_sample = (p_t * (p_t.log() - log_p_s)).sum(1)
        assert out.total.item() == pytest.approx(
            temperature**2 * kl_per_sample.mean().item(), rel=1e-5
        )
        assert soft_kl(s, t, temperature).item() == pytest.approx(out.total.item(), rel=1e-6)


def test_kd_alpha_zero_is_plain_cross_entropy():
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    out = build_loss("kd", KDParams(temperature=3.0, alpha=0.0))(DistillBatch(s, t, y))
    assert out.total.item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)


def test_kd_identical_logits_have_zero_soft_term():
    logits = torch.randn(3, 7)
    out = build_loss("kd", KDParams(alpha=1.0))(
        DistillBatch(logits, logits.clone(), torch.tensor([0, 1, 2]))
    )
    assert out.total.item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------- logit_mse, hybrid


def test_logit_mse_is_the_mean_over_all_elements():
    out = build_loss("logit_mse", LOSSES.get("logit_mse").params())(
        batch_of([[1.0, 2.0], [3.0, 4.0]], [[0.0, 2.0], [3.0, 6.0]], [0, 1])
    )
    assert out.total.item() == pytest.approx((1 + 0 + 0 + 4) / 4)


def test_hybrid_blends_mse_and_t_squared_kl_without_cross_entropy():
    out = build_loss("hybrid", HybridParams(alpha=0.25, temperature=2.0))(
        batch_of([[0.0, 0.0]], [[LN3, 0.0]], [1])
    )
    mse = LN3**2 / 2
    assert out.total.item() == pytest.approx(0.75 * mse + 0.25 * 4 * two_class_kl(2.0), rel=1e-5)
    assert out.terms["mse"].item() == pytest.approx(mse, rel=1e-6)


# ---------------------------------------------------------------------------- dkd


def softmax(xs):
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dkd_terms_match_the_paper_definitions_and_decompose_kd(temperature):
    s, t, target = [2.0, 1.0, 0.0, -1.0], [0.5, 3.0, 1.0, 0.2], 0
    p_s, p_t = softmax([x / temperature for x in s]), softmax([x / temperature for x in t])
    b_s, b_t = [p_s[target], 1 - p_s[target]], [p_t[target], 1 - p_t[target]]
    hat_s = [p / (1 - p_s[target]) for i, p in enumerate(p_s) if i != target]
    hat_t = [p / (1 - p_t[target]) for i, p in enumerate(p_t) if i != target]
    tckd_hand, nckd_hand = kl(b_t, b_s), kl(hat_t, hat_s)
    # Eq. 4 of Zhao et al. 2022: KD = TCKD + (1 - p_t^T) * NCKD.
    assert kl(p_t, p_s) == pytest.approx(tckd_hand + (1 - p_t[target]) * nckd_hand, rel=1e-12)

    args = torch.tensor([s]), torch.tensor([t]), torch.tensor([target]), temperature
    scale = temperature**2
    assert tckd(*args).item() == pytest.approx(scale * tckd_hand, rel=1e-5)
    assert nckd(*args).item() == pytest.approx(scale * nckd_hand, rel=1e-5)
    kd = soft_kl(args[0], args[1], temperature).item()
    assert kd == pytest.approx(
        tckd(*args).item() + (1 - p_t[target]) * nckd(*args).item(), rel=1e-5
    )


def test_dkd_warmup_ramps_the_kd_terms():
    loss = DecoupledKD(
        DKDParams(alpha=1.0, beta=8.0, temperature=4.0, warmup_epochs=4, ce_weight=1.0)
    )
    torch.manual_seed(0)
    s, t, y = torch.randn(3, 5), torch.randn(3, 5), torch.tensor([0, 2, 4])
    kd = tckd(s, t, y, 4.0) + 8.0 * nckd(s, t, y, 4.0)
    ce = F.cross_entropy(s, y)
    for epoch, factor in ((1, 0.25), (4, 1.0), (9, 1.0)):
        out = loss(DistillBatch(s, t, y, epoch=epoch))
        assert out.total.item() == pytest.approx(ce.item() + factor * kd.item(), rel=1e-5)
    assert DecoupledKD(DKDParams(warmup_epochs=0)).warmup(1) == 1.0


def test_dkd_target_uses_teacher_argmax_for_unlabeled_and_first_label_under_mixup():
    teacher = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0]])
    batch = DistillBatch(
        torch.zeros(2, 3),
        teacher,
        torch.tensor([UNLABELED, 2]),
        mixed_labels=torch.tensor([0, 1]),
        lam=0.6,
    )
    assert dkd_target(batch).tolist() == [1, 2]


# ---------------------------------------------------------------------------- at


def feature_batch(student_map, teacher_map):
    return DistillBatch(
        torch.zeros(1, 2),
        torch.zeros(1, 2),
        torch.tensor([0]),
        student_features={"s": student_map},
        teacher_features={"t": teacher_map},
    )


AT_PAIR = (LayerPair(teacher="t", student="s"),)


def test_at_hand_example_on_a_2x2_map():
    # Student map [[1, 0], [0, 0]] -> Q_s = [1, 0, 0, 0]; teacher all ones -> Q_t = [1/2] * 4.
    # Each squared difference is 1/4, so the loss is beta / 2 * 1/4 = 125 at beta = 1000.
    loss = AttentionTransfer(ATParams(pairs=AT_PAIR))
    out = loss(feature_batch(torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]), torch.ones(1, 1, 2, 2)))
    assert out.total.item() == pytest.approx(125.0)


def test_at_identical_maps_give_zero_even_with_different_channel_counts():
    f = torch.randn(2, 3, 4, 4)
    loss = AttentionTransfer(ATParams(pairs=AT_PAIR))
    assert loss(feature_batch(f, f.clone())).total.item() == pytest.approx(0.0, abs=1e-6)
    assert loss(feature_batch(f, torch.cat([f, f], 1))).total.item() == pytest.approx(0.0, abs=1e-4)


def test_at_resizes_the_student_map_to_the_teachers():
    torch.manual_seed(0)
    loss = AttentionTransfer(ATParams(pairs=AT_PAIR, beta=2.0))
    large, small = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    pooled = F.adaptive_avg_pool2d(large, 4)
    q = lambda f: F.normalize(f.pow(2).mean(1).flatten(1))  # noqa: E731  (the official code)
    assert loss(feature_batch(large, small)).total.item() == pytest.approx(
        (q(pooled) - q(small)).pow(2).mean().item(), rel=1e-5
    )
    upsampled = loss(feature_batch(small, large)).total
    assert torch.isfinite(upsampled) and upsampled.item() > 0


# ---------------------------------------------------------------------------- fitnet


def test_fitnet_builds_a_regressor_only_when_channels_differ():
    loss = FitNet(FitNetParams(pairs=AT_PAIR))
    loss.setup(feature_batch(torch.randn(2, 3, 4, 4), torch.randn(2, 6, 4, 4)))
    conv, bn = loss.regressors[0]
    assert (
        isinstance(conv, torch.nn.Conv2d)
        and conv.bias is None
        and (conv.in_channels, conv.out_channels) == (3, 6)
    )
    assert isinstance(bn, torch.nn.BatchNorm2d)
    loss.setup(feature_batch(torch.randn(2, 6, 8, 8), torch.randn(2, 6, 4, 4)))
    assert isinstance(loss.regressors[0], torch.nn.Identity)
    loss.setup(feature_batch(torch.randn(2, 3), torch.randn(2, 7)))
    assert isinstance(loss.regressors[0], torch.nn.Linear)
    assert loss.teacher_layers == ("t",) and loss.student_layers == ("s",)


def test_fitnet_trains_student_and_regressor_but_not_teacher():
    student, teacher = (
        torch.randn(2, 3, 8, 8, requires_grad=True),
        torch.randn(2, 6, 4, 4, requires_grad=True),
    )
    loss = FitNet(FitNetParams(pairs=AT_PAIR))
    loss.setup(feature_batch(student, teacher))
    loss(feature_batch(student, teacher)).total.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(p.grad is not None for p in loss.parameters()) and len(list(loss.parameters())) == 3
    assert teacher.grad is None


def test_fitnet_identity_regressor_is_plain_mse():
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    loss = FitNet(FitNetParams(pairs=AT_PAIR))
    loss.setup(feature_batch(s, t))
    assert loss(feature_batch(s, t)).total.item() == pytest.approx(
        F.mse_loss(s, t).item(), rel=1e-6
    )


def test_fitnet_forward_before_setup_raises():
    with pytest.raises(RuntimeError, match="setup"):
        FitNet(FitNetParams(pairs=AT_PAIR))(
            feature_batch(torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2))
        )


def test_feature_losses_reject_mismatched_ranks_at_setup():
    with pytest.raises(RecipeError, match="^pairs: expected 4-D"):
        AttentionTransfer(ATParams(pairs=AT_PAIR)).setup(
            feature_batch(torch.randn(2, 3), torch.randn(2, 3))
        )
    with pytest.raises(RecipeError, match="^pairs: expected 2-D or 4-D"):
        FitNet(FitNetParams(pairs=AT_PAIR)).setup(
            feature_batch(torch.randn(2, 3), torch.randn(2, 3, 4, 4))
        )


# ---------------------------------------------------------------------------- every registered loss


def default_params(name):
    params = LOSSES.get(name).params
    return params(pairs=AT_PAIR) if name in ("fitnet", "at") else params()


def random_batch(labels=(0, 1, UNLABELED, 3)):
    torch.manual_seed(0)
    n = len(labels)
    return DistillBatch(
        torch.randn(n, 5, requires_grad=True),
        torch.randn(n, 5, requires_grad=True),
        torch.tensor(labels),
        student_features={"s": torch.randn(n, 3, 4, 4, requires_grad=True)},
        teacher_features={"t": torch.randn(n, 6, 2, 2, requires_grad=True)},
    )


@pytest.mark.parametrize("name", LOSSES.names())
def test_gradient_reaches_only_the_student_for_every_loss(name):
    loss = build_loss(name, default_params(name))
    batch = random_batch()
    loss.setup(batch)
    out = loss(batch)
    assert torch.isfinite(out.total) and all(not v.requires_grad for v in out.terms.values())
    out.total.backward()
    assert batch.teacher_logits.grad is None and batch.teacher_features["t"].grad is None
    student_grads = [batch.student_logits.grad, batch.student_features["s"].grad]
    assert any(g is not None and g.abs().sum() > 0 for g in student_grads)
    assert loss.needs_teacher == (name != "ce")


@pytest.mark.parametrize("name", LOSSES.names())
def test_params_fields_use_only_types_the_recipe_parser_reads(name):
    allowed = {int, float, bool, str, tuple[LayerPair, ...]}
    for hint in typing.get_type_hints(LOSSES.get(name).params).values():
        if typing.get_origin(hint) is types.UnionType:
            args = typing.get_args(hint)
            assert len(args) == 2 and type(None) in args
            hint = next(a for a in args if a is not type(None))
        assert hint in allowed


def test_hard_ce_mixes_the_two_labels_by_lam():
    # Logits [ln 3, 0] -> p = [3/4, 1/4]; lam = 0.7 on label 0, 0.3 on the mixed-in label 1.
    batch = batch_of([[LN3, 0.0]], [[0.0, 0.0]], [0], mixed_labels=torch.tensor([1]), lam=0.7)
    expected = 0.7 * -math.log(0.75) + 0.3 * -math.log(0.25)
    assert hard_ce(batch.student_logits, batch).item() == pytest.approx(expected, rel=1e-6)
    assert build_loss("ce", default_params("ce"))(batch).total.item() == pytest.approx(
        expected, rel=1e-6
    )


@pytest.mark.parametrize(("name", "unlabeled_gets_gradient"), [("kd", True), ("ce", False)])
def test_unlabeled_rows_get_only_the_soft_term(name, unlabeled_gets_gradient):
    batch = random_batch(labels=(0, UNLABELED))
    build_loss(name, default_params(name))(batch).total.backward()
    assert batch.student_logits.grad[0].abs().sum() > 0
    assert bool(batch.student_logits.grad[1].abs().sum() > 0) == unlabeled_gets_gradient


# ---------------------------------------------------------------------------- composite


def test_composite_applies_weights_exactly_and_prefixes_terms():
    batch = random_batch()
    kd, mse = (
        build_loss("kd", KDParams())(batch),
        build_loss("logit_mse", default_params("logit_mse"))(batch),
    )
    loss = build_distill_loss([LossConfig("kd", 0.7, KDParams()), LossConfig("logit_mse", 0.2)])
    out = loss(batch)
    assert out.total.item() == pytest.approx(
        0.7 * kd.total.item() + 0.2 * mse.total.item(), rel=1e-6
    )
    assert set(out.terms) == {"kd", "kd.kd", "kd.ce", "logit_mse", "logit_mse.logit_mse"}
    assert out.terms["kd"].item() == pytest.approx(0.7 * kd.total.item(), rel=1e-6)


def test_composite_single_term_keeps_its_own_terms():
    batch = random_batch()
    out = CompositeLoss([LossConfig("kd", 2.0, KDParams())])(batch)
    assert set(out.terms) == {"kd", "ce"}
    assert out.total.item() == pytest.approx(
        2.0 * build_loss("kd", KDParams())(batch).total.item(), rel=1e-6
    )


def test_composite_unions_layers_sets_up_terms_and_needs_teacher():
    pairs = (LayerPair("t1", "s1"), LayerPair("t2", "s2"))
    loss = CompositeLoss(
        [
            LossConfig("fitnet", 1.0, FitNetParams(pairs=pairs)),
            LossConfig("at", 1.0, ATParams(pairs=(LayerPair("t1", "s1"), LayerPair("t3", "s1")))),
        ]
    )
    assert loss.teacher_layers == ("t1", "t2", "t3") and loss.student_layers == ("s1", "s2")
    features = {name: torch.randn(2, 4, 3, 3) for name in ("t1", "t2", "t3", "s1", "s2")}
    batch = DistillBatch(
        torch.zeros(2, 3),
        torch.zeros(2, 3),
        torch.tensor([0, 1]),
        student_features=features,
        teacher_features=features,
    )
    loss.setup(batch)
    assert len(loss.losses[0].regressors) == 2 and torch.isfinite(loss(batch).total)
    assert CompositeLoss([LossConfig("ce")]).needs_teacher is False
    assert CompositeLoss([LossConfig("ce"), LossConfig("kd")]).needs_teacher is True


def test_composite_repeated_loss_names_get_distinct_keys():
    out = CompositeLoss([LossConfig("ce"), LossConfig("ce", 0.5)])(random_batch())
    assert {"ce", "ce_2"} <= set(out.terms)


# ---------------------------------------------------------------------------- params validation


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (KDParams, dict(temperature=0.0), "temperature"),
        (KDParams, dict(temperature=-1.0), "temperature"),
        (KDParams, dict(alpha=1.5), "alpha"),
        (KDParams, dict(alpha=-0.1), "alpha"),
        (KDParams, dict(beta=-1.0), "beta"),
        (KDParams, dict(alpha=0.0, beta=0.0), "beta"),
        (HybridParams, dict(alpha=1.1), "alpha"),
        (HybridParams, dict(temperature=0.0), "temperature"),
        (FitNetParams, dict(), "pairs"),
        (FitNetParams, dict(pairs=({"teacher": "a", "student": "b"},)), "pairs"),
        (ATParams, dict(), "pairs"),
        (ATParams, dict(pairs=AT_PAIR, p=0.0), "p"),
        (ATParams, dict(pairs=AT_PAIR, beta=-1.0), "beta"),
        (DKDParams, dict(temperature=0.0), "temperature"),
        (DKDParams, dict(warmup_epochs=-1), "warmup_epochs"),
        (DKDParams, dict(alpha=-1.0), "alpha"),
        (DKDParams, dict(beta=-1.0), "beta"),
        (DKDParams, dict(ce_weight=-1.0), "ce_weight"),
    ],
)
def test_params_reject_out_of_range_values_naming_the_field(cls, kwargs, field):
    with pytest.raises(RecipeError, match=f"^{field}: expected"):
        cls(**kwargs)


def test_fitnet_without_pairs_says_what_a_pair_looks_like():
    with pytest.raises(RecipeError) as info:
        FitNetParams()
    assert str(info.value) == "pairs: expected at least one {teacher: ..., student: ...} layer pair"


def test_registry_lists_known_losses_on_typo():
    with pytest.raises(RecipeError, match="did you mean 'kd'"):
        LOSSES.get("kdd")
