"""The KD losses a recipe can name, declared once: each name with its parameter class and the
class that computes it (``"module:Class"``, imported when a loss is built).

Nothing here imports torch, so the recipe loader and ``compress --help`` read this table for
free. A new loss is one :class:`LossKind` entry (and its parameter dataclass) below, plus its
module in :mod:`compress.training.losses` with a
:class:`~compress.training.losses.base.DistillLoss` subclass taking those parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from compress.core.registry import Registry
from compress.errors import RecipeError


@dataclass(frozen=True)
class LayerPair:
    """A teacher module and the student module it teaches (names as in
    ``model.named_modules()``)."""

    teacher: str
    student: str


_PAIRS_MESSAGE = "pairs: expected at least one {teacher: ..., student: ...} layer pair"


def _check_pairs(pairs: tuple[LayerPair, ...]) -> None:
    if not pairs:
        raise RecipeError(_PAIRS_MESSAGE)
    for pair in pairs:
        if not isinstance(pair, LayerPair):
            raise RecipeError(f"{_PAIRS_MESSAGE}, got {pair!r}")


@dataclass(frozen=True)
class CEParams:
    """``label_smoothing`` in 0..1 (0: hard targets): for training a teacher; it hurts
    distillation (Muller et al. 2019), so no teacher stage default turns it on."""

    label_smoothing: float = 0.0

    def __post_init__(self):
        if not 0 <= self.label_smoothing < 1:
            raise RecipeError(
                f"label_smoothing: expected 0 <= value < 1, got {self.label_smoothing}"
            )


@dataclass(frozen=True)
class KDParams:
    """``temperature`` > 0; ``alpha`` in 0..1; ``beta`` >= 0 or None (then the CE weight is
    1 - alpha)."""

    temperature: float = 4.0
    alpha: float = 0.9
    beta: float | None = None

    def __post_init__(self):
        if not self.temperature > 0:
            raise RecipeError(f"temperature: expected > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise RecipeError(f"alpha: expected 0..1, got {self.alpha}")
        if self.beta is not None and not self.beta >= 0:
            raise RecipeError(f"beta: expected >= 0 or null, got {self.beta}")
        if self.beta is not None and not self.alpha + self.beta > 0:
            raise RecipeError(
                f"beta: expected alpha + beta > 0, got alpha={self.alpha}, beta={self.beta}"
            )


@dataclass(frozen=True)
class LogitMSEParams:
    """Logit regression has no parameters."""


@dataclass(frozen=True)
class HybridParams:
    """``alpha`` in 0..1 (the weight of the KD term); ``temperature`` > 0."""

    alpha: float = 0.5
    temperature: float = 4.0

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise RecipeError(f"alpha: expected 0..1, got {self.alpha}")
        if not self.temperature > 0:
            raise RecipeError(f"temperature: expected > 0, got {self.temperature}")


@dataclass(frozen=True)
class DKDParams:
    """``alpha``, ``beta``, ``ce_weight`` >= 0; ``temperature`` > 0; ``warmup_epochs`` >= 0
    (0: none)."""

    alpha: float = 1.0
    beta: float = 8.0
    temperature: float = 4.0
    warmup_epochs: int = 20
    ce_weight: float = 1.0

    def __post_init__(self):
        for name in ("alpha", "beta", "ce_weight", "warmup_epochs"):
            if not getattr(self, name) >= 0:
                raise RecipeError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise RecipeError(f"temperature: expected > 0, got {self.temperature}")


@dataclass(frozen=True)
class FitNetParams:
    """``pairs``: at least one ``{teacher, student}`` layer pair."""

    pairs: tuple[LayerPair, ...] = ()

    def __post_init__(self):
        _check_pairs(self.pairs)


@dataclass(frozen=True)
class ATParams:
    """``pairs``: at least one layer pair; ``p`` > 0; ``beta`` >= 0."""

    pairs: tuple[LayerPair, ...] = ()
    p: float = 2.0
    beta: float = 1000.0

    def __post_init__(self):
        _check_pairs(self.pairs)
        if not self.p > 0:
            raise RecipeError(f"p: expected > 0, got {self.p}")
        if not self.beta >= 0:
            raise RecipeError(f"beta: expected >= 0, got {self.beta}")


@dataclass(frozen=True)
class LossKind:
    """One loss: its parameter dataclass and the ``"module:Class"`` built from them."""

    params: type
    build: str


LOSSES: Registry[LossKind] = Registry("loss", RecipeError)
for _name, _kind in {
    "ce": LossKind(CEParams, "compress.training.losses.logit:CrossEntropy"),
    "kd": LossKind(KDParams, "compress.training.losses.kd:HintonKD"),
    "logit_mse": LossKind(LogitMSEParams, "compress.training.losses.logit:LogitMSE"),
    "hybrid": LossKind(HybridParams, "compress.training.losses.logit:Hybrid"),
    "dkd": LossKind(DKDParams, "compress.training.losses.dkd:DecoupledKD"),
    "fitnet": LossKind(FitNetParams, "compress.training.losses.features:FitNet"),
    "at": LossKind(ATParams, "compress.training.losses.features:AttentionTransfer"),
}.items():
    LOSSES.register(_name)(_kind)
