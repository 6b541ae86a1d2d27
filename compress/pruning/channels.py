"""Structured channel pruning: Torch-Pruning's dependency graph, driven by a :class:`PruneSpec`.

Removing a channel from one conv must remove it everywhere it flows: the BatchNorm after it, the
next conv's input, every branch of a residual add, the depthwise conv that mirrors it. Torch-
Pruning's ``DependencyGraph`` finds those coupled groups and its pruner ranks and removes whole
groups, so this module is glue (CONTRIBUTING.md, habit 4): importance by name, ignored layers by
name, a
MACs target reached progressively, and a pruned network saved as plain layer widths. A vision
transformer (timm's ViT) loses whole attention heads and MLP width, never its token width
(:func:`attention_heads`, :func:`compress.pruning.channel_flow.frozen_layers`).

Where Torch-Pruning cannot follow the channels (a channel shuffle, a split at sizes the forward
holds, weights used outside their layer; :mod:`compress.pruning.channel_flow`) those channels keep
their width and the rest is pruned; views and splits are mapped from the shapes torch recorded
(:func:`map_views`, :func:`map_splits`), as Torch-Pruning 1.6 misreads them on torch 2. Any other
failure inside Torch-Pruning is one :class:`StageError` line naming the layer where the cut network
breaks, and the network is left as it was.

A pruned network is stored as ``structure_of(model)`` (ints per layer) next to its state_dict;
``apply_structure`` resizes a freshly built network to those widths, so loading never unpickles a
module (Torch-Pruning's own ``tp.state_dict`` restores arbitrary ``__dict__`` contents, which
``torch.load(weights_only=True)`` rightly refuses).

Example:
    >>> pruner = ChannelPruner(model, example_inputs, PruneSpec(speedup=2.0), num_classes=10)
    >>> pruner.prune(target_macs=macs // 2)
    >>> save_weights(model, path, structure=structure_of(model))
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from compress.core.registry import load_entry
from compress.errors import CompressError, SettingError, StageError, first_line
from compress.nets.models import count_params_macs
from compress.nets.modes import evaluating
from compress.nets.weights import is_attention, sync_split_sizes
from compress.pruning.channel_flow import (
    SplitPruner,
    frozen_layers,
    map_concats,
    map_slices,
    map_splits,
    map_views,
    sliced_channel_producers,
)
from compress.pruning.cuts import GroupedRoundingPruner, prune_group, traced_as_plain_convolutions
from compress.pruning.spec import PRUNING_CRITERIA, PruneSpec

# With a MACs target the pruner takes this many small steps from 0 to max_layer_ratio and stops at
# the first one that meets the target (Torch-Pruning's benchmarks' ``progressive_pruning``).
PROGRESSIVE_STEPS = 100

GradientFn = Callable[[nn.Module], None]

# --- importance criteria -----------------------------------------------------------------------


def magnitude_importance(cfg: PruneSpec):
    """Group Lp norm of every weight a channel touches (Li et al. 2017, grouped as in DepGraph)."""
    return tp.importance.GroupMagnitudeImportance(p=cfg.norm)


def taylor_importance(cfg: PruneSpec):
    """|weight x gradient|, the first-order loss change (Molchanov et al. 2019); needs gradients."""
    return tp.importance.GroupTaylorImportance()


def bn_scale_importance(cfg: PruneSpec):
    """|gamma| of the BatchNorm after each channel (network slimming, Liu et al. 2017)."""
    return tp.importance.BNScaleImportance()


def lamp_importance(cfg: PruneSpec):
    """Layer-adaptive magnitude scores (Lee et al. 2021): comparable across layers."""
    return tp.importance.LAMPImportance(p=cfg.norm)


def random_importance(cfg: PruneSpec):
    """Random ranking: the baseline every criterion must beat."""
    return tp.importance.RandomImportance()


# --- pruning -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must go together (Torch-Pruning's dependency group), seen from its layers.

    Attributes:
        name: its root layer's name (the layer whose output channels define it).
        channels: how many channels it has now.
        outs: the convolution / linear layers whose output width it is.
        ins: those whose input width it is.
        importance: each channel's score by the criterion (lower goes first).
    """

    name: str
    channels: int
    outs: tuple[str, ...]
    ins: tuple[str, ...]
    importance: torch.Tensor = field(repr=False)
    _root: nn.Module = field(repr=False, compare=False, default=None)
    _handler: Callable = field(repr=False, compare=False, default=None)


class ChannelPruner:
    """One Torch-Pruning pruner for ``model``, kept across prune / fine-tune rounds.

    Widths are always relative to the network the pruner was built on, so ``rounds`` calls of
    :meth:`prune` with fine-tuning in between end exactly where one call would (iterative pruning).
    The model is pruned in place; its modules stay the same objects, so an optimiser must be
    rebuilt after each round (their parameters are replaced). A round either completes or leaves
    the network exactly as it was (:meth:`prune` raises then).

    Channels that Torch-Pruning cannot follow keep their width (:func:`frozen_layers` says which
    and why: a channel shuffle, channels split or sliced at fixed sizes, weights used outside
    their layer, a parameter of no layer, a layer whose width a checkpoint cannot store); the
    rest of the network is pruned.

    Args:
        model: the network to prune (any mode/device; it is traced in eval mode).
        example_inputs: a batch shaped like the real input, on the model's device (traced once).
        cfg: criterion, norm, global_ranking, round_to, max_layer_ratio, ignore, pruning_ratio.
        num_classes: every Linear/Conv with this many outputs is the classifier and is never pruned.
        rounds: how many :meth:`prune` calls reach ``cfg.pruning_ratio`` (ignored for MACs targets).

    Attributes:
        frozen: ``{layer: why}`` for the layers that keep their output width.

    Raises:
        SettingError: an ``ignore`` pattern matches no module.
        StageError: ``pruning_ratio`` exceeds ``max_layer_ratio``, or Torch-Pruning cannot trace
            the network (nothing is changed then).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor,
        cfg: PruneSpec,
        *,
        num_classes: int,
        rounds: int = 1,
    ):
        self.model, self.example, self.cfg = model, example_inputs, cfg
        self.by_ratio = cfg.pruning_ratio is not None
        if self.by_ratio and cfg.pruning_ratio > cfg.max_layer_ratio:
            raise StageError(
                f"pruning_ratio: {cfg.pruning_ratio} removes more than max_layer_ratio "
                f"({cfg.max_layer_ratio}) of each layer; lower it or raise max_layer_ratio"
            )
        ignored = classifier_layers(model, num_classes) + matching_modules(model, cfg.ignore)
        self._heads = attention_heads(model)
        with evaluating(model), torch.no_grad():
            self._output_shape = _output_of(model, example_inputs).shape
        self._macs = self._count()[1]
        with (
            _torch_pruning(model, example_inputs, "trace"),
            evaluating(model),
            traced_as_plain_convolutions(model),
        ):
            sliced = sliced_channel_producers(model, example_inputs, customized_pruners())
            self._pruner = self._build(ignored + list(sliced), rounds)
            self.frozen: dict[nn.Module, str] = sliced | frozen_layers(
                self._pruner, model, self._unfollowable
            )
            if self.frozen:  # rebuilt: global ranking counts only the channels it may remove
                self._pruner = self._build(ignored + list(self.frozen), rounds)

    def _build(self, ignored: list[nn.Module], rounds: int) -> tp.pruner.BasePruner:
        cfg = self.cfg
        ratio = cfg.pruning_ratio if self.by_ratio else cfg.max_layer_ratio
        pruner = GroupedRoundingPruner(
            self.model,
            self.example,
            load_entry(PRUNING_CRITERIA[cfg.criterion])(cfg),
            global_pruning=cfg.global_ranking,
            pruning_ratio=ratio,
            max_pruning_ratio=cfg.max_layer_ratio,
            iterative_steps=rounds if self.by_ratio else PROGRESSIVE_STEPS,
            ignored_layers=ignored,
            round_to=cfg.round_to if cfg.round_to > 1 else None,
            # whole heads go (scheduled by _schedule_heads): the heads left compute as before
            num_heads={attention.qkv: attention.num_heads for attention in self._heads},
            prune_num_heads=not cfg.global_ranking,
            prune_head_dims=False,
            customized_pruners=customized_pruners(),
        )
        self._unfollowable = {**map_views(pruner.DG), **map_splits(pruner.DG)}
        map_concats(pruner.DG)
        map_slices(pruner.DG)
        return pruner

    def prune(self, target_macs: int | None = None, gradient_fn: GradientFn | None = None) -> dict:
        """One round: the next step of ``pruning_ratio``, or small steps until
        MACs <= ``target_macs``.

        Args:
            target_macs: MACs of one image to reach; None with ``pruning_ratio``.
            gradient_fn: ``gradient_fn(model)`` runs ``loss.backward()`` on a few real batches; the
                ``taylor`` criterion calls it (model in eval mode) before every pruning step.

        Returns:
            ``macs``, ``params`` (one image) and ``pruner_steps`` taken so far.

        Raises:
            StageError: the target is not reached before every layer has lost ``max_layer_ratio``,
                or a cut broke the network; the network is left as it was before the call.
        """
        if self.by_ratio == (target_macs is not None):
            raise ValueError("give target_macs exactly when the config has no pruning_ratio")
        if self.cfg.criterion == "taylor" and gradient_fn is None:
            raise ValueError("the taylor criterion needs a gradient_fn")
        with _torch_pruning(self.model, self.example, "cut", restore=True):
            if self.by_ratio:
                self._step(gradient_fn)
            params, macs = self._count()
            while target_macs is not None and macs > target_macs:
                if self._pruner.current_step >= self._pruner.iterative_steps:
                    raise StageError(
                        f"prune: cannot reach {target_macs:,} MACs within max_layer_ratio "
                        f"{self.cfg.max_layer_ratio}: it stops at {macs:,} "
                        f"({self._macs / macs:.2f}x fewer than {self._macs:,}); the network is "
                        "left as it was. Lower the target, raise max_layer_ratio or ignore fewer "
                        f"layers{self._frozen_note()}"
                    )
                self._step(gradient_fn)
                params, macs = self._count()
            self._check_output()
        return {"macs": macs, "params": params, "pruner_steps": self._pruner.current_step}

    def channel_groups(self, gradient_fn: GradientFn | None = None) -> list[ChannelGroup]:
        """Every channel group of the network as it is now that may lose channels, with each
        channel's importance by the criterion (the ``taylor`` one runs ``gradient_fn`` first).

        Groups whose channels come in blocks (grouped convolutions, attention heads) are left
        out: their widths move in steps this view does not model.
        """
        pruner, graph = self._pruner, self._pruner.DG
        names = {module: name for name, module in self.model.named_modules()}
        with _torch_pruning(self.model, self.example, "rank"), evaluating(self.model):
            if self.cfg.criterion == "taylor":
                self.model.zero_grad(set_to_none=True)
                gradient_fn(self.model)
            groups = []
            for group in graph.get_all_groups(
                ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
            ):
                if pruner._get_channel_groups(group) > 1 or pruner._is_atten_group(group)[0]:
                    continue
                importance = pruner.estimate_importance(group)
                if importance is None:
                    continue
                root = group[0].dep.target.module
                sides = [
                    (names[dep.target.module], graph.is_out_channel_pruning_fn(dep.handler))
                    for dep, _ in group
                    if isinstance(dep.target.module, nn.Conv2d | nn.Linear)
                ]
                groups.append(
                    ChannelGroup(
                        name=names[root],
                        channels=len(importance),
                        outs=tuple(dict.fromkeys(n for n, out in sides if out)),
                        ins=tuple(dict.fromkeys(n for n, out in sides if not out)),
                        importance=importance.detach().cpu(),
                        _root=root,
                        _handler=group[0].dep.handler,
                    )
                )
        self.model.zero_grad(set_to_none=True)
        return groups

    def keep(self, groups: list[ChannelGroup], widths: dict[str, int]) -> None:
        """Cut each group to ``widths[group.name]`` channels, removing its least important ones
        (groups not named keep their width); all or nothing, as :meth:`prune`."""
        graph = self._pruner.DG
        with (
            _torch_pruning(self.model, self.example, "cut", restore=True),
            evaluating(self.model),
        ):
            for group in groups:
                width = widths.get(group.name, group.channels)
                if width >= group.channels:
                    continue
                drop = torch.argsort(group.importance)[: group.channels - width].tolist()
                cut = graph.get_pruning_group(group._root, group._handler, drop)
                if not graph.check_pruning_group(cut):
                    raise StageError(f"prune: Torch-Pruning refused to cut {group.name}")
                prune_group(cut)
            sync_split_sizes(self.model)
            self._check_output()
        self.model.zero_grad(set_to_none=True)

    def _step(self, gradient_fn: GradientFn | None) -> None:
        self._schedule_heads()
        with evaluating(self.model):
            if self.cfg.criterion == "taylor":
                self.model.zero_grad(set_to_none=True)
                gradient_fn(self.model)
            for group in self._pruner.step(interactive=True):
                prune_group(group)
        sync_split_sizes(self.model)  # MixNet's mixed convolutions split at the widths left
        for attention in self._heads:  # its forward reshapes by the head count it holds
            attention.num_heads = self._pruner.num_heads[attention.qkv]
            if hasattr(attention, "attn_dim"):
                attention.attn_dim = attention.num_heads * attention.head_dim
        self.model.zero_grad(set_to_none=True)  # Torch-Pruning slices stale gradients along

    def _schedule_heads(self) -> None:
        """Each attention's head count for the coming step: the fraction of the channels' ratio
        reached in whole heads, at least one left.

        Torch-Pruning removes ``ceil(ratio * heads now)`` heads at every step, which compounds
        over iterative steps (and empties a 3-head attention in three); the ratio handed to it
        here removes exactly the heads still to go.
        """
        pruner = self._pruner
        if not self._heads or not pruner.prune_num_heads:
            return
        step = pruner.current_step + 1
        ratio = min(pruner.per_step_pruning_ratio[step], self.cfg.max_layer_ratio)
        for attention in self._heads:
            now = pruner.num_heads[attention.qkv]
            keep = max(1, math.ceil(pruner.init_num_heads[attention.qkv] * (1 - ratio) - 1e-9))
            remove = max(0, now - keep)
            share = (remove - 0.5) / now if remove else 0.0  # Torch-Pruning rounds it up
            pruner.head_pruning_ratio_dict[attention.qkv] = [share] * (pruner.iterative_steps + 1)

    def _count(self) -> tuple[int, int]:
        _, channels, size, _ = self.example.shape
        return count_params_macs(self.model, size, channels)

    def _check_output(self) -> None:
        """The cut network still runs and answers in the shape it did (a cut Torch-Pruning got
        wrong can leave shapes that still multiply)."""
        with evaluating(self.model), torch.no_grad():
            shape = _output_of(self.model, self.example).shape
        if shape != self._output_shape:
            raise StageError(
                f"prune: the cut network answers in shape {tuple(shape)} instead of "
                f"{tuple(self._output_shape)}"
            )

    def _frozen_note(self) -> str:
        """Why some layers kept their width, for the error that says the target is out of reach."""
        if not self.frozen:
            return ""
        return (
            f" ({len(self.frozen)} layers must keep their width, e.g. "
            f"{next(iter(self.frozen.values()))})"
        )


def prune_network(
    model: nn.Module,
    example_inputs: torch.Tensor,
    cfg: PruneSpec,
    *,
    num_classes: int,
    target_macs: int | None = None,
    gradient_fn: GradientFn | None = None,
) -> dict:
    """Prune ``model`` in place, in one round (see :class:`ChannelPruner` for the arguments).

    Returns:
        ``macs``, ``params`` and ``pruner_steps`` after pruning.
    """
    pruner = ChannelPruner(model, example_inputs, cfg, num_classes=num_classes)
    return pruner.prune(target_macs, gradient_fn)


def target_macs(spec: PruneSpec, macs: int) -> int | None:
    """The MACs to reach: ``target_macs``, else ``macs / speedup`` (2.0 by default); None with a
    ratio."""
    if spec.pruning_ratio is not None:
        return None
    if spec.target_macs is not None:
        return spec.target_macs
    return round(macs / (spec.speedup or 2.0))


def step_targets(spec: PruneSpec, macs: int, steps: int) -> list[int | None]:
    """The MACs each of ``steps`` rounds prunes to: a geometric schedule from ``macs`` to the
    target, so every round removes the same fraction (None per round with ``pruning_ratio``).

    Raises:
        StageError: the target is not below ``macs``.
    """
    target = target_macs(spec, macs)
    if target is None:
        return [None] * steps
    if target >= macs:
        raise StageError(
            f"target_macs: {target:,} is not below the network's {macs:,} MACs; nothing to prune"
        )
    return [round(macs * (target / macs) ** (k / steps)) for k in range(1, steps + 1)]


def classifier_layers(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """Every Linear/Conv producing ``num_classes`` outputs: pruning those would change the task."""
    return [
        m
        for m in model.modules()
        if (isinstance(m, nn.Linear) and m.out_features == num_classes)
        or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes)
    ]


def attention_heads(model: nn.Module) -> list[nn.Module]:
    """Every multi-head attention whose heads are slices of one ``qkv`` Linear (timm's ViT
    ``Attention``). Torch-Pruning removes whole heads of these (its ``num_heads``), never a
    head's inner dimensions, which would change the softmax temperature of every head left."""
    return [m for m in model.modules() if is_attention(m)]


def customized_pruners() -> dict:
    """Views, splits and concatenations are mapped by map_views, map_splits and map_concats."""
    return {
        tp.ops._ReshapeOp: tp.ops.ReshapePruner(),
        tp.ops._SplitOp: SplitPruner(),
        tp.ops._ConcatOp: tp.ops.ConcatPruner(),
    }


def matching_modules(model: nn.Module, patterns: tuple[str, ...]) -> list[nn.Module]:
    """Modules whose name matches any fnmatch pattern; a pattern matching nothing is a recipe
    error."""
    names = [name for name, _ in model.named_modules() if name]
    found: list[nn.Module] = []
    for pattern in patterns:
        hits = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            close = difflib.get_close_matches(pattern, names, n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise SettingError(f"ignore: {pattern!r} matches no module of the student{hint}")
        found += [model.get_submodule(name) for name in hits]
    return found


# --- all or nothing ----------------------------------------------------------------------------

_NOISE = (
    "Unwrapped parameters detected",  # it would prune them: frozen_layers sees it does not
    "Maximum recursive depth reached",  # it could not infer a width: mapped as unknown
)


@contextmanager
def _torch_pruning(
    model: nn.Module, example: torch.Tensor, doing: str, *, restore: bool = False
) -> Iterator[None]:
    """Around every call into Torch-Pruning: any exception from inside it, or from the network
    it cut, becomes a one-line :class:`StageError` naming the layer where the network breaks;
    with ``restore`` the network is put back as it was on entry (its modules stay the same
    objects). Its warnings about what :func:`frozen_layers` handles are silenced."""
    saved = _attributes(model) if restore else None
    try:
        with warnings.catch_warnings():
            for noise in _NOISE:
                warnings.filterwarnings("ignore", message=noise)
            yield
    except BaseException as exc:
        error = None
        if isinstance(exc, Exception) and not isinstance(exc, CompressError):
            error = _stage_error(model, example, doing, exc, restored=restore)
        if saved is not None:
            _restore(model, saved)
        if error is None:
            raise
        raise error from exc


def _stage_error(
    model: nn.Module, example: torch.Tensor, doing: str, exc: Exception, *, restored: bool
) -> StageError:
    label = getattr(model, "compress_name", type(model).__name__)
    what = f"{type(exc).__name__}: {first_line(exc, 200)}"
    left = "the network is left as it was" if restored else "nothing was pruned"
    if doing == "trace":  # its graph is traced whole: ignored layers are in it too
        return StageError(
            f"prune: Torch-Pruning failed to trace {label}: {what}; {left}. prune.ignore does not "
            "change the graph it builds: run this network without the prune stage"
        )
    broken = _failing_layer(model, example) if doing == "cut" else None
    if broken is None:
        return StageError(
            f"prune: Torch-Pruning failed to {doing} {label}: {what}; {left}. Keep the channels "
            "where it fails with prune.ignore: [layer names or patterns]"
        )
    layer, feeder = broken
    at = f" at {layer!r} ({type(model.get_submodule(layer)).__name__})" if layer else ""
    keep = f"prune.ignore: [{feeder!r}], the layer feeding it" if feeder else "prune.ignore"
    return StageError(
        f"prune: the cut broke {label}{at}: {what}; {left}. Keep the channels that reach it "
        f"with {keep}"
    )


def _failing_layer(model: nn.Module, example: torch.Tensor) -> tuple[str, str | None] | None:
    """None if the network runs on ``example``; else the innermost module whose forward raises
    ("" for the network's own) and the last convolution or Linear that ran before it: what most
    likely feeds it."""
    names = {module: name for name, module in model.named_modules()}
    running: list[nn.Module] = []
    finished: list[nn.Module] = []

    def leave(module, args, out):
        finished.append(running.pop())

    hooks = [
        hook
        for module in model.modules()
        for hook in (
            module.register_forward_pre_hook(lambda module, args: running.append(module)),
            module.register_forward_hook(leave),
        )
    ]
    try:
        with evaluating(model), torch.no_grad():
            model(example)
    except Exception:
        layers = [m for m in finished if isinstance(m, tp.ops.TORCH_CONV | tp.ops.TORCH_LINEAR)]
        return names.get(running[-1], "") if running else "", names[layers[-1]] if layers else None
    finally:
        for hook in hooks:
            hook.remove()
    return None


def _attributes(model: nn.Module) -> dict[nn.Module, dict]:
    """Every module's attributes, parameters and buffers (not its submodules), one level deep:
    enough to undo a cut, as Torch-Pruning replaces tensors and widths rather than editing
    them (a deep copy would double the memory, and fails on a non-leaf tensor a module caches)."""
    return {
        module: {
            key: copy.copy(value) if isinstance(value, dict | list | set) else value
            for key, value in vars(module).items()
            if key != "_modules"
        }
        for module in model.modules()
    }


def _restore(model: nn.Module, saved: dict[nn.Module, dict]) -> None:
    """Put the attributes :func:`_attributes` took back into the same module objects."""
    for module, attributes in saved.items():
        vars(module).update(attributes)


def _output_of(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    out = model(example)
    return out if isinstance(out, torch.Tensor) else tp.utils.flatten_as_list(out)[0]
