"""Training a network against a frozen teacher: the loss terms (each registered, citing its
paper), the one training loop, feature hooks, epoch checkpoints and BatchNorm re-estimation.

:data:`LOSSES` is the table of loss terms (``compress list losses``).
"""

from compress.training.loss_params import LOSSES

__all__ = ["LOSSES"]
