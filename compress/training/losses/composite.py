"""The distill stage's loss: a weighted sum of registered terms, as listed in the recipe.

    loss:
      - {name: kd, temperature: 4, alpha: 0.9}
      - {name: fitnet, weight: 100, pairs: [{teacher: layer3, student: features.13}]}

gives ``total = 1.0 * kd + 100 * fitnet``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from compress.errors import RecipeError
from compress.training.losses import build_loss
from compress.training.losses.base import DistillBatch, DistillLoss, LossOutput
from compress.training.spec import LossConfig


def _union(groups: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name for group in groups for name in group))


def _unique_keys(names: Sequence[str]) -> list[str]:
    """Term names for logging; a repeated loss gets ``name_2``, ``name_3``, ..."""
    keys = []
    for name in names:
        key, n = name, 1
        while key in keys:
            n += 1
            key = f"{name}_{n}"
        keys.append(key)
    return keys


class CompositeLoss(DistillLoss):
    """``sum(weight_i * term_i)`` over the recipe's loss terms.

    ``needs_teacher`` is True when any term needs the teacher; ``teacher_layers`` /
    ``student_layers`` are the terms' layers, de-duplicated in order; :meth:`setup` sets every
    term up. The output's ``terms`` are the single term's own terms, or with several terms
    ``"<name>"`` (its weighted total) and ``"<name>.<term>"`` for each of them.

    Example:
        >>> loss = CompositeLoss([LossConfig("kd"), LossConfig("ce", weight=0.5)])
        >>> loss(batch).terms.keys()  # kd, kd.kd, kd.ce, ce, ce.ce
    """

    def __init__(self, configs: Sequence[LossConfig]):
        super().__init__()
        if not configs:
            raise RecipeError("loss: expected at least one loss term")
        self.keys = _unique_keys([cfg.name for cfg in configs])
        self.weights = tuple(float(cfg.weight) for cfg in configs)
        self.losses = nn.ModuleList(build_loss(cfg.name, cfg.params) for cfg in configs)
        self.needs_teacher = any(loss.needs_teacher for loss in self.losses)
        self.teacher_layers = _union(loss.teacher_layers for loss in self.losses)
        self.student_layers = _union(loss.student_layers for loss in self.losses)

    def setup(self, batch: DistillBatch) -> None:
        for loss in self.losses:
            loss.setup(batch)

    def forward(self, batch: DistillBatch) -> LossOutput:
        outputs = [loss(batch) for loss in self.losses]
        weighted = [weight * out.total for weight, out in zip(self.weights, outputs, strict=True)]
        total = sum(weighted[1:], weighted[0])
        if len(outputs) == 1:
            return LossOutput(total, outputs[0].terms)
        terms = {}
        for key, value, out in zip(self.keys, weighted, outputs, strict=True):
            terms[key] = value.detach()
            terms.update({f"{key}.{name}": term for name, term in out.terms.items()})
        return LossOutput(total, terms)


def build_distill_loss(configs: Sequence[LossConfig]) -> CompositeLoss:
    """The distill stage's loss from the recipe's ``distill.loss`` terms."""
    return CompositeLoss(configs)
