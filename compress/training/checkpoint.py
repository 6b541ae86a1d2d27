"""Epoch checkpoints of a training loop: what a crashed or interrupted stage resumes from.

After every epoch :func:`compress.training.loop.fit` writes one file per training run (``fit``
call) of a stage: the network, the parameters trained beside it (FitNet regressors), optimiser,
scheduler and gradient-scaler states, every random number generator the loop draws from
(Python, numpy, torch CPU and CUDA, the train loader's shuffle generator), the epoch and the
history so far. Written atomically, so a kill at any moment leaves the previous epoch's file.

The file records the key of the stage's inputs plus the run's name within the stage
(``"<stage key>:<desc>"``): a checkpoint of a different recipe, or of another step of the same
stage, is never resumed. Everything in it is a tensor, number, string or container of those, so
it loads with ``torch.load(weights_only=True)``: a planted file cannot execute code.
"""

from __future__ import annotations

import errno
import random
from pathlib import Path

import numpy as np
import torch

from compress.errors import StageError
from compress.nets.weights import save_torch

FORMAT_VERSION = 1


def save_training_state(
    path: Path,
    key: str,
    *,
    epoch: int,
    model,
    extra_params,
    optimizer,
    scheduler,
    scaler,
    loader_generator,
    history: list[dict],
) -> None:
    """Write the state after ``epoch`` atomically; a full disk is a one-line StageError and the
    previous checkpoint stays intact."""
    state = {
        "version": FORMAT_VERSION,
        "key": key,
        "epoch": epoch,
        "model": model.state_dict(),
        "extra_params": [p.detach().cpu() for p in extra_params],
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_states(loader_generator),
        "history": history,
    }
    try:
        save_torch(state, path)
    except OSError as exc:
        reason = (
            "the disk is full"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT)
            else exc.strerror or str(exc)
        )
        raise StageError(
            f"cannot write the training checkpoint {path}: {reason}; the previous checkpoint is "
            "kept"
        ) from None


def load_training_state(path: Path, key: str) -> dict | None:
    """The checkpoint at ``path`` if it belongs to ``key``; None when absent, stale or unreadable
    (training then starts from the beginning, as if there were none)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated, corrupt or hostile: never resumed
        return None
    if (
        not isinstance(state, dict)
        or state.get("version") != FORMAT_VERSION
        or state.get("key") != key
    ):
        return None
    return state


def restore_training_state(
    state: dict, *, model, extra_params, optimizer, scheduler, scaler, loader_generator
) -> None:
    """Put every part of a checkpoint back; a network that does not fit it raises StageError."""
    try:
        model.load_state_dict(state["model"])
        for param, saved in zip(extra_params, state["extra_params"], strict=True):
            param.data.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise StageError(
            f"the training checkpoint does not fit this network ({str(exc).splitlines()[0]}); "
            "delete it to start over"
        ) from None
    set_rng_states(state["rng"], loader_generator)


def rng_states(loader_generator: torch.Generator | None) -> dict:
    """Every generator a training epoch draws from, as tensors and plain numbers."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": loader_generator.get_state() if loader_generator is not None else None,
    }


def set_rng_states(states: dict, loader_generator: torch.Generator | None) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if loader_generator is not None and states["loader"] is not None:
        loader_generator.set_state(states["loader"])


def checkpoint_name(desc: str) -> str:
    """``train-<desc>.ckpt`` with the description made file-name safe."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in desc).strip("-") or "fit"
    return f"train-{safe}.ckpt"
