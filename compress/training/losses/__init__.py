"""Knowledge-distillation losses, each declared under a short name with its parameter class
(:data:`compress.training.loss_params.LOSSES`). A recipe's ``distill.loss`` is one term or a list of
terms, each ``{name, weight, **params}``:

    loss:
      - {name: kd, temperature: 4, alpha: 0.9}
      - {name: fitnet, weight: 100, pairs: [{teacher: layer3, student: features.13}]}

Every loss is a :class:`~compress.training.losses.base.DistillLoss` module called on a
:class:`~compress.training.losses.base.DistillBatch` (logits, labels, hooked intermediate features,
mixup/cutmix labels, the epoch) and returns a :class:`~compress.training.losses.base.LossOutput`.
Terms that read features declare the module names they need; the distill stage hooks those
modules and fills ``DistillBatch.*_features``. Losses with trainable parts (FitNet's regressor)
build them in :meth:`DistillLoss.setup` from one dry batch; their parameters are trained with the
student and are never part of the student's weights.

Importing this package costs no torch: the table and the parameter classes are plain
dataclasses, and the torch modules load when a loss is built (or a name below is first used).
"""

from __future__ import annotations

import importlib
from typing import Any

from compress.core.registry import load_entry
from compress.training.loss_params import LOSSES, LayerPair, LossKind

_BASE = ("DistillBatch", "DistillLoss", "LossOutput", "hard_ce")


def build_loss(name: str, params: Any = None):
    """The :class:`~compress.training.losses.base.DistillLoss` ``name`` with ``params`` (None: its
    defaults)."""
    kind = LOSSES.get(name)
    return load_entry(kind.build)(params if params is not None else kind.params())


def __getattr__(name: str):
    if name in _BASE:
        return getattr(importlib.import_module("compress.training.losses.base"), name)
    raise AttributeError(f"module 'compress.training.losses' has no attribute {name!r}")


__all__ = ["LOSSES", "LayerPair", "LossKind", "build_loss", *_BASE]
