"""``torch.fx`` tracing of a whole network for quantization, as far as it goes.

``torch.fx.symbolic_trace`` fails on the first Python ``if`` over a tensor's shape (timm's
MobileViT block pads its feature map to a multiple of its patch size). Rather than refusing the
network, :func:`trace` keeps each module whose code cannot be traced as one opaque call (a leaf)
and traces the rest: the leaf's layers stay float (recorded in ``untraced``), everything around
them is quantized. The parameters of ``forward`` after the images are traced at their defaults
(timm's ViT takes ``attn_mask=None, is_causal=False``).
"""

from __future__ import annotations

import inspect

from torch import fx, nn

from compress.errors import StageError

MAX_LEAVES = 64  # untraceable modules kept whole before the network is refused


class _LeafTracer(fx.Tracer):
    """A tracer that keeps ``leaves`` (qualified names) whole and remembers the innermost module
    whose tracing raised."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves
        self.failed: str | None = None

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name in self.leaves or super().is_leaf_module(module, qualified_name)

    def call_module(self, module, forward, args, kwargs):
        try:
            return super().call_module(module, forward, args, kwargs)
        except Exception:
            if self.failed is None:  # the innermost module raises first
                self.failed = self.path_of_module(module)
            raise


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` traced into a ``GraphModule`` with the same module names; modules that cannot
    be traced are kept whole and listed in its ``untraced`` attribute.

    Raises:
        StageError: the network's own ``forward`` cannot be traced (no module to keep whole), or
            more than :data:`MAX_LEAVES` modules cannot.
    """
    leaves: set[str] = set()
    while True:
        tracer = _LeafTracer(leaves)
        try:
            graph = tracer.trace(model, concrete_args=_optional_arguments(model))
            break
        except Exception as exc:  # torch.fx raises many kinds of errors on untraceable code
            if not tracer.failed or tracer.failed in leaves or len(leaves) >= MAX_LEAVES:
                name = getattr(model, "compress_name", type(model).__name__)
                first = str(exc).splitlines()[0] if str(exc) else ""
                where = f" in {tracer.failed}" if tracer.failed else ""
                raise StageError(
                    f"{name} cannot be traced by torch.fx for quantization{where}: "
                    f"{type(exc).__name__}: {first}"
                ) from exc
            leaves.add(tracer.failed)
    traced = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _drop_constant_inputs(traced)
    traced.untraced = tuple(sorted(leaves))
    return traced


def _optional_arguments(model: nn.Module) -> dict[str, object]:
    """``forward``'s parameters after the images, at their defaults: traced as constants (left
    symbolic, timm ViT's ``is_causal`` reaches ``scaled_dot_product_attention`` as a proxy and
    the traced graph cannot run)."""
    parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    return {
        p.name: p.default
        for p in parameters
        if p.default is not inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _drop_constant_inputs(traced: fx.GraphModule) -> None:
    """Remove the placeholders :func:`_optional_arguments` made constant, with the guards
    ``torch.fx`` hangs on them (``_assert_is_none``, ``eq`` + ``_assert``): the exporter's tracer
    passes the images only, and the guards compare a tensor with a bool it has no op for."""
    graph = traced.graph
    for placeholder in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        doomed, frontier = [], [placeholder]
        while frontier:
            node = frontier.pop()
            doomed.append(node)
            frontier.extend(node.users)
        order = {node: index for index, node in enumerate(graph.nodes)}
        for node in sorted(set(doomed), key=order.__getitem__, reverse=True):
            graph.erase_node(node)
    graph.lint()
    traced.recompile()
