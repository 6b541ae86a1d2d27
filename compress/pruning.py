"""Structured channel pruning: Torch-Pruning's dependency graph, driven by a :class:`PruneConfig`.

Removing a channel from one conv must remove it everywhere it flows: the BatchNorm after it, the
next conv's input, every branch of a residual add, the depthwise conv that mirrors it. Torch-
Pruning's ``DependencyGraph`` finds those coupled groups and its pruner ranks and removes whole
groups, so this module is glue (STYLE habit 4): importance by name, ignored layers by name, a
MACs target reached progressively, and a pruned network saved as plain layer widths.

A pruned network is stored as ``structure_of(model)`` (ints per layer) next to its state_dict;
``apply_structure`` resizes a freshly built network to those widths, so loading never unpickles a
module (Torch-Pruning's own ``tp.state_dict`` restores arbitrary ``__dict__`` contents, which
``torch.load(weights_only=True)`` rightly refuses).

Example:
    >>> pruner = ChannelPruner(model, example_inputs, PruneConfig(speedup=2.0), num_classes=10)
    >>> pruner.prune(target_macs=macs // 2)
    >>> save_weights(model, path, structure=structure_of(model))
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch_pruning as tp
from torch import nn

from compress.config import PruneConfig
from compress.errors import ModelError, RecipeError, StageError
from compress.models import count_params_macs
from compress.registry import Registry

# With a MACs target the pruner takes this many small steps from 0 to max_layer_ratio and stops at
# the first one that meets the target (Torch-Pruning's benchmarks' ``progressive_pruning``).
PROGRESSIVE_STEPS = 100

GradientFn = Callable[[nn.Module], None]

# --- importance criteria -----------------------------------------------------------------------

CRITERIA: Registry[Callable[[PruneConfig], tp.importance.Importance]] = Registry("pruning criterion", RecipeError)


@CRITERIA.register("magnitude")
def _magnitude(cfg: PruneConfig):
    """Group Lp norm of every weight a channel touches (Li et al. 2017, grouped as in DepGraph)."""
    return tp.importance.GroupMagnitudeImportance(p=cfg.norm)


@CRITERIA.register("taylor")
def _taylor(cfg: PruneConfig):
    """|weight x gradient|, the first-order loss change (Molchanov et al. 2019); needs gradients."""
    return tp.importance.GroupTaylorImportance()


@CRITERIA.register("bn_scale")
def _bn_scale(cfg: PruneConfig):
    """|gamma| of the BatchNorm after each channel (network slimming, Liu et al. 2017)."""
    return tp.importance.BNScaleImportance()


@CRITERIA.register("lamp")
def _lamp(cfg: PruneConfig):
    """Layer-adaptive magnitude scores (Lee et al. 2021): comparable across layers."""
    return tp.importance.LAMPImportance(p=cfg.norm)


@CRITERIA.register("random")
def _random(cfg: PruneConfig):
    """Random ranking: the baseline every criterion must beat."""
    return tp.importance.RandomImportance()


# --- pruning -----------------------------------------------------------------------------------


class ChannelPruner:
    """One Torch-Pruning pruner for ``model``, kept across prune / fine-tune rounds.

    Widths are always relative to the network the pruner was built on, so ``rounds`` calls of
    :meth:`prune` with fine-tuning in between end exactly where one call would (iterative pruning).
    The model is pruned in place; its modules stay the same objects, so an optimiser must be
    rebuilt after each round (their parameters are replaced).

    Args:
        model: the network to prune (any mode/device; it is traced in eval mode).
        example_inputs: a batch shaped like the real input, on the model's device (traced once).
        cfg: criterion, norm, global_ranking, round_to, max_layer_ratio, ignore, pruning_ratio.
        num_classes: every Linear/Conv with this many outputs is the classifier and is never pruned.
        rounds: how many :meth:`prune` calls reach ``cfg.pruning_ratio`` (ignored for MACs targets).

    Raises:
        RecipeError: an ``ignore`` pattern matches no module.
        StageError: ``pruning_ratio`` exceeds ``max_layer_ratio``.
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, cfg: PruneConfig, *, num_classes: int, rounds: int = 1):
        self.model, self.example, self.cfg = model, example_inputs, cfg
        self.by_ratio = cfg.pruning_ratio is not None
        if self.by_ratio and cfg.pruning_ratio > cfg.max_layer_ratio:
            raise StageError(f"pruning_ratio: {cfg.pruning_ratio} removes more than max_layer_ratio ({cfg.max_layer_ratio}) of each layer; lower it or raise max_layer_ratio")
        ignored = classifier_layers(model, num_classes) + matching_modules(model, cfg.ignore)
        with _eval_mode(model):
            self._pruner = tp.pruner.BasePruner(
                model, example_inputs, CRITERIA.get(cfg.criterion)(cfg),
                global_pruning=cfg.global_ranking,
                pruning_ratio=cfg.pruning_ratio if self.by_ratio else cfg.max_layer_ratio,
                max_pruning_ratio=cfg.max_layer_ratio,
                iterative_steps=rounds if self.by_ratio else PROGRESSIVE_STEPS,
                ignored_layers=ignored,
                round_to=cfg.round_to if cfg.round_to > 1 else None,
            )

    def prune(self, target_macs: int | None = None, gradient_fn: GradientFn | None = None) -> dict:
        """One round: the next step of ``pruning_ratio``, or small steps until MACs <= ``target_macs``.

        Args:
            target_macs: MACs of one image to reach; None with ``pruning_ratio``.
            gradient_fn: ``gradient_fn(model)`` runs ``loss.backward()`` on a few real batches; the
                ``taylor`` criterion calls it (model in eval mode) before every pruning step.

        Returns:
            ``macs``, ``params`` (one image) and ``pruner_steps`` taken so far.

        Raises:
            StageError: the target is not reached before every layer has lost ``max_layer_ratio``.
        """
        if self.by_ratio == (target_macs is not None):
            raise ValueError("give target_macs exactly when the config has no pruning_ratio")
        if self.cfg.criterion == "taylor" and gradient_fn is None:
            raise ValueError("the taylor criterion needs a gradient_fn")
        if self.by_ratio:
            self._step(gradient_fn)
        params, macs = self._count()
        while target_macs is not None and macs > target_macs:
            if self._pruner.current_step >= self._pruner.iterative_steps:
                raise StageError(
                    f"prune: cannot reach {target_macs:,} MACs within max_layer_ratio {self.cfg.max_layer_ratio} "
                    f"(stopped at {macs:,}); raise max_layer_ratio, lower the target or ignore fewer layers"
                )
            self._step(gradient_fn)
            params, macs = self._count()
        return {"macs": macs, "params": params, "pruner_steps": self._pruner.current_step}

    def _step(self, gradient_fn: GradientFn | None) -> None:
        with _eval_mode(self.model):
            if self.cfg.criterion == "taylor":
                self.model.zero_grad(set_to_none=True)
                gradient_fn(self.model)
            self._pruner.step()
        self.model.zero_grad(set_to_none=True)  # Torch-Pruning slices stale gradients along

    def _count(self) -> tuple[int, int]:
        _, channels, size, _ = self.example.shape
        return count_params_macs(self.model, size, channels)


def prune_network(
    model: nn.Module, example_inputs: torch.Tensor, cfg: PruneConfig, *,
    num_classes: int, target_macs: int | None = None, gradient_fn: GradientFn | None = None,
) -> dict:
    """Prune ``model`` in place, in one round (see :class:`ChannelPruner` for the arguments).

    Returns:
        ``macs``, ``params`` and ``pruner_steps`` after pruning.
    """
    pruner = ChannelPruner(model, example_inputs, cfg, num_classes=num_classes)
    return pruner.prune(target_macs, gradient_fn)


def classifier_layers(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """Every Linear/Conv producing ``num_classes`` outputs: pruning those would change the task."""
    return [
        m for m in model.modules()
        if (isinstance(m, nn.Linear) and m.out_features == num_classes)
        or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes)
    ]


def matching_modules(model: nn.Module, patterns: tuple[str, ...]) -> list[nn.Module]:
    """Modules whose name matches any fnmatch pattern; a pattern matching nothing is a recipe error."""
    names = [name for name, _ in model.named_modules() if name]
    found: list[nn.Module] = []
    for pattern in patterns:
        hits = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            close = difflib.get_close_matches(pattern, names, n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise RecipeError(f"ignore: {pattern!r} matches no module of the student{hint}")
        found += [model.get_submodule(name) for name in hits]
    return found


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Tracing and ranking must not move BatchNorm statistics; restore each module's mode after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


# --- saving and rebuilding pruned widths -------------------------------------------------------

_FIELDS: dict[type, tuple[str, ...]] = {
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.BatchNorm2d: ("num_features",),
    nn.Linear: ("in_features", "out_features"),
}


def structure_of(model: nn.Module) -> dict[str, dict[str, int]]:
    """The widths of every Conv2d, BatchNorm2d and Linear: what pruning changes, as plain ints.

    Returns:
        ``{module name: {field: int}}``, e.g. ``{"layer1.0.conv1": {"in_channels": 16,
        "out_channels": 8, "groups": 1}}``; JSON-able and loadable with ``weights_only=True``.
    """
    return {
        name: {f: int(getattr(module, f)) for f in _FIELDS[type(module)]}
        for name, module in model.named_modules()
        if type(module) in _FIELDS
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
        fields = _FIELDS.get(type(module))
        if fields is None:
            raise ModelError(f"pruned structure: {name!r} is a {type(module).__name__}, not a layer whose width is stored")
        if not isinstance(widths, dict) or set(widths) != set(fields) or not all(_positive_int(v) for v in widths.values()):
            raise ModelError(f"pruned structure: {name!r} must give positive integers {', '.join(fields)}, got {widths!r}")
        grown = [f for f in fields if f != "groups" and widths[f] > getattr(module, f)]  # groups divide a width
        if grown:  # pruning only removes channels: a wider layer is a corrupt or hostile file (and could exhaust memory)
            raise ModelError(f"pruned structure: {name!r} {grown[0]} {widths[grown[0]]} is wider than the unpruned layer's {getattr(module, grown[0])}")
        _resize(module, name, **widths)
    return model


def _module(model: nn.Module, name: object) -> nn.Module:
    if isinstance(name, str) and name:
        try:
            return model.get_submodule(name)
        except AttributeError:
            pass
    label = getattr(model, "compress_name", type(model).__name__)
    raise ModelError(f"pruned structure names {name!r}, which {label} does not have (a checkpoint of another architecture?)")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _resize(module: nn.Module, name: str, **widths: int) -> None:
    if isinstance(module, nn.Conv2d):
        cin, cout, groups = widths["in_channels"], widths["out_channels"], widths["groups"]
        if cin % groups or cout % groups:
            raise ModelError(f"pruned structure: {name!r} has {cin} in / {cout} out channels, not divisible by groups={groups}")
        module.in_channels, module.out_channels, module.groups = cin, cout, groups
        _replace(module, "weight", (cout, cin // groups, *module.kernel_size))
        _replace(module, "bias", (cout,))
    elif isinstance(module, nn.BatchNorm2d):
        n = module.num_features = widths["num_features"]
        for tensor in ("weight", "bias", "running_mean", "running_var"):
            _replace(module, tensor, (n,))
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
