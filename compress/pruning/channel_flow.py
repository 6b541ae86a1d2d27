"""Where Torch-Pruning can follow a network's channels, and where it cannot.

Torch-Pruning follows a channel through every operation it traced. Some operations it cannot
follow, and a cut through them crashes, hangs or leaves a network that no longer runs: the groups
of channels that pass through one keep their width (:func:`frozen_layers`), the rest is pruned.
Views and splits it misreads on torch 2 (it looks for ``grad_fn`` attributes torch 1 had) are
mapped here from the shapes torch recorded (:func:`map_views`, :func:`map_splits`), the widths
of concatenations it gives up inferring are read once (:func:`map_concats`), and so are crops of
channel-last maps it takes for channel slices (:func:`map_slices`);
:class:`compress.pruning.channels.ChannelPruner` registers them as customized operations so that
Torch-Pruning leaves them to this module.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterator

import torch
import torch_pruning as tp
from torch import nn

from compress.nets.weights import is_attention, positive_int, split_holders, structure_of

_OP = tp.ops.OPTYPE
# the layer kinds Torch-Pruning resizes (the rest of its graph nodes are operations)
_LAYER_KINDS = {
    _OP.CONV,
    _OP.DEPTHWISE_CONV,
    _OP.BN,
    _OP.PRELU,
    _OP.LINEAR,
    _OP.LN,
    _OP.EMBED,
    _OP.MHA,
    _OP.LSTM,
    _OP.GN,
    _OP.IN,
}


def map_views(graph: tp.DependencyGraph) -> dict:
    """Map the channels of every view and reshape Torch-Pruning traced, from the shapes it saw.

    Torch-Pruning 1.6 reads a view's input shape from ``grad_fn._saved_self_sizes``, which torch
    2 calls ``_saved_self_sym_sizes``; without it every view of a convolutional network is taken
    for a flatten before a Linear, mapped by channel counts it infers, so a channel shuffle
    divides by zero (ShuffleNet) and a window partition multiplies index lists without end
    (Swin). :class:`ChannelPruner` registers views as customized operations, which Torch-Pruning
    leaves alone, and maps them here instead:

    - a view that keeps the channel dim, or only adds or drops size-1 dims: channels as they are;
    - ``(N, C, H, W) -> (N, C*H*W)`` and back: channel ``c`` is features ``c*H*W ...`` (the
      flatten before a Linear, mapped as Torch-Pruning maps it);
    - any other view splits or merges the channel dim (a channel shuffle, radix or head groups):
      its channels cannot be followed.

    Returns:
        ``{node: why}`` for the views whose channels cannot be followed.
    """
    return _map_each(graph, tp.ops._ReshapeOp, _map_reshape)


def _map_each(graph: tp.DependencyGraph, kind: type, mapper) -> dict:
    """``mapper(graph, node)`` on every node of ``kind``; ``{node: why}`` where it says why not."""
    reasons = {}
    for node in list(graph.module2node.values()):
        if isinstance(node.module, kind) and (why := mapper(graph, node)):
            reasons[node] = why
    return reasons


def _map_reshape(graph: tp.DependencyGraph, node) -> str | None:
    """Install the view's index mapping; None, or why its channels cannot be followed."""
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
    outputs = getattr(node.grad_fn, "_input_metadata", None)
    if not sizes or not outputs:
        return "a view whose shapes torch did not record"
    a, b = tuple(int(s) for s in sizes), tuple(int(s) for s in outputs[0].shape)
    if [s for s in a if s != 1] == [s for s in b if s != 1]:
        return None
    channels = _channels_into(graph, node)
    dims = [d for d in range(1, len(a)) if a[d] == channels]
    if dims and set(dims) <= _whole_dims(a, b):
        return None
    if dims == [1] and len(a) > 2 and b == (a[0], math.prod(a[1:])):
        _map_flatten(node, node.inputs, stride=math.prod(a[2:]))
        return None
    if dims == [1] and len(a) == 2 and len(b) > 2 and b[0] == a[0] and math.prod(b[1:]) == a[1]:
        _map_flatten(node, node.outputs, stride=math.prod(b[2:]))
        return None
    return f"a view {a} -> {b} regroups its channels (a channel shuffle or channel groups)"


def _whole_dims(a: tuple[int, ...], b: tuple[int, ...]) -> set[int]:
    """The dims of shape ``a`` that a view as ``b`` carries over whole (size-1 dims aside)."""
    whole, i, j = set(), 0, 0
    try:
        while i < len(a) and j < len(b):
            if a[i] == 1:
                i += 1
                continue
            if b[j] == 1:
                j += 1
                continue
            if a[i] == b[j]:
                whole.add(i)
                i, j = i + 1, j + 1
                continue
            left, right = a[i], b[j]
            i, j = i + 1, j + 1
            while left != right:
                if left < right:
                    left, i = left * a[i], i + 1
                else:
                    right, j = right * b[j], j + 1
    except IndexError:  # the sizes do not multiply up: nothing is known to be kept
        return set()
    return whole


def _map_flatten(node, channel_side: list, *, stride: int) -> None:
    """Torch-Pruning's flatten mapping between a view, whose index runs over flat features, and
    its neighbours on the channel side: channel ``c`` is features ``c*stride ... c*stride +
    stride - 1``."""
    flatten = tp.dependency.index_mapping._FlattenIndexMapping
    for neighbour in channel_side:
        for dep in node.dependencies:
            if dep.target is neighbour:  # features -> their channel
                dep.index_mapping[0] = flatten(stride=stride, reverse=True)
        for dep in neighbour.dependencies:
            if dep.target is node:  # a channel -> its features
                dep.index_mapping[0] = flatten(stride=stride, reverse=False)


class SplitPruner(tp.ops.SplitPruner):
    """Cuts the parts of a split of the channels that :func:`map_splits` mapped: it keeps the
    sizes of the parts, their offsets (read by :class:`_PartMapping`) and, for Torch-Pruning's
    channel inference, the size each output takes. Torch-Pruning's own pruner kept the first
    cut's offsets, so a second cut through a split went by stale ones."""

    def prune_out_channels(self, layer, idxs):
        if getattr(layer, "part_sizes", None) is None:
            return layer
        offsets, sizes = layer.offsets, list(layer.part_sizes)
        for idx in idxs:
            sizes[bisect.bisect_right(offsets, idx) - 1] -= 1
        _set_parts(layer, sizes, layer.part_of_output)
        return layer

    prune_in_channels = prune_out_channels


class _PartMapping:
    """Channel indices from a split to a consumer of its ``part`` (or, ``reverse``, back): the
    part's range of the split's current offsets, as Torch-Pruning's ``_SplitIndexMapping``."""

    def __init__(self, split: tp.ops._SplitOp, part: int, reverse: bool):
        self.split, self.part, self.reverse = split, part, reverse

    def __call__(self, idxs: list) -> list:
        start, end = self.split.offsets[self.part : self.part + 2]
        index = tp._helpers._HybridIndex
        if self.reverse:
            return [index(idx=i.idx + start, root_idx=i.root_idx) for i in idxs]
        return [index(idx=i.idx - start, root_idx=i.root_idx) for i in idxs if start <= i.idx < end]


def _set_parts(split: tp.ops._SplitOp, sizes: list[int], part_of_output: list[int]) -> None:
    split.part_sizes, split.part_of_output = sizes, part_of_output
    split.offsets = [0, *itertools.accumulate(sizes)]
    split.split_sizes = [sizes[part] for part in part_of_output]  # read by shape inference


def map_splits(graph: tp.DependencyGraph) -> dict:
    """Map the channels of every split Torch-Pruning traced, from the sizes torch saved.

    Torch-Pruning 1.6 reads the sizes of ``chunk`` and ``split(n)`` from attributes torch 2
    does not have and infers them from the layers around instead, wrongly behind a channel
    shuffle (ShuffleNet: a part of size None); it also maps the i-th consumer of a split to its
    i-th part, which fails as soon as a part has two consumers (a CSP stage's split feeding a
    residual block: an index out of range). Registered as customized operations
    (:class:`ChannelPruner`), splits are left alone while the pruner is built; here each split
    of the channels maps every consumer to the part it takes (:class:`_PartMapping`) and is
    handed back to Torch-Pruning as a split whose mapping it must not redo. Splits of other dims
    stay customized: their channels pass as they are.

    Returns:
        ``{node: why}`` for the splits of the channels that cannot be followed.
    """
    return _map_each(graph, tp.ops._SplitOp, _map_split)


def map_concats(graph: tp.DependencyGraph) -> None:
    """Give every concatenation Torch-Pruning traced the widths of its inputs, then hand it back
    to Torch-Pruning to map as a concatenation (call after :func:`map_splits`).

    Torch-Pruning infers a concatenation's input widths by walking back from each input, again
    before every group it builds, and gives up after 500 steps: behind 18 Swin blocks (Swin-S,
    Swin-B: the patch merging's ``cat`` of the stage's output) the widths came back unknown and
    it crashed summing them. Registered as customized operations (:class:`ChannelPruner`),
    concatenations are left alone while the pruner is built; here each input's width is read as
    Torch-Pruning reads it (:func:`_output_widths`), once for the whole graph. A concatenation
    fed by a 3-d parameter of no layer (a ViT's class token) is not mapped, as Torch-Pruning
    does not map it: it is not one of the channels.
    """
    concats = [
        node for node in graph.module2node.values() if isinstance(node.module, tp.ops._ConcatOp)
    ]
    if not concats:
        return
    widths = _output_widths(graph)
    for node in concats:
        sizes = [_width_into(source, node, widths) for source in node.inputs]
        node.module.concat_sizes = sizes if None not in sizes else None
        node.module.offsets = None
        node.type = _OP.CONCAT  # mapped by Torch-Pruning again before every group, from its sizes
        if graph.unwrapped_parameters and _fed_by_token_parameter(node):
            node.enable_index_mapping = False


def _output_widths(graph: tp.DependencyGraph) -> dict:
    """``{node: channels of its output or None}`` by Torch-Pruning's rule
    (``shape_infer.infer_out_channels_recursively``): a layer's own width, else a
    concatenation's sum of its inputs, else its last input's; computed once per node, inputs
    first, where Torch-Pruning walks every path again for every question."""
    widths: dict = {}
    for node in _inputs_first(graph):
        width = graph.get_out_channels(node)
        if width is None:
            inputs = [_width_into(source, node, widths) for source in node.inputs]
            if isinstance(node.module, tp.ops._ConcatOp):
                width = sum(inputs) if inputs and None not in inputs else None
            else:
                width = inputs[-1] if inputs else None
        widths[node] = width or None
    return widths


def _width_into(source, taker, widths: dict) -> int | None:
    """The channels ``source`` hands ``taker``: its part, if ``source`` is a mapped split."""
    part = _split_part(source, taker)
    return part if part is not None else widths.get(source)


def _split_part(source, taker) -> int | None:
    """The size of the part a split :func:`map_splits` mapped hands ``taker``; None for any
    other node."""
    part_sizes = getattr(source.module, "part_sizes", None)
    if part_sizes is None or taker not in source.outputs:
        return None
    return part_sizes[source.module.part_of_output[source.outputs.index(taker)]]


def _inputs_first(graph: tp.DependencyGraph) -> list:
    """Every node of the graph, each after all its inputs (the graph has no cycles)."""
    order, placed = [], set()
    for start in graph.module2node.values():
        stack = [(start, False)]
        while stack:
            node, ready = stack.pop()
            if node in placed:
                continue
            if ready:
                placed.add(node)
                order.append(node)
                continue
            stack.append((node, True))
            stack += [(source, False) for source in node.inputs if source not in placed]
    return order


def _fed_by_token_parameter(node) -> bool:
    """Whether a 3-d parameter reaches ``node`` (Torch-Pruning's test for a ViT's token concat)."""
    return any(
        source.type == _OP.PARAMETER and len(source.module.shape) == 3 for source in _upstream(node)
    )


def _upstream(node, stop=lambda source: False) -> Iterator:
    """Every node on a path back from ``node``, once each, not walking on past those ``stop``
    says (they are still yielded)."""
    stack, seen = list(node.inputs), set()
    while stack:
        source = stack.pop()
        if source in seen:
            continue
        seen.add(source)
        yield source
        if not stop(source):
            stack += source.inputs


def _map_split(graph: tp.DependencyGraph, node) -> str | None:
    fn = node.grad_fn
    shape, dim = getattr(fn, "_saved_self_sym_sizes", None), getattr(fn, "_saved_dim", None)
    parts = len(getattr(fn, "_input_metadata", ()))
    if shape is None or dim is None or not parts:
        return "a split whose sizes torch did not record"
    dim = _signed(dim)
    total, channels = int(shape[dim]), _channels_into(graph, node)
    if (total != channels) if channels else dim not in (1, -1):
        return None  # another dim: the channels pass as they are
    if hasattr(fn, "_saved_split_sizes"):
        sizes = [int(size) for size in fn._saved_split_sizes]
    else:
        size = int(fn._saved_split_size)
        sizes = [min(size, total - k * size) for k in range(parts)]
    part_of = []
    for consumer in node.outputs:
        taken = {k for function, k in consumer.grad_fn.next_functions if function is fn}
        if len(taken) != 1:
            return "its channels are split into parts that one operation takes together"
        part_of.append(taken.pop())
    _set_parts(node.module, sizes, part_of)
    for consumer, part in zip(node.outputs, part_of, strict=True):
        for dep in node.dependencies:
            if dep.target is consumer:
                dep.index_mapping[0] = _PartMapping(node.module, part, reverse=False)
        for dep in consumer.dependencies:
            if dep.target is node:
                dep.index_mapping[0] = _PartMapping(node.module, part, reverse=True)
    node.type, node.enable_index_mapping = _OP.SPLIT, False  # a split, mapped here
    return None


def _channels_into(graph: tp.DependencyGraph, node) -> int | None:
    """The channels of the tensor an operation takes: those of the nearest layer upstream (or
    the part of a split it takes, or the sum over a concatenation of channels), else what
    Torch-Pruning infers."""
    channels = _nearest_width(graph, [(source, node) for source in node.inputs])
    if channels:
        return channels
    for source in node.inputs:
        channels = tp.dependency.shape_infer.infer_out_channels_recursively(graph, source, [0])
        if channels:
            return channels
    return None


def _nearest_width(graph: tp.DependencyGraph, queue: list) -> int | None:
    """Breadth first back from ``(source, taker)`` pairs: the width the nearest layer, split
    part or concatenation of channels hands on."""
    seen = set()
    while queue:
        source, taker = queue.pop(0)
        if source in seen:
            continue
        seen.add(source)
        if _is_layer(source):
            return graph.get_out_channels(source)
        part = _split_part(source, taker)
        if part is not None:
            return part
        if isinstance(source.module, tp.ops._ConcatOp) and _joins_channels(source):
            parts = [_nearest_width(graph, [(part, source)]) for part in source.inputs]
            return sum(parts) if parts and None not in parts else None
        queue += [(upstream, source) for upstream in source.inputs]
    return None


def _joins_channels(node) -> bool:
    """A concatenation Torch-Pruning takes for one of the channels: along dim 1, or a negative
    one (channel-last maps join on -1)."""
    dim = getattr(node.grad_fn, "_saved_dim", None)
    return dim is None or dim == 1 or _signed(dim) < 0


def _signed(dim: int) -> int:
    """A dim torch saved: a negative one is saved as an unsigned 64-bit number."""
    return dim if dim < 2**63 else dim - 2**64


def frozen_layers(
    pruner: tp.pruner.BasePruner, model: nn.Module, unfollowable: dict
) -> dict[nn.Module, str]:
    """The layers whose output channels pass through something Torch-Pruning cannot follow: they
    keep their width, and so does every layer their channels reach.

    What cannot be followed (:func:`_blockers`): a view that regroups the channels (a channel
    shuffle; :func:`map_views`) outside an attention whose heads Torch-Pruning removes whole;
    channels split (:func:`map_splits`) or sliced at sizes the forward holds as numbers (a CSP
    stage's split), unless a chunk's parts are cut alike or the module holding the sizes is one
    whose parts are its children (timm's ``MixedConv2d``: its sizes are set from its parts'
    widths after each cut, :func:`compress.nets.weights.sync_split_sizes`); weights used
    outside their layer's forward (torchvision's Swin attention calls ``F.linear`` on them); a
    parameter of no layer (a ViT's class token and position embedding, a layer scale); a layer
    whose width a pruned checkpoint does not store (:func:`compress.nets.weights.structure_of`: a
    GroupNorm, say), so that every pruned network can be rebuilt. For a ViT this keeps the token
    width (the residual stream) and prunes the MLPs' hidden width and whole attention heads, as
    Torch-Pruning's "bottleneck" ViT recipe does.

    Args:
        unfollowable: ``{node: why}`` of :func:`map_views` and :func:`map_splits`.

    Returns:
        ``{layer: "<group's first layer>: why"}``.
    """
    graph = pruner.DG
    names = {module: name for name, module in model.named_modules()}
    blockers = _blockers(graph, names, set(structure_of(model)), split_holders(model))
    blockers = {**unfollowable, **blockers}
    frozen: dict[nn.Module, str] = {}
    for group in graph.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    ):
        heads = any(dep.target.module in pruner.num_heads for dep, _ in group)
        why = next(
            (
                blockers[dep.target]
                for dep, _ in group
                if dep.target in blockers
                and not (heads and isinstance(dep.target.module, tp.ops._ReshapeOp))
            ),
            None,
        )
        if why is None:
            continue
        root = names.get(group[0].dep.target.module, "?")
        for dep, _ in group:
            layer = dep.target.module
            if (
                isinstance(layer, nn.Module)
                and layer in names
                and graph.is_out_channel_pruning_fn(dep.handler)
                and layer not in pruner.ignored_layers
            ):
                frozen[layer] = f"{root}: {why}"
    return frozen


def _blockers(
    graph: tp.DependencyGraph, names: dict, stored: set[str], holders: list[nn.Module]
) -> dict:
    """``{node: why}`` for the other nodes of the graph whose channels cannot be cut."""
    blockers = {}
    called = {node.module for node in graph.module2node.values()}
    unused = {  # weights of layers whose forward never ran: used by someone else's
        id(weight): name
        for module, name in names.items()
        if module not in called and _is_layer_module(module)
        for weight in module.parameters(recurse=False)
    }
    held = _held_head_layers(names)
    parts_of_holders = [list(holder.values()) for holder in holders]
    for node in graph.module2node.values():
        module = node.module
        if module in held:
            blockers[node] = f"{held[module]} reshapes by the num_heads and head_dim it holds"
        elif isinstance(module, nn.Parameter):
            name = graph._param_to_name.get(module, "a parameter")
            blockers[node] = f"parameter {name} belongs to no layer"
        elif node.type == _OP.SPLIT and _split_is_fixed(graph, node, parts_of_holders):
            blockers[node] = "its channels are split into parts of sizes the forward holds"
        elif node.type == _OP.SLICE and _slices_channels(graph, node):
            blockers[node] = "its channels are sliced at offsets the forward holds"
        elif module in names:
            tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            if tensors and names[module] not in stored:
                blockers[node] = (
                    f"{names[module]} ({type(module).__name__}) has a width a pruned "
                    "checkpoint does not store"
                )
        elif owner := _foreign_weights(node, unused):
            blockers[node] = f"the weights of {owner} are used outside its forward"
    return blockers


def sliced_channel_producers(
    model: nn.Module, example: torch.Tensor, customized_pruners: dict
) -> dict[nn.Module, str]:
    """``{layer: why}`` for the convolutions and Linears whose output channels reach a channel
    slice at offsets the forward holds (:func:`_slices_channels`), found before Torch-Pruning
    groups any channel: walking back from each slice through what keeps the channels (norms,
    activations, depthwise convolutions, adds, concatenations) to the layers that make them.

    Why before: Torch-Pruning's grouping revisits a node once per distinct set of channel
    indices that reaches it, and prefix slices chained block after block (timm's RexNet:
    ``cat([x[:, :c] + shortcut, x[:, c:]])``) make those sets multiply: it had not grouped
    RexNet-100 after 40 minutes. Handed over as ignored layers, these keep their width, as
    :func:`frozen_layers` would have made them after grouping. ``customized_pruners``: the
    pruner's own (the graph is traced as it will be)."""
    graph = tp.DependencyGraph().build_dependency(
        model, example_inputs=example, customized_pruners=customized_pruners
    )
    map_concats(graph)
    names = {module: name for name, module in model.named_modules()}
    found: dict[nn.Module, str] = {}
    for node in list(graph.module2node.values()):
        if node.type != _OP.SLICE or not _slices_channels(graph, node):
            continue

        def makes_channels(source) -> bool:
            return source.type in (_OP.CONV, _OP.LINEAR) and source.module in names

        for producer in _upstream(node, stop=makes_channels):
            if makes_channels(producer):
                found[producer.module] = (
                    f"{names[producer.module]}: its channels are sliced at offsets the forward "
                    "holds (found before Torch-Pruning groups them)"
                )
    return found


def _held_head_layers(names: dict) -> dict[nn.Module, str]:
    """``{layer: attention's name}`` for the layers inside an attention whose forward reshapes by
    the ``num_heads`` (or ``n_heads``) and ``head_dim`` it holds but whose heads are not slices
    of one ``qkv`` Linear, so Torch-Pruning cannot remove them whole (timm's PVTv2: separate
    ``q`` and ``kv`` and a spatial-reduction conv, its token width read from its input;
    torchvision's MaxViT: ``to_qkv``, its output reshaped to the input's width): their widths,
    and the token width that reaches them, stay; the MLPs around them still prune."""
    held = {}
    for module, name in names.items():
        if isinstance(module, nn.MultiheadAttention) or is_attention(module):  # pruned whole
            continue
        heads = getattr(module, "num_heads", getattr(module, "n_heads", None))
        if not (positive_int(heads) and positive_int(getattr(module, "head_dim", None))):
            continue
        for layer in module.modules():
            if layer is not module and _is_layer_module(layer):
                held[layer] = name
    return held


def _split_is_fixed(graph: tp.DependencyGraph, node, parts_of_holders: list[list]) -> bool:
    """A split of the channels (mapped by :func:`map_splits`) that a cut could leave unequal to
    the sizes the forward splits at: any but a chunk whose parts are cut alike (a gated MLP) and
    the split of a module whose sizes are set again after each cut
    (:func:`compress.nets.weights.sync_split_sizes`: timm's ``MixedConv2d``), part k to its
    k-th child."""
    split = node.module
    sizes = getattr(split, "part_sizes", None)
    if sizes is None:
        return False
    taker_of = dict(zip(split.part_of_output, (out.module for out in node.outputs), strict=True))
    if len(node.outputs) == len(sizes) and [taker_of.get(k) for k in range(len(sizes))] in (
        parts_of_holders
    ):
        return False
    if not sizes or len(set(sizes)) > 1:
        return True
    pruning_fn = graph.get_pruner_of_module(split).prune_out_channels
    group = graph.get_pruning_group(split, pruning_fn, [0])
    reached = {i for dep, idxs in group if dep.target is node for i in idxs}
    return not all(k * sizes[0] in reached for k in range(len(sizes)))


def map_slices(graph: tp.DependencyGraph) -> None:
    """Undo Torch-Pruning's channel mapping of the slices that cut space, not channels, from a
    channel-last map (:func:`_slices_space_of_channels_last`).

    Torch-Pruning takes dim 1 of every 4-d tensor for its channels, as in ``(N, C, H, W)``; a
    window attention computes on ``(N, H, W, C)`` maps and crops their padding with
    ``x[:, :H, :W]`` (timm's TinyViT, torchvision's Swin), and a patch merging takes every second
    row (``x[:, 0::2, 0::2]``). Mapped as channel slices, such a crop would cut the wrong
    channels; kept as they were, every layer upstream kept its width (TinyViT-5M: 1.36x at
    most). Such a slice is re-typed as the elementwise operation it is for the channels (its
    mapping is set again before every group Torch-Pruning builds, by type), and the slice
    mappings Torch-Pruning gave it are removed (no other: a view's or split's mapping next to it
    is this module's and stays)."""
    slice_mapping = tp.dependency.index_mapping._SliceIndexMapping
    for node in list(graph.module2node.values()):
        if node.type != _OP.SLICE or not _slices_space_of_channels_last(graph, node):
            continue
        node.type = _OP.ELEMENTWISE
        deps = list(node.dependencies)
        deps += [dep for source in node.inputs for dep in source.dependencies if dep.target is node]
        for dep in deps:
            if isinstance(dep.index_mapping[0], slice_mapping):
                dep.index_mapping[0] = tp.dependency.INDEX_MAPPING_PLACEHOLDER


def _slices_space_of_channels_last(graph: tp.DependencyGraph, node) -> bool:
    """A slice along dim 1 of a 4-d tensor whose channels are its last dim: every path back from
    it reaches a Linear or a LayerNorm (layers that compute on the last dim) of as many channels
    as the tensor's last dim, through nothing that joins or parts channels (a concatenation, a
    split, another slice); and dim 1 is not as large (where both match, it stays a channel slice:
    nothing is cut on a guess)."""
    fn = node.grad_fn
    sizes = getattr(fn, "_saved_self_sym_sizes", None)
    if sizes is None or len(sizes) != 4 or getattr(fn, "_saved_dim", None) != 1:
        return False
    widths = _last_dim_layer_widths(graph, node)
    return widths == {int(sizes[-1])} and int(sizes[1]) != int(sizes[-1])


def _last_dim_layer_widths(graph: tp.DependencyGraph, node) -> set[int] | None:
    """The output widths of the nearest layers on every path back from ``node``, if all of them
    are Linears or LayerNorms reached through operations that neither join nor part channels;
    else None."""
    widths = set()
    # a weight F.linear reads (a parameter) is no path of channels
    for source in _upstream(node, stop=lambda source: _is_layer(source) or _is_parameter(source)):
        kind = tp.ops.module2type(source.module)
        if kind in (_OP.LINEAR, _OP.LN):
            widths.add(graph.get_out_channels(source))
        elif kind in _LAYER_KINDS or source.type in (_OP.CONCAT, _OP.SPLIT, _OP.SLICE):
            return None
    return widths or None


def _is_layer(node) -> bool:
    return _is_layer_module(node.module)


def _is_layer_module(module) -> bool:
    """A layer Torch-Pruning resizes, not one of its operations."""
    return tp.ops.module2type(module) in _LAYER_KINDS


def _is_parameter(node) -> bool:
    return node.type == _OP.PARAMETER


def _slices_channels(graph: tp.DependencyGraph, node) -> bool:
    """A slice Torch-Pruning maps onto the channels (dim 1 of 4-d, dim 2 of 3-d tensors), unless
    it takes them all or crops a channel-last map (:func:`map_slices`)."""
    if _slices_space_of_channels_last(graph, node):
        return False
    fn = node.grad_fn
    sizes = getattr(fn, "_saved_self_sym_sizes", None)
    rank_dim = {4: 1, 3: 2}.get(len(sizes)) if sizes is not None else None
    if rank_dim is not None and not _maps_dim(node, rank_dim):
        return False
    if sizes is None or fn._saved_dim >= len(sizes):
        return True
    whole = fn._saved_start == 0 and fn._saved_step == 1 and fn._saved_end >= sizes[fn._saved_dim]
    return not whole


def _maps_dim(node, channel_dim: int) -> bool:
    """Whether Torch-Pruning maps the op onto the channels: its dim is ``channel_dim``, or one it
    cannot read (a negative dim is saved as a huge unsigned number)."""
    dim = getattr(node.grad_fn, "_saved_dim", None)
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
    if dim is None or sizes is None:
        return True
    return not (dim < len(sizes) and dim != channel_dim)


def _foreign_weights(node, unused: dict[int, str]) -> str | None:
    """The layer whose weights this operation uses directly (``F.linear(x, layer.weight)``)."""
    for function, _ in getattr(node.grad_fn, "next_functions", ()):
        weight = getattr(function, "variable", None)
        if weight is not None and id(weight) in unused:
            return unused[id(weight)]
    return None
