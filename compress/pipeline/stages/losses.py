"""The loss a stage fine-tunes with when its recipe section names none: the latest distill
stage's, so prune and QAT keep teaching the way the student was taught."""

from __future__ import annotations

from compress.pipeline.context import RunContext
from compress.training.spec import LossConfig


def latest_distill_loss(ctx: RunContext, *, logits_only: bool = False) -> tuple[LossConfig, ...]:
    """The loss of the last distill stage before the running one: what prune and QAT fine-tune with.

    ``logits_only`` drops feature terms (their layers do not survive BatchNorm folding); if
    nothing is left, plain ``kd`` guides the student.
    """
    terms: tuple[LossConfig, ...] = (LossConfig(),)
    for spec in ctx.recipe.stages:
        if spec.name in ctx.artifacts and spec.kind == "distill":
            terms = spec.config.loss
    if logits_only:
        terms = tuple(t for t in terms if not getattr(t.params, "pairs", ())) or (LossConfig(),)
    return terms
