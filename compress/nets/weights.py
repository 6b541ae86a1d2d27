"""Every read and write of network weights: ``state_dict`` files saved atomically and loaded with
``weights_only=True`` only, and a pruned network's layer widths stored beside its state_dict so
the network is rebuilt without unpickling any module."""

from __future__ import annotations

import errno
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.core import distributed
from compress.core.fileio import atomic_path, not_a_file
from compress.errors import ModelError

_MAX_LISTED = 3  # problems named in a load_weights error before "+N more"


_TORCH_WRITE_FAILURES = (
    "inline_container",
    "PytorchStreamWriter",
    "file write failed",
    "unexpected pos",
)


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically.

    torch's writer reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc]
    unexpected pos ...`` (or ``PytorchStreamWriter failed writing file``), not as an OSError;
    that becomes the OSError it is (ENOSPC when the folder's file system has less free space
    than was being written, else EIO), so every caller's "cannot write" handling applies and
    the previous file stays intact.
    """

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            try:
                torch.save(obj, tmp)
            except RuntimeError as exc:
                if not any(marker in str(exc) for marker in _TORCH_WRITE_FAILURES):
                    raise
                written = tmp.stat().st_size if tmp.exists() else 0
                free = shutil.disk_usage(path.parent).free
                code = errno.ENOSPC if free <= max(written, 1 << 20) else errno.EIO
                raise OSError(code, os.strerror(code), str(path)) from None
    except OSError as exc:  # name the destination, not the temporary file beside it
        if exc.filename != str(path):
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    return path


def save_weights(model: torch.nn.Module, path: Path, *, structure: dict | None = None) -> Path:
    """Save a state_dict (plain tensors: loadable with ``weights_only=True``), atomically.

    ``structure`` (layer widths of a pruned network, plain ints) is stored beside the
    state_dict so the network can be rebuilt without unpickling any module. In a distributed
    run only rank 0 writes (every rank gets the path).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if not distributed.is_main():  # a distributed run: rank 0 writes, the others take its artifact
        return path
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_torch(state if structure is None else {"structure": structure, "state_dict": state}, path)
    return path


def load_weights(
    model: nn.Module, path: str | Path, *, prepare: Callable[[nn.Module], nn.Module] | None = None
) -> nn.Module:
    """Load a checkpoint into ``model`` strictly, accepting plain tensors only.

    ``torch.load(..., weights_only=True)`` refuses pickles that would run code, so a checkpoint
    from an untrusted source cannot execute anything here. A pruned network is stored as its
    layer widths (``"structure"``, plain ints) next to its state_dict: the model is resized to
    those widths first, so no module is ever unpickled.

    Args:
        model: The model to fill (e.g. from :func:`build_model`).
        path: A file saved with ``torch.save``: a raw ``state_dict``, or a dict holding one under
            ``"state_dict"`` or ``"model"`` (and optionally the pruned ``"structure"``).
        prepare: turns the (resized) architecture into the module the state_dict belongs to,
            e.g. the fake-quantized graph of a QAT checkpoint.

    Returns:
        The loaded model: ``model`` itself, or what ``prepare`` returned.

    Raises:
        ModelError: The file is missing, is not a checkpoint, holds pickled objects that
            ``weights_only`` refuses, or does not fit the model (missing/unexpected keys, size
            mismatch). The message names the file.
    """
    path = Path(path)
    checkpoint = _torch_load(path)
    structure = checkpoint.get("structure") if isinstance(checkpoint, dict) else None
    if structure is not None:
        if not isinstance(structure, dict):
            raise ModelError(
                f"checkpoint {path}: 'structure' must map layer names to their widths, got "
                f"{type(structure).__name__}"
            )
        apply_structure(model, structure)
    if prepare is not None:
        model = prepare(model)
    state = _state_dict(checkpoint, path)
    problems = mismatches(model.state_dict(), state)
    if problems:
        name = getattr(model, "compress_name", type(model).__name__)
        raise ModelError(f"checkpoint {path} does not fit {name}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
    return model


def read_checkpoint(path: str | Path) -> object:
    """A checkpoint file as saved (``weights_only=True``); one-line ModelError when it cannot be
    read."""
    return _torch_load(Path(path))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The plain tensors of a checkpoint (``weights_only=True``), without building a model."""
    return _state_dict(read_checkpoint(path), Path(path))


_READ_ERRNOS = (errno.EIO, errno.EACCES, errno.EPERM, errno.ENOENT)  # torch.load's EINVAL: corrupt


def _torch_load(path: Path) -> object:
    problem = not_a_file(path)
    if problem is not None:
        what = " does not exist" if problem == "no such file" else f": {problem}"
        raise ModelError(f"checkpoint {path}{what}")
    if path.stat().st_size == 0:
        raise ModelError(
            f"checkpoint {path} is not a PyTorch checkpoint: the file is empty (0 bytes)"
        )
    try:
        # e.g. "Detected pickle protocol 4": the error below says it all
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a file that is not a checkpoint fails the unpickler in many ways
        if isinstance(exc, OSError) and exc.errno in _READ_ERRNOS:  # never "cannot write"
            raise ModelError(f"checkpoint {path}: cannot read it ({exc.strerror})") from None
        text = str(exc)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", text) or re.search(
            r"unsupported GLOBAL (\S+)", text
        )
        if refused:
            raise ModelError(
                f"checkpoint {path} was refused: it would import {refused.group(1)} and only plain "
                "tensors are loaded (weights_only=True); if you trust the file, re-save it with "
                "torch.save(model.state_dict(), path)"
            ) from None
        unreadable = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text)
        reason = unreadable.group(1).strip() if unreadable else _first_sentence(text)
        reason = type(exc).__name__ + (f": {reason}" if reason else "")
        raise ModelError(
            f"checkpoint {path} is not a PyTorch checkpoint, or is truncated or corrupt "
            f"(torch.load: {reason})"
        ) from None


def _first_sentence(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line.split(". ")[0].rstrip(".")


def _state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(v, torch.Tensor) for v in obj.values())
    ):
        raise ModelError(
            f"checkpoint {path} holds no state_dict (expected a dict of tensors, "
            f"or one under 'state_dict' or 'model'; got {type(obj).__name__})"
        )
    return obj


def mismatches(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> list[str]:
    """What keeps ``given`` from loading strictly into a model whose state_dict is ``expected``:
    size mismatches, missing and unexpected keys, the first few of each named."""
    sizes = [
        f"size mismatch for {k}: checkpoint {tuple(given[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and given[k].shape != v.shape
    ]
    missing = _listed("missing keys", [k for k in expected if k not in given])
    unexpected = _listed("unexpected keys", [k for k in given if k not in expected])
    return _listed_items(sizes) + missing + unexpected


def _listed(label: str, keys: list[str]) -> list[str]:
    if not keys:
        return []
    more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return [f"{label} {', '.join(keys[:_MAX_LISTED])}{more}"]


def _listed_items(items: list[str]) -> list[str]:
    if len(items) <= _MAX_LISTED:
        return items
    return items[:_MAX_LISTED] + [f"+{len(items) - _MAX_LISTED} more size mismatches"]


# --- pruned widths -------------------------------------------------------------------------------

# Layers whose widths pruning changes, and the widths stored for each (subclasses count: timm's
# BatchNormAct2d is a BatchNorm2d, its LayerNorm2d a LayerNorm). A LayerNorm's width is its last
# (only) normalised dimension.
_FIELDS: tuple[tuple[type, tuple[str, ...]], ...] = (
    (nn.Conv2d, ("in_channels", "out_channels", "groups")),
    (nn.modules.batchnorm._BatchNorm, ("num_features",)),  # 1d (LeViT's Linear + BN), 2d, 3d
    (nn.Linear, ("in_features", "out_features")),
    (nn.LayerNorm, ("normalized_shape",)),
)
_HEADS = ("num_heads",)


def _fields(module: nn.Module) -> tuple[str, ...] | None:
    """The widths stored for ``module``; None for a layer pruning does not resize."""
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
        return None
    if is_attention(module):
        return _HEADS
    return next((fields for kind, fields in _FIELDS if isinstance(module, kind)), None)


def is_attention(module: nn.Module) -> bool:
    """A multi-head attention whose heads are slices of one ``qkv`` Linear (timm's ViT
    ``Attention``): pruning whole heads changes its ``num_heads``, read by its forward."""
    return (
        isinstance(getattr(module, "qkv", None), nn.Linear)
        and positive_int(getattr(module, "num_heads", None))
        and positive_int(getattr(module, "head_dim", None))
    )


def _width(module: nn.Module, field: str) -> int:
    value = getattr(module, field)
    return int(value[-1] if field == "normalized_shape" else value)


def structure_of(model: nn.Module) -> dict[str, dict[str, int]]:
    """The widths of every Conv2d, BatchNorm, Linear and LayerNorm, and the head count of every
    multi-head attention: what pruning changes, as plain ints.

    Returns:
        ``{module name: {field: int}}``, e.g. ``{"layer1.0.conv1": {"in_channels": 16,
        "out_channels": 8, "groups": 1}}`` or ``{"blocks.0.attn": {"num_heads": 2}}``; JSON-able
        and loadable with ``weights_only=True``.
    """
    return {
        name: {f: _width(module, f) for f in fields}
        for name, module in model.named_modules()
        if (fields := _fields(module)) is not None
    }


def apply_structure(model: nn.Module, structure: dict) -> nn.Module:
    """Resize a freshly built network to the widths of :func:`structure_of`, in place.

    Parameters and buffers become uninitialised tensors of the new shapes: the pruned state_dict
    is meant to be loaded strictly right after.

    Args:
        model: the same architecture the structure was taken from, unpruned.
        structure: ``{module name: {field: int}}``.

    Returns:
        ``model``.

    Raises:
        ModelError: a name the model lacks, a module of another type, missing or non-integer
            widths, or channels not divisible by the groups.
    """
    for name, widths in structure.items():
        module = _module(model, name)
        fields = _fields(module)
        if fields is None:
            raise ModelError(
                f"pruned structure: {name!r} is a {type(module).__name__}, not a layer whose width "
                "is stored"
            )
        if (
            not isinstance(widths, dict)
            or set(widths) != set(fields)
            or not all(positive_int(v) for v in widths.values())
        ):
            raise ModelError(
                f"pruned structure: {name!r} must give positive integers {', '.join(fields)}, got "
                f"{widths!r}"
            )
        # groups divide a width
        grown = [f for f in fields if f != "groups" and widths[f] > _width(module, f)]
        # pruning only removes channels: a wider layer is a corrupt or hostile file (and could
        # exhaust memory)
        if grown:
            raise ModelError(
                f"pruned structure: {name!r} {grown[0]} {widths[grown[0]]} is wider than the "
                f"unpruned layer's {_width(module, grown[0])}"
            )
        _resize(module, name, **widths)
    sync_split_sizes(model)
    return model


def _module(model: nn.Module, name: object) -> nn.Module:
    if isinstance(name, str) and name:
        try:
            return model.get_submodule(name)
        except AttributeError:
            pass
    label = getattr(model, "compress_name", type(model).__name__)
    raise ModelError(
        f"pruned structure names {name!r}, which {label} does not have (a checkpoint of another "
        "architecture?)"
    )


def positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def split_holders(model: nn.Module) -> list[nn.Module]:
    """Modules that split their input's channels at the sizes they hold in ``splits`` and give
    part k to their k-th child (timm's ``MixedConv2d``: MixNet's mixed-kernel convolutions)."""
    return [
        module
        for module in model.modules()
        if isinstance(module, nn.ModuleDict)
        and isinstance(getattr(module, "splits", None), list)
        and len(module.splits) == len(module)
        and all(isinstance(child, nn.Conv2d) for child in module.values())
    ]


def sync_split_sizes(model: nn.Module) -> None:
    """Each split holder's sizes (and its widths) from its children's widths again: after a cut
    of their channels, or a rebuild at a pruned structure."""
    for holder in split_holders(model):
        children = list(holder.values())
        holder.splits = [child.in_channels for child in children]
        if hasattr(holder, "in_channels"):
            holder.in_channels = sum(holder.splits)
        if hasattr(holder, "out_channels"):
            holder.out_channels = sum(child.out_channels for child in children)


def per_output_channel_tensors(conv: nn.Module) -> list[str]:
    """Names of the tensors besides ``weight`` and ``bias`` that a convolution holds one entry
    per output channel of (timm's ``ScaledStdConv2d.gain``)."""
    tensors = [*conv.named_parameters(recurse=False), *conv.named_buffers(recurse=False)]
    return [
        name
        for name, tensor in tensors
        if name not in ("weight", "bias") and tensor.dim() and len(tensor) == conv.out_channels
    ]


def _resize(module: nn.Module, name: str, **widths: int) -> None:
    if isinstance(module, nn.Conv2d):
        cin, cout, groups = widths["in_channels"], widths["out_channels"], widths["groups"]
        if cin % groups or cout % groups:
            raise ModelError(
                f"pruned structure: {name!r} has {cin} in / {cout} out channels, not divisible by "
                f"groups={groups}"
            )
        per_channel = per_output_channel_tensors(module)  # timm's ScaledStdConv2d gain
        module.in_channels, module.out_channels, module.groups = cin, cout, groups
        _replace(module, "weight", (cout, cin // groups, *module.kernel_size))
        _replace(module, "bias", (cout,))
        for tensor in per_channel:
            _replace(module, tensor, (cout, *getattr(module, tensor).shape[1:]))
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        n = module.num_features = widths["num_features"]
        for tensor in ("weight", "bias", "running_mean", "running_var"):
            _replace(module, tensor, (n,))
    elif isinstance(module, nn.LayerNorm):
        n = widths["normalized_shape"]
        module.normalized_shape = (n,)
        for tensor in ("weight", "bias"):
            _replace(module, tensor, (n,))
    elif "num_heads" in widths:  # the qkv and output Linears are resized as layers of their own
        module.num_heads = widths["num_heads"]
        if hasattr(module, "attn_dim"):  # timm >= 1.0.x reshapes the heads' output with it
            module.attn_dim = module.num_heads * module.head_dim
    else:
        module.in_features, module.out_features = widths["in_features"], widths["out_features"]
        _replace(module, "weight", (module.out_features, module.in_features))
        _replace(module, "bias", (module.out_features,))


def _replace(module: nn.Module, attr: str, shape: tuple[int, ...]) -> None:
    """Swap a parameter or buffer (if the module has it) for an empty one of ``shape``."""
    old = getattr(module, attr, None)
    if old is None:
        return
    new = torch.empty(shape, dtype=old.dtype, device=old.device)
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(module, attr, new)  # a registered buffer stays registered
