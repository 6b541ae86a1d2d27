"""The one training loop, shared by every stage that trains (teacher, distill, later prune/QAT).

Stages differ only in the ``step_loss`` they hand in: a closure that takes a preprocessed batch
and returns the loss to minimise and the model's logits (for the running accuracy).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from compress.core import distributed
from compress.errors import StageError
from compress.training.checkpoint import (
    load_training_state,
    restore_training_state,
    save_training_state,
)
from compress.training.spec import TrainConfig

# (images, labels, epoch, *batch extras)
StepLoss = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    train_top1: float
    test_loss: float
    test_top1: float
    lr: float
    # wall time of the epoch, its evaluation included; 0.0 in checkpoints older than this field
    seconds: float = 0.0


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(
    optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: linear warm-up, then cosine to zero, step decay (x0.1 at 50% and 75%),
    constant, or one-cycle (Smith & Topin 2019; torch's OneCycleLR, warm-up = its rising phase)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = cfg.warmup_epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        rising = warmup / total if warmup else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total, pct_start=min(max(rising, 0.01), 0.99)
        )

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.schedule == "step":
            return 0.1 ** sum(progress >= m for m in (0.5, 0.75))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``cfg.precision`` on ``device``; None means full fp32."""
    if cfg.precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]


def train_config_for(model: nn.Module, cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``precision: auto`` meaning fp32 for a fake-quantized network (from
    :func:`compress.quantization.fake_quant.prepare_quantized`, which marks it with
    ``quant_spec``), also
    on a GPU: fake quantization simulates the integer grid on float values, and bf16 rounds a
    value by up to 1/256 of itself, as much as one INT8 step at the top of a range, so QAT
    under bf16 autocast would learn from bf16 noise instead of the runtime's integer
    arithmetic. Decided here, in the loop every QAT goes through (stage or library)."""
    if cfg.precision != "auto" or getattr(model, "quant_spec", None) is None:
        return cfg
    return dataclasses.replace(cfg, precision="fp32")


def uses_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"


def evaluate(model: torch.nn.Module, loader, preprocess, device: torch.device) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy on a loader, model in eval mode."""
    return evaluate_predictions(model, loader, preprocess, device)[0]


@torch.no_grad()
def evaluate_predictions(
    model: torch.nn.Module, loader, preprocess, device: torch.device
) -> tuple[dict[str, float], torch.Tensor]:
    """:func:`evaluate`'s numbers and each image's top-1 class in the loader's order (on CPU):
    another network's agreement with this one is then measured without running this one again."""
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    predictions = []
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(preprocess(images, train=False))
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        predicted = logits.argmax(1)
        correct += (predicted == labels).sum().item()
        total += labels.numel()
        predictions.append(predicted.cpu())
    model.train(was_training)
    numbers = {
        "top1": 100.0 * correct / max(total, 1),
        "loss": loss_sum / max(total, 1),
        "samples": total,
    }
    return numbers, torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)


def fit(
    model: torch.nn.Module,
    train_loader,
    test_loader,
    step_loss: StepLoss,
    cfg: TrainConfig,
    *,
    preprocess,
    device: torch.device,
    desc: str,
    extra_params: tuple[torch.nn.Parameter, ...] = (),
    show_progress: bool = True,
    checkpoint: Path | None = None,
    checkpoint_key: str = "",
) -> list[EpochLog]:
    """Train ``model`` for ``cfg.epochs`` epochs, evaluating on the test loader after each.

    With ``checkpoint``, the whole training state is written there after every epoch, and a
    checkpoint already there with the same ``checkpoint_key`` is resumed: training continues
    after its epoch with the same weights, optimiser, schedule and random streams, so the
    result matches an uninterrupted run (see :mod:`compress.training.checkpoint`).

    Under torchrun (:mod:`compress.core.distributed`) every rank calls ``fit`` with its share of
    the data: the step runs inside ``DistributedDataParallel`` (gradients of the model and of
    ``extra_params`` averaged over the ranks), the sampler is reshuffled each epoch, the logged
    training loss and accuracy are summed over all ranks, BatchNorm statistics are averaged
    before the evaluation (which every rank runs on the whole test split, with identical
    results), and rank 0 alone writes the checkpoint.

    Args:
        model: the network being trained (put in train mode here).
        test_loader: evaluated after every epoch; None: not evaluated (test fields are NaN).
        step_loss: ``(images, labels, epoch, *extras) -> (loss, logits[, terms])`` on a
            preprocessed batch; ``terms`` (name -> value) are named when the loss diverges.
        extra_params: parameters trained alongside the model (e.g. feature regressors).
        preprocess: batch augmentation + normalisation (``compress.data.augment.Preprocess``).
        checkpoint: the epoch checkpoint file; None: no checkpoints.
        checkpoint_key: what the checkpoint must belong to (the stage's input key and run).

    Returns:
        One :class:`EpochLog` per epoch (resumed epochs included).

    Raises:
        StageError: when the loss becomes NaN or infinite (the last epoch's checkpoint is
            kept), or a checkpoint cannot be written.
    """
    cfg = train_config_for(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad] + list(extra_params)
    optimizer = build_optimizer(params, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(train_loader))
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(cfg, device) == torch.float16)
    memory_format = (
        torch.channels_last if uses_channels_last(cfg, device) else torch.contiguous_format
    )
    model.to(memory_format=memory_format)
    parts = dict(
        model=model,
        extra_params=tuple(extra_params),
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        loader_generator=getattr(train_loader, "generator", None),
    )
    history = _resume(checkpoint, checkpoint_key, parts, desc, cfg.epochs, show_progress)
    train_step = training_step(model, extra_params, step_loss, device, compile=cfg.compile)
    sampler = getattr(train_loader, "sampler", None)
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        if isinstance(sampler, DistributedSampler):
            # a new shuffle per epoch, the same on every rank (and after a resume)
            sampler.set_epoch(epoch)
        started = time.perf_counter()
        bar = tqdm(
            train_loader,
            desc=f"{desc} {epoch}/{cfg.epochs}",
            leave=False,
            disable=not (show_progress and sys.stderr.isatty()),
            dynamic_ncols=True,
        )
        try:
            sums = _train_epoch(
                train_step, bar, epoch, cfg, parts, preprocess, device, memory_format
            )
        except _Diverged as diverged:
            raise StageError(
                _divergence(
                    desc, *diverged.args, epoch, scheduler, checkpoint if epoch > 1 else None
                )
            ) from None
        loss_total, correct_total, labeled_total, seen_total = epoch_totals(*sums)
        # every rank now holds the same network: the same test numbers
        distributed.sync_buffers(model)
        test = (
            evaluate(model, test_loader, preprocess, device)
            if test_loader is not None
            else _NOT_EVALUATED
        )
        log = EpochLog(
            epoch,
            loss_total / max(seen_total, 1),
            100 * correct_total / max(labeled_total, 1),
            test["loss"],
            test["top1"],
            scheduler.get_last_lr()[0],
            time.perf_counter() - started,
        )
        history.append(log)
        if show_progress:
            print(
                f"  {desc} epoch {epoch}/{cfg.epochs}: loss {log.train_loss:.4f}  train "
                f"{log.train_top1:.2f}%  test {log.test_top1:.2f}%  ({log.seconds:.0f}s)",
                file=sys.stderr,
            )
        if checkpoint is not None and distributed.is_main():
            save_training_state(
                checkpoint,
                checkpoint_key,
                epoch=epoch,
                history=[dataclasses.asdict(h) for h in history],
                **parts,
            )
    model.to(memory_format=torch.contiguous_format)
    return history


# fit without a test loader (the library API)
_NOT_EVALUATED = {
    "loss": float("nan"),
    "top1": float("nan"),
}

# on a GPU the loop reads device values (progress, the NaN check) every this many steps
SYNC_EVERY = 10


def checks_every(device: torch.device) -> int:
    """Steps between reads of the NaN flag: every step on the CPU (free), every SYNC_EVERY on a
    GPU, where reading a device value waits for all queued work."""
    return 1 if device.type == "cpu" else SYNC_EVERY


class _Diverged(Exception):
    """(loss, terms, step) of the first non-finite loss of an epoch."""


def _resume(
    checkpoint: Path | None, key: str, parts: dict, desc: str, epochs: int, show_progress: bool
) -> list[EpochLog]:
    """The history so far: restored from the checkpoint (weights, optimiser, RNG, ...) when it
    belongs to ``key``, else empty. Every rank loads the same file: they all continue from
    rank 0's state."""
    state = load_training_state(checkpoint, key) if checkpoint is not None else None
    if state is None:
        return []
    restore_training_state(state, **parts)
    if show_progress:
        print(
            f"  {desc}: resumed after epoch {state['epoch']}/{epochs} from {checkpoint.name}",
            file=sys.stderr,
        )
    return [EpochLog(**entry) for entry in state["history"]]


def _train_epoch(
    train_step, bar, epoch: int, cfg: TrainConfig, parts: dict, preprocess, device, memory_format
):
    """One pass over the training data; returns this rank's (loss sum, correct, labeled, seen)."""
    optimizer, scheduler, scaler = parts["optimizer"], parts["scheduler"], parts["scaler"]
    dtype = autocast_dtype(cfg, device)
    parts["model"].train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    labeled = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    # step of the first non-finite loss
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    check_every = checks_every(device)
    for step, (images, labels, *extras) in enumerate(bar):  # extras: e.g. sample indices
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        extras = [extra.to(device, non_blocking=True) for extra in extras]
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, logits, *terms = train_step(
                preprocess(images, train=True), labels, epoch, *extras
            )
        first_bad = torch.where(~torch.isfinite(loss.detach()) & (first_bad < 0), step, first_bad)
        if step % check_every == 0 and first_bad.item() >= 0:
            raise _Diverged(loss, terms, int(first_bad))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += loss.detach() * labels.numel()
        known = labels >= 0  # images from the unlabeled pool have no accuracy
        # no boolean indexing: no host sync
        correct += ((logits.detach().argmax(1) == labels) & known).sum()
        seen += labels.numel()
        labeled += known.sum()
        if step % SYNC_EVERY == 0:
            bar.set_postfix(
                loss=f"{loss_sum.item() / seen:.3f}",
                acc=f"{100 * correct.item() / max(labeled.item(), 1):.1f}%",
            )
    if first_bad.item() >= 0:  # a non-finite loss after the last check
        raise _Diverged(loss, terms, int(first_bad))
    return loss_sum, correct, labeled, seen


class TrainStep(nn.Module):
    """One training forward (``step_loss``) as a module holding everything it trains: the
    network and the parameters beside it (FitNet regressors), so that DDP averages all their
    gradients and ``torch.compile`` sees the whole step. The teacher, frozen, stays outside."""

    def __init__(self, model: nn.Module, extra_params, step_loss: StepLoss):
        super().__init__()
        self.model = model
        self.extra = nn.ParameterList(extra_params)
        self.step_loss = step_loss

    def forward(self, images, labels, epoch, *extras):
        return self.step_loss(images, labels, epoch, *extras)


def training_step(
    model: nn.Module,
    extra_params,
    step_loss: StepLoss,
    device: torch.device,
    *,
    compile: bool = False,
) -> StepLoss:
    """What ``fit`` calls each step: ``step_loss`` itself in a single process, else the step
    wrapped in ``DistributedDataParallel`` (under torchrun) and/or ``torch.compile``."""
    if not (distributed.active() or compile):
        return step_loss
    step = distributed.data_parallel(TrainStep(model, extra_params, step_loss), device)
    return torch.compile(step) if compile else step


def epoch_totals(
    loss_sum: torch.Tensor, correct: torch.Tensor, labeled: torch.Tensor, seen: int
) -> list[float]:
    """The epoch's loss sum, correct, labeled and seen counts over all ranks (this rank's alone
    without a process group)."""
    totals = torch.stack(
        [
            loss_sum.double(),
            correct.double(),
            labeled.double(),
            torch.tensor(float(seen), dtype=torch.float64, device=loss_sum.device),
        ]
    )
    return distributed.all_reduce_sum(totals).tolist()


def _divergence(desc, loss, terms, step, epoch, scheduler, checkpoint) -> str:
    named = terms[0] if terms and isinstance(terms[0], dict) else {}
    values = ", ".join(f"{name}={float(value):.4g}" for name, value in named.items())
    kept = (
        f"; the checkpoint of epoch {epoch - 1} is kept ({checkpoint})"
        if checkpoint is not None
        else ""
    )
    return (
        f"{desc}: loss became {loss.item()} at epoch {epoch}, step {step}"
        + (f" (terms: {values})" if values else "")
        + f"; lower the learning rate (now {scheduler.get_last_lr()[0]:.3g}){kept}"
    )
