"""Forward hooks that capture named intermediate outputs (for feature-based KD losses)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from compress.errors import StageError


class FeatureHooks:
    """Capture the outputs of ``names`` on every forward pass of ``model``.

    A context manager so the hooks are always removed, also when training fails: a model that
    leaves the distill stage carries no hooks into export or into the user's hands.

    Example:
        >>> with FeatureHooks(student, ["layer3"]) as features:
        ...     logits = student(x)
        ...     features.outputs["layer3"].shape
    """

    def __init__(self, model: torch.nn.Module, names: Iterable[str]):
        self.model = model
        self.names = tuple(dict.fromkeys(names))
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> FeatureHooks:
        modules = dict(self.model.named_modules())
        for name in self.names:
            if name not in modules:
                raise StageError(f"no layer {name!r} in {type(self.model).__name__}")
            self._handles.append(modules[name].register_forward_hook(self._keeper(name)))
        return self

    def _keeper(self, name: str):
        def keep(module, inputs, output):
            self.outputs[name] = output

        return keep

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.outputs.clear()
