"""INT8 within an accuracy budget: the layers quantization hurts most stay in float until the
exported file is within ``max_drop`` top-1 points of the float network on held-out images.

The search follows NNCF's ``quantize_with_accuracy_control``, on our own graph:

1. The float network (PyTorch) and the INT8 network's exported file (ONNX Runtime) are
   evaluated on the held-out images. Within the budget, nothing changes.
2. Ranking: on the :data:`RANKING_IMAGES` held-out images whose INT8 logits differ most from
   the float ones, each quantized layer in turn is put back in float alone
   (:func:`compress.quantization.fake_quant.with_float_layers`: its weights and the quantizers only
   it needed), and scored by how much closer that brings the logits to the float network's (mean
   squared difference). A forward pass of the fake-quantized network per layer; no export.
   When no layer alone recovers even :data:`UNINFORMATIVE` of that difference (several layers
   each ruin the network by themselves: putting one back changes nothing while the others
   remain), the layers are ranked instead by the difference each makes when it is the only
   one quantized.
3. Greedy: the best-ranked layers go float one more at a time; after each, the network is
   exported exactly as the export stage writes it (``run_file``, e.g.
   :func:`compress.exporters.network.run_exported`: float layers in the form ONNX Runtime runs in
   float) and the *file* is evaluated with ONNX Runtime on every held-out image. The search
   stops at the first file within the budget; that judgement is never made in PyTorch.
4. When ``max_float_layers`` (default: every quantized layer but one) are float and the file is
   still outside the budget, :class:`BudgetNotMet` says so, with the best step.

Activation ranges: calibration observes the network with its weights already INT8, so a layer
whose INT8 weights are poor leaves ranges downstream that fit the poor outputs. After PTQ, each
candidate is therefore calibrated again (``recalibrate``): the result is exactly the PTQ network
with those layers in ``skip``. After QAT the ranges are kept, as the weights were trained to
them (and a layer trained through its rounding gives nearly the same outputs in float).

A "group" here is one convolution or linear layer: its weights, and the activation quantizers
that only it read or wrote. The ranking is computed once (NNCF can rank again after reverting
some groups): one ranking, then one export and one evaluation of the file per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from compress.errors import StageError
from compress.quantization.fake_quant import quantized_layers, with_float_layers

RANKING_IMAGES = 300  # NNCF's ranking_subset_size: the held-out images the ranking looks at
UNINFORMATIVE = 0.05  # the best single reversion recovers less of the error: rank layers alone
REVERT_ONE, QUANTIZE_ONE = "revert-one", "quantize-one"  # how the ranking was made
# ``run_file(network, images) -> (logits, float_convs)``: the network exported as the export
# stage writes it, its file run on the images, and the convolutions the runtime runs in float
# (:func:`compress.exporters.network.run_exported`)
RunFile = Callable[[torch.fx.GraphModule, np.ndarray], tuple[np.ndarray, Sequence[str]]]
_CHUNK = 256  # images per forward pass / session.run


@dataclass(frozen=True)
class BudgetStep:
    """One exported file of the search.

    Attributes:
        float_layers: the layers the search had put in float (the ranking's first ones).
        top1: the file's top-1 (%) on the held-out images, in ONNX Runtime.
        drop: the float network's held-out top-1 minus ``top1``, in points.
        onnxruntime_float_convs: the convolutions ONNX Runtime's optimized graph runs in float
            (the ``skip`` list's and the search's).
    """

    float_layers: tuple[str, ...]
    top1: float
    drop: float
    onnxruntime_float_convs: tuple[str, ...]


@dataclass(frozen=True)
class AccuracyBudget:
    """What the search did: the budget, the held-out accuracies, the ranking and every step
    (step 0 is the INT8 network as it came), for the stage record.

    Attributes:
        ranking: ``(layer, sensitivity)``, most sensitive first (empty for a network already
            within budget, which is not ranked). With ``ranking_method`` ``revert-one`` the
            sensitivity is how much putting that layer alone in float lowers the mean squared
            logit difference to the float network on the ranking images; with
            ``quantize-one``, that difference when the layer is the only one quantized.
    """

    max_drop: float
    holdout_images: int
    ranking_images: int
    fp32_top1: float
    ranking: tuple[tuple[str, float], ...]
    steps: tuple[BudgetStep, ...]
    ranking_method: str | None = None

    @property
    def met(self) -> bool:
        return self.steps[-1].drop <= self.max_drop + 1e-9

    @property
    def float_layers(self) -> tuple[str, ...]:
        """The layers the search kept in float (besides the ``skip`` list)."""
        return self.steps[-1].float_layers

    def to_json(self) -> dict:
        return asdict(self) | {
            "met": self.met,
            "float_layers": list(self.float_layers),
            "ranking": [list(entry) for entry in self.ranking],
        }


class BudgetNotMet(StageError):
    """No file within ``max_float_layers`` float layers meets the budget; ``budget`` holds the
    search."""

    def __init__(self, message: str, budget: AccuracyBudget):
        super().__init__(message)
        self.budget = budget


def keep_float(
    qmodel: torch.fx.GraphModule,
    model: nn.Module,
    holdout: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    max_drop: float,
    max_float_layers: int | None = None,
    run_file: RunFile,
    recalibrate: Callable[[torch.fx.GraphModule], object] | None = None,
    ranking_images: int = RANKING_IMAGES,
) -> tuple[torch.fx.GraphModule, AccuracyBudget]:
    """Put the most quantization-sensitive layers of ``qmodel`` back in float, one at a time,
    until its exported file loses at most ``max_drop`` top-1 points against ``model``.

    Args:
        qmodel: the calibrated (and perhaps QAT-trained) network from
            :func:`compress.quantization.fake_quant.prepare_quantized` of ``model``; not modified.
        model: the float network it came from.
        holdout: ``(inputs, labels)`` batches, inputs normalised as the network takes them;
            images neither calibration nor training saw (a slice of the training split, never
            the test split).
        max_drop: the budget, in top-1 points (0.5 = half a point).
        max_float_layers: stop with :class:`BudgetNotMet` after this many; None: every
            quantized layer but one.
        run_file: how a step's file is made and run (:data:`RunFile`); the judgement is the
            file's, never PyTorch's.
        recalibrate: sets the activation ranges of each network with more layers in float
            (e.g. :func:`compress.quantization.fake_quant.calibrate` on the calibration images,
            after PTQ); None keeps ``qmodel``'s ranges (after QAT).
        ranking_images: the held-out images with the largest INT8 error the ranking uses.

    Returns:
        ``(network, record)``: ``qmodel`` itself when it is within the budget, else the network
        with ``record.float_layers`` in float, its ``quant_spec.skip`` listing them after
        ``qmodel``'s own skip list.

    Raises:
        BudgetNotMet: the budget cannot be met within ``max_float_layers`` float layers.
        ExportError: a step's file does not reproduce its PyTorch network.
    """
    inputs, labels = _stacked(holdout)
    if len(inputs) == 0:
        raise StageError("the accuracy budget needs held-out images; none were given")
    float_logits = _logits(model, inputs)
    fp32_top1 = _top1(float_logits, labels)
    user_skip = tuple(qmodel.quant_spec.skip)
    example = inputs[:2].to(_device_of(qmodel))

    def floating(names: tuple[str, ...]) -> torch.fx.GraphModule:
        network = with_float_layers(qmodel, model, user_skip + names, example_inputs=example)
        if recalibrate is not None:
            recalibrate(network)
        return network.eval()

    steps = [_step(qmodel, (), inputs, labels, fp32_top1, run_file)]
    ranking: tuple[tuple[str, float], ...] = ()
    method = None
    network = qmodel
    if steps[0].drop > max_drop + 1e-9:
        ranking, method = _ranking(qmodel, floating, inputs, float_logits, ranking_images)
        limit = len(ranking) - 1 if max_float_layers is None else max_float_layers
        for count in range(1, min(limit, len(ranking) - 1) + 1):
            chosen = tuple(name for name, _ in ranking[:count])
            network = floating(chosen)
            steps.append(_step(network, chosen, inputs, labels, fp32_top1, run_file))
            if steps[-1].drop <= max_drop + 1e-9:
                break
    record = AccuracyBudget(
        max_drop=max_drop,
        holdout_images=len(inputs),
        ranking_images=min(ranking_images, len(inputs)),
        fp32_top1=fp32_top1,
        ranking=ranking,
        steps=tuple(steps),
        ranking_method=method,
    )
    if not record.met:
        raise BudgetNotMet(_not_met(record), record)
    return network, record


def _not_met(record: AccuracyBudget) -> str:
    best = min(record.steps, key=lambda step: step.drop)
    last = record.steps[-1]
    return (
        f"quantize max_drop {record.max_drop:g}: the INT8 file still loses {last.drop:.2f} top-1 "
        f"points on {record.holdout_images} held-out training images with "
        f"{len(last.float_layers)} layers in float ({', '.join(last.float_layers) or 'none'}); "
        f"the smallest drop was {best.drop:.2f} with {len(best.float_layers)}. Raise max_drop or "
        "max_float_layers, calibrate differently, or train with mode: qat"
    )


def _step(
    network: torch.fx.GraphModule,
    chosen: tuple[str, ...],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    fp32_top1: float,
    run_file: RunFile,
) -> BudgetStep:
    """Evaluate ``network``'s exported file on the held-out images."""
    logits, float_convs = run_file(network, inputs.cpu().numpy())
    top1 = _top1(torch.from_numpy(logits), labels)
    return BudgetStep(
        float_layers=chosen,
        top1=top1,
        drop=fp32_top1 - top1,
        onnxruntime_float_convs=tuple(float_convs),
    )


def _ranking(
    qmodel: torch.fx.GraphModule,
    floating: Callable[[tuple[str, ...]], torch.fx.GraphModule],
    inputs: torch.Tensor,
    float_logits: torch.Tensor,
    ranking_images: int,
) -> tuple[tuple[tuple[str, float], ...], str]:
    """``(every quantized layer with its sensitivity, most sensitive first; the method)``;
    ``floating(names)`` builds the network with ``names`` in float. Ties keep graph order."""
    errors = (_logits(qmodel, inputs) - float_logits).square().mean(dim=1)
    worst = errors.topk(min(ranking_images, len(errors))).indices
    subset, reference = inputs[worst], float_logits[worst]
    baseline = errors[worst].mean().item()
    layers = quantized_layers(qmodel)

    def error(names: tuple[str, ...]) -> float:
        return (_logits(floating(names), subset) - reference).square().mean().item()

    scores = [(name, baseline - error((name,))) for name in layers]
    method = REVERT_ONE
    if max(score for _, score in scores) < UNINFORMATIVE * baseline:
        scores = [(name, error(tuple(n for n in layers if n != name))) for name in layers]
        method = QUANTIZE_ONE
    return tuple(sorted(scores, key=lambda entry: -entry[1])), method


@torch.no_grad()
def _logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The model's logits on CPU, float32, computed in eval mode on its own device."""
    device = _device_of(model)
    training = model.training
    model.eval()
    try:
        return torch.cat([model(chunk.to(device)).float().cpu() for chunk in inputs.split(_CHUNK)])
    finally:
        model.train(training)


def _top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def _stacked(batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """All held-out batches as one (inputs, labels) pair of CPU tensors."""
    pairs = [(x.detach().float().cpu(), y.detach().long().cpu()) for x, y, *_ in batches]
    if not pairs:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))
