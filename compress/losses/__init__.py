"""Knowledge-distillation losses, each registered under a short name with its parameter class.

A loss is built from its frozen parameter dataclass and called as
``loss(student_logits, teacher_logits, labels) -> LossOutput``; the recipe names it with
``loss: {name: kd, temperature: 4, alpha: 0.9}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from compress.errors import RecipeError
from compress.registry import Registry


@dataclass(frozen=True)
class LossOutput:
    """The total to back-propagate plus each term (detached) for logging."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    params: type
    build: Any  # params -> torch.nn.Module


LOSSES: Registry[LossSpec] = Registry("loss", RecipeError)


def register_loss(name: str, params: type):
    """Class decorator: register a loss module under ``name`` with its parameter dataclass."""

    def add(cls):
        LOSSES.register(name)(LossSpec(params=params, build=cls))
        return cls

    return add


def build_loss(name: str, params: Any) -> torch.nn.Module:
    return LOSSES.get(name).build(params)


from compress.losses import kd as _kd  # noqa: E402,F401  (registers the built-in losses)
