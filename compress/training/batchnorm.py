"""BatchNorm statistics recomputed for a network whose weights changed under them.

Pruning removes channels and with them part of what every later BatchNorm normalises: its
running mean and variance now describe a network that no longer exists, and the pruned student
predicts at chance until fine-tuning has moved them (the quickstart fell from 96.9% to 9.7% at
only 1.45x fewer MACs). Re-estimating them on a few training batches, without any gradient
step, brings the network back (EagleEye's "adaptive BatchNorm", Li et al. 2020): fine-tuning
then starts from a working network, and candidates can be judged by accuracy at once.

The same holds after a short training run of a network whose BatchNorm updates its statistics
slowly (torchvision's MobileNetV3, EfficientNet and MNASNet use momentum 0.01 or less), or whose
statistics came with pretrained weights from another dataset: :func:`lagging_batchnorm` says
when, and the distill stage and :func:`compress.distill` re-estimate them after training.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from compress.core import distributed
from compress.nets.modes import evaluating


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace every BatchNorm's running statistics by their average over ``batches``.

    Only the BatchNorm layers run in training mode (dropout and everything else stay in eval
    mode); the statistics are a plain cumulative average over the batches, not a momentum
    update, so a handful of batches gives the estimate. Under torchrun each rank averages its
    own batches and the ranks' statistics are then averaged. Every module's mode is restored.

    Args:
        model: any network; one without BatchNorm is left unchanged.
        batches: preprocessed input batches on the model's device (no augmentation wanted:
            the statistics should describe the images the network will see).

    Returns:
        How many images were seen (0 if the model has no BatchNorm).
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    momenta = [norm.momentum for norm in norms]
    seen = 0
    with evaluating(model):
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative moving average: every batch weighs the same
            norm.train()
        try:
            for batch in batches:
                model(batch)
                seen += len(batch)
        finally:
            for norm, momentum in zip(norms, momenta, strict=True):
                norm.momentum = momentum
    distributed.sync_buffers(model)
    return seen


LAGGING_MOMENTUM = 0.1  # PyTorch's default; below it the running statistics trail the weights
RECALIBRATION_IMAGES = 2048  # training images statistics are re-estimated on after training


def lagging_batchnorm(model: nn.Module) -> bool:
    """Whether a BatchNorm of ``model`` updates its running statistics with a momentum below
    PyTorch's default 0.1 (after a few hundred steps they still hold much of their start)."""
    return any(
        isinstance(m, _BatchNorm)
        and m.track_running_stats
        and m.momentum is not None
        and m.momentum < LAGGING_MOMENTUM
        for m in model.modules()
    )
