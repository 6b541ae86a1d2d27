"""INT8 fake quantization of a CNN or a vision transformer: BatchNorm folded, quantizers placed
where integer kernels need them.

:func:`prepare_quantized` turns a float network into a ``torch.fx`` graph whose convolutions and
linear layers compute with INT8-rounded weights (symmetric, per output channel, zero point 0)
and whose activations are rounded to 8 bits where an integer runtime would hold them;
:func:`calibrate` sets the activation ranges from real images. The result trains (QAT, with
straight-through gradients) and exports to ONNX as QuantizeLinear/DequantizeLinear pairs that
ONNX Runtime fuses into QLinearConv (see :mod:`compress.exporters.qdq`).

Why our own small pass rather than a library: ``torch.ao.quantization`` is deprecated, torchao's
PT2E flow failed on torchvision's ResNet and left convs of MobileNetV2 in FP32, and ModelOpt
left BatchNorm unfolded (slower than FP32 on ONNX Runtime's CPU). The placement rules are what
made the exported graph fast:

* no quantizer between a conv (or an add) and the ReLU/ReLU6 after it: the activation's output
  is quantized, so ONNX Runtime folds the activation into the integer kernel;
* max-pool, flatten, reshape and dropout reuse their input's quantizer (same scale and zero
  point), so no extra rounding and no re-quantization appear around them;
* a linear layer's output stays float: ONNX Runtime runs DQ -> MatMul/Gemm as
  MatMulIntegerToFloat/QGemm with a float result, which the float ops after it in a transformer
  (GELU, the residual add, attention's reshapes) read directly; quantizing it would only add a
  Q/DQ round trip and its error. LayerNorm, softmax, GELU and attention's matrix products of two
  activations stay float;
* activations are uint8 with a zero point for ``onnxruntime-cpu`` (its fast u8s8 kernels) and
  int8 with zero point 0 for ``tensorrt``;
* for ``onnxruntime-cpu``, the bias of a conv whose input and output are both quantized is
  rounded to int32 at scale ``input_scale * weight_scale``: ONNX Runtime stores it so when it fuses
  the layer into a QLinearConv, and a float bias in the fake-quantized graph flips output codes that
  networks with squeeze-excitation (EfficientNet) amplify into different predictions.

Example:
    >>> qmodel = prepare_quantized(model.eval(), target="onnxruntime-cpu", example_inputs=batch)
    >>> calibrate(qmodel, [batch1, batch2], method="percentile", percentile=99.99)
"""

from __future__ import annotations

import copy
import fnmatch
import math
import operator
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.experimental.optimization import fuse

from compress.core.records import QuantSpec
from compress.errors import SettingError, StageError
from compress.quantization.batchnorm_folding import fold_functional_batchnorm
from compress.quantization.int8_kernels import WEIGHT_RANGES, is_depthwise, resolve_weight_range
from compress.quantization.layer_swaps import conv_like, linear_like
from compress.quantization.plain_linear import with_plain_linears
from compress.quantization.reparameterized import with_reparameterized_branches
from compress.quantization.spec import CALIBRATION_METHODS, QUANT_TARGETS
from compress.quantization.split_attention import with_split_attention
from compress.quantization.standardised_weights import with_plain_convolutions
from compress.quantization.timm_blocks import with_traced_timm_blocks
from compress.quantization.tracing import trace
from compress.quantization.window_attention import with_window_attention

# every weight range has scale >= max|w| / 127: -128 is never produced
WEIGHT_QMIN, WEIGHT_QMAX = (
    -128,
    127,
)
HISTOGRAM_BINS = 2048
MSE_CANDIDATES = 100  # clipping ranges tried by the mse calibration: 1%..100% of the observed range
_MIN_SCALE = 1e-8
INPUT_EXACT_MIN_STEPS = 64  # the input's lowest value made exact where that costs < 1/64 (_qparams)

_ACTIVATIONS = (nn.ReLU, nn.ReLU6)
_ACTIVATION_FUNCTIONS = (F.relu, F.relu6, torch.relu)
_ADDS = (operator.add, operator.iadd, torch.add)
_MULS = (operator.mul, torch.mul)
# Activations that are a product of their input and a gate of it, by name: the module and the
# function that compute them whole, and the gate. Written as ``x * gate(x)`` they quantize like
# any product of activations (:func:`_split_into_products`); the names are recorded in
# ``QuantSpec.product_activations`` so a saved network is rebuilt with the same graph.
PRODUCT_ACTIVATIONS: dict[str, tuple[type[nn.Module], Callable, Callable]] = {
    "hardswish": (nn.Hardswish, F.hardswish, F.hardsigmoid),
    "silu": (nn.SiLU, F.silu, torch.sigmoid),
}
_PASSTHROUGH_MODULES = (nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity)
_PASSTHROUGH_FUNCTIONS = (torch.flatten, torch.reshape, F.max_pool2d, F.dropout)
_PASSTHROUGH_METHODS = ("view", "reshape", "flatten", "contiguous")


# --- modules ---------------------------------------------------------------------------------


class _ScaledGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``factor`` (a preconditioner)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(factor)
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (factor,) = ctx.saved_tensors
        return grad * factor, None


class WeightQuant:
    """Mixin: the layer's weight rounded to INT8, symmetric per output channel, zero point 0.

    The scale (``weight_scale``, one per output channel) is chosen by the layer's
    ``weight_range`` (:data:`compress.quantization.int8_kernels.WEIGHT_RANGES`: the portable ones
    keep the
    file exact on x86 CPUs without VNNI). It follows the weights while training, so QAT adapts
    to the range, and is frozen in eval mode, so an exported graph sees it as a constant;
    switching to eval refreshes it once from the final weights.

    ``bn_gain`` (per output channel, ``|gamma| / sqrt(var + eps)`` of the BatchNorm folded into
    the weight, 1 without one) preconditions QAT: the weight's gradient is multiplied by
    ``bn_gain ** 2``, so SGD moves the folded weight exactly as it would move the conv's own
    weight with the BatchNorm kept and frozen. Without it the folded network trains at a
    different effective learning rate per channel, and a narrow network diverges at a QAT
    learning rate its unfolded twin takes easily (a pruned ResNet-8 fell from 84% to 22% at
    lr 0.002). Per-channel symmetric rounding commutes with that per-channel gain, so the
    forward pass, the scales and the exported integers are those of the folded graph. The
    gain is not saved: a network rebuilt from its weights file alone trains without it.
    """

    weight_range: str = "full"
    depthwise: bool = False

    def _init_weight_quant(self, weight_range: str, bn_gain: torch.Tensor | None = None) -> None:
        self.weight_range = weight_range
        self.depthwise = isinstance(self, nn.Conv2d) and is_depthwise(
            self.in_channels, self.out_channels, self.groups
        )
        channels = self.weight.shape[0]
        self.register_buffer("weight_scale", torch.ones(channels, device=self.weight.device))
        self.register_buffer(
            "weight_zero_point",
            torch.zeros(channels, dtype=torch.int32, device=self.weight.device),
            persistent=False,
        )
        squared = None  # no BatchNorm folded in: the gradient stays as it is
        if bn_gain is not None:
            shape = (channels,) + (1,) * (self.weight.dim() - 1)
            squared = bn_gain.detach().float().square().reshape(shape).to(self.weight.device)
        self.register_buffer("bn_gain_squared", squared, persistent=False)
        self.refresh_weight_scale()

    @torch.no_grad()
    def refresh_weight_scale(self) -> None:
        scale = WEIGHT_RANGES[self.weight_range].scale(self.weight.detach(), self.depthwise)
        self.weight_scale.copy_(scale.clamp_min(_MIN_SCALE))

    def quantized_weight(self) -> torch.Tensor:
        weight = self.weight
        if self.training:
            self.refresh_weight_scale()
            if weight.requires_grad and self.bn_gain_squared is not None:
                weight = _ScaledGradient.apply(weight, self.bn_gain_squared)
        return torch.fake_quantize_per_channel_affine(
            weight, self.weight_scale, self.weight_zero_point, 0, WEIGHT_QMIN, WEIGHT_QMAX
        )

    def quantized_bias(self) -> torch.Tensor | None:
        """The bias as the integer kernel adds it: rounded to int32 at scale ``input_scale *
        weight_scale`` when :func:`_place_quantizers` gave the layer its input quantizer
        (``input_quant``, set where ONNX Runtime fuses it into a QLinearConv), else as it is.

        Call after :meth:`quantized_weight` (which refreshes the weight scale while training).
        Straight-through gradient; no rounding while the input's range is being calibrated.
        """
        bias = self.bias
        source = self.__dict__.get("input_quant")  # a plain reference, not a submodule
        if bias is None or source is None or source.observer is not None:
            return bias
        scale = (source.scale * self.weight_scale).clamp_min(_MIN_SCALE * _MIN_SCALE)
        rounded = torch.clamp(torch.round(bias / scale), -(2**31), 2**31 - 1) * scale
        return bias + (rounded - bias).detach() if self.training else rounded

    def train(self, mode: bool = True):
        if not mode:
            self.refresh_weight_scale()
        return super().train(mode)


class QuantConv2d(WeightQuant, nn.Conv2d):
    """``nn.Conv2d`` computing with its INT8-rounded weight (see :class:`WeightQuant`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.quantized_bias())


class QuantLinear(WeightQuant, nn.Linear):
    """``nn.Linear`` computing with its INT8-rounded weight (see :class:`WeightQuant`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)  # its output stays float


class ActQuant(nn.Module):
    """Per-tensor 8-bit fake quantization of an activation.

    ``signed=False``: uint8, asymmetric (zero point in 0..255); ``signed=True``: int8,
    symmetric (zero point 0). While :func:`calibrate` runs, ``observer`` sees the float values
    and the input passes unchanged.
    """

    def __init__(self, signed: bool, *, network_input: bool = False):
        super().__init__()
        self.signed = signed
        # quantizes the network's own input: its lowest value is made exact (see _qparams)
        self.network_input = network_input
        self.quant_min, self.quant_max = (-128, 127) if signed else (0, 255)
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.observer: _Observer | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(x)
            return x
        return torch.fake_quantize_per_tensor_affine(
            x, self.scale, self.zero_point, self.quant_min, self.quant_max
        )

    def extra_repr(self) -> str:
        kind = "int8 symmetric" if self.signed else "uint8"
        return f"{kind}, scale={self.scale.item():.4g}, zero_point={self.zero_point.item()}"


class ExportableAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` that exports at any input size.

    The TorchScript ONNX exporter (the one prepared networks export with) writes an adaptive
    pool only when the output size divides the input size; AlexNet's and VGG's ``(6, 6)``/
    ``(7, 7)`` pools on small inputs (a 2x2 feature map at 64 px) made the export crash. When it
    does not divide, the pool is computed as what it is, a fixed linear map of each axis: two
    matrix products with averaging matrices built from the (traced, constant) input size.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        out_h, out_w = _pair(self.output_size, (height, width))
        if height % out_h == 0 and width % out_w == 0:
            return F.adaptive_avg_pool2d(x, (out_h, out_w))
        rows = _averaging_matrix(height, out_h, x)
        columns = _averaging_matrix(width, out_w, x)
        return torch.einsum("oh,nchw,pw->ncop", rows, x, columns)


def _pair(size, current: tuple[int, int]) -> tuple[int, int]:
    sizes = (size, size) if isinstance(size, int) else tuple(size)
    return tuple(int(s) if s is not None else c for s, c in zip(sizes, current, strict=True))


def _averaging_matrix(length: int, out: int, like: torch.Tensor) -> torch.Tensor:
    """``(out, length)``: row ``i`` averages the window ``adaptive_avg_pool`` gives output ``i``
    (from ``floor(i * length / out)`` to ``ceil((i + 1) * length / out)``)."""
    rows = []
    for i in range(out):
        start, end = (i * length) // out, -((-(i + 1) * length) // out)
        rows.append([1.0 / (end - start) if start <= j < end else 0.0 for j in range(length)])
    return torch.tensor(rows, dtype=like.dtype, device=like.device)  # a constant when traced


# --- preparation -----------------------------------------------------------------------------


def prepare_quantized(
    model: nn.Module,
    *,
    target: str,
    skip: Sequence[str] = (),
    example_inputs: torch.Tensor,
    weight_range: str = "auto",
    integer_products: bool | None = None,
    product_activations: Sequence[str] | None = None,
) -> fx.GraphModule:
    """The fake-quantized copy of ``model``: BatchNorm folded, weights and activations INT8.

    The same architecture always gives the same module and buffer names and shapes (names come
    from the traced graph), so a saved ``state_dict`` loads strictly into a fresh preparation;
    a pruned (narrower) network is prepared the same way. Activation quantizers start with
    scale 1: call :func:`calibrate` before using the model.

    Args:
        model: the float network, in eval mode (BatchNorm statistics are folded as they are);
            it is not modified. It must be traceable by ``torch.fx`` (torchvision ResNets and
            MobileNets and our CIFAR ResNets are).
        target: ``"onnxruntime-cpu"`` (uint8 activations) or ``"tensorrt"`` (int8, zero point 0).
        skip: module names or fnmatch patterns (of the original model) whose convs/linears keep
            FP32 weights; a pattern that names a container (``"layer4"``) covers its children.
        example_inputs: a batch shaped like the real input, run once to prove the graph works.
        weight_range: how each layer's weight scale is chosen, a name from
            :data:`compress.quantization.int8_kernels.WEIGHT_RANGES`, or ``"auto"``:
            ``"pair-limit"`` for ``onnxruntime-cpu`` (exact on CPUs with and without VNNI),
            ``"full"`` for TensorRT.
        integer_products: quantize products of activations (hard-swish written as
            ``x * hardsigmoid(x)``, SiLU as ``x * sigmoid(x)``, squeeze-excitation gates): ONNX
            Runtime then runs them as integer ``QLinearMul`` (:func:`_split_into_products`);
            None: on for ``onnxruntime-cpu``.
        product_activations: with ``integer_products``, the names of
            :data:`PRODUCT_ACTIVATIONS` written as products; None: all of them (a network is
            rebuilt with the names its ``quant_spec`` recorded).

    Returns:
        The prepared ``GraphModule`` on the model's device, in eval mode; its
        ``weight_range`` attribute holds the resolved name and ``quant_spec`` the
        :class:`~compress.core.records.QuantSpec` it is rebuilt and exported with.

    Raises:
        SettingError: a ``skip`` pattern matches no module, or ``target`` or ``weight_range`` is
            unknown.
        StageError: ``torch.fx`` cannot trace the model.
    """
    if target not in QUANT_TARGETS:
        raise SettingError(
            f"quantize target: expected one of {', '.join(QUANT_TARGETS)}, got {target!r}"
        )
    # a multi-branch block as deployed: one convolution
    model = with_reparameterized_branches(model, example_inputs)
    model = with_split_attention(model)  # torchvision's attention projections become Linears
    model = with_window_attention(model)  # and its Swin's
    model = with_traced_timm_blocks(model)  # timm's TinyViT, MobileViT, EfficientViT blocks
    model = with_plain_convolutions(model)  # weight standardisation computed once, like BatchNorm
    model = with_plain_linears(model)  # timm's Linear (a classifier) traced as a layer
    weight_range = resolve_weight_range(weight_range, target)
    if weight_range not in WEIGHT_RANGES:
        raise SettingError(
            f"quantize weight_range: expected auto or one of {', '.join(WEIGHT_RANGES)}, got "
            f"{weight_range!r}"
        )
    skipped = skipped_layers(model, skip)
    graph_module = fold_batchnorm(model)
    quantized = _swap_layers(graph_module, skipped, weight_range, _bn_gains(model, graph_module))
    if integer_products is None:
        integer_products = target == "onnxruntime-cpu"
    if not integer_products:
        product_activations = ()
    elif product_activations is None:
        product_activations = tuple(PRODUCT_ACTIVATIONS)
    _split_into_products(graph_module, product_activations)
    _place_quantizers(
        graph_module,
        quantized,
        signed=target == "tensorrt",
        int32_bias=target == "onnxruntime-cpu",
        products=integer_products,
    )
    graph_module.to(next(model.parameters()).device)  # new quantizers' buffers start on the CPU
    graph_module.compress_name = getattr(model, "compress_name", type(model).__name__)
    graph_module.weight_range = weight_range
    # what export and reloading need
    graph_module.quant_spec = QuantSpec(
        target, tuple(skip), weight_range, integer_products, tuple(product_activations)
    )
    graph_module.eval()
    with torch.no_grad():
        graph_module(example_inputs)
    return graph_module


def clone(qmodel: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """An independent copy of a fake-quantized network, with what :func:`prepare_quantized` and
    calibration recorded on it (``quant_spec``, ``weight_range``, ...): ``copy.deepcopy`` of a
    ``GraphModule`` rebuilds it from its graph and drops such attributes."""

    twin = copy.deepcopy(qmodel)
    _carry_records(qmodel, twin)
    return twin


def _carry_records(source: fx.GraphModule, target: fx.GraphModule) -> None:
    """Give ``target`` what was recorded on ``source`` after preparation (how it was
    calibrated, the methods tried, an accuracy budget's search) and ``target`` lacks."""
    for name, value in vars(source).items():
        if name not in vars(target):
            setattr(target, name, copy.deepcopy(value))


def with_float_layers(
    qmodel: fx.GraphModule,
    model: nn.Module,
    skip: Sequence[str],
    *,
    example_inputs: torch.Tensor,
) -> fx.GraphModule:
    """``qmodel`` with the layers ``skip`` names in float, everything else as it was.

    Prepared again from the float ``model`` with ``skip`` (so it is exactly what
    :func:`prepare_quantized` builds for that list: it saves, reloads and exports like any
    prepared model), then given ``qmodel``'s weights, biases, activation ranges and records
    (``calibration_method``...): a layer
    turned float keeps the weights QAT trained, and no range is calibrated again. Keeping a
    layer in float only removes quantizers, so every value the result holds exists in
    ``qmodel``.

    Args:
        qmodel: from :func:`prepare_quantized` (calibrated, perhaps fine-tuned) of ``model``.
        model: the float network ``qmodel`` was prepared from.
        skip: module names or patterns kept in float; include ``qmodel``'s own skip list.
        example_inputs: a batch shaped like the real input.

    Returns:
        The new prepared ``GraphModule``, in eval mode, its ``quant_spec`` listing ``skip``.

    Raises:
        SettingError: a pattern of ``skip`` matches no module.
        StageError: ``qmodel`` was not prepared from ``model`` (its values do not fit).
    """
    spec = qmodel.quant_spec
    fresh = prepare_quantized(
        model,
        target=spec.target,
        skip=skip,
        example_inputs=example_inputs,
        weight_range=spec.weight_range,
        integer_products=spec.integer_products,
        product_activations=spec.product_activations,
    )
    values = qmodel.state_dict()
    wanted = fresh.state_dict()
    missing = [
        name
        for name, value in wanted.items()
        if name not in values or values[name].shape != value.shape
    ]
    if missing:
        raise StageError(
            f"the quantized network was not prepared from this float network: it has no "
            f"{missing[0]} of the right shape ({len(missing)} values missing)"
        )
    fresh.load_state_dict({name: values[name] for name in wanted})
    _carry_records(qmodel, fresh)
    return fresh.eval()


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the convolutions and linear layers of a prepared model that compute in INT8."""
    return [name for name, m in model.named_modules() if isinstance(m, WeightQuant)]


def skipped_layers(model: nn.Module, patterns: Sequence[str]) -> set[str]:
    """Names of the convs/linears that ``patterns`` keep FP32 (a matched container covers its
    children).

    Raises:
        SettingError: a pattern matches no module name.
    """
    names = [name for name, _ in model.named_modules() if name]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise SettingError(
                f"quantize skip: {pattern!r} matches no module of "
                f"{getattr(model, 'compress_name', type(model).__name__)}"
            )

    def covered(name: str) -> bool:
        parts = name.split(".")
        prefixes = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
        return any(
            fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes for pattern in patterns
        )

    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d | nn.Linear) and covered(name)
    }


def fold_batchnorm(model: nn.Module) -> fx.GraphModule:
    """A traced copy of ``model`` (eval mode) with every conv -> BatchNorm pair folded into one
    conv.

    Folding first means the INT8 weights are the ones the exported graph runs, and that the
    integer kernels see no separate BatchNorm. Convs keep their original names.
    """
    traced = trace(copy.deepcopy(model).eval())
    folded = fuse(traced, inplace=True, no_trace=True)
    fold_functional_batchnorm(folded)  # timm's BatchNormAct2d: a batch_norm call, not a module
    folded.untraced = traced.untraced
    return folded


def float_convs(model: nn.Module) -> list[str]:
    """Names of the convolutions of a prepared model that keep FP32 weights (its ``skip`` list)."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and not isinstance(m, QuantConv2d)
    ]


def _bn_gains(model: nn.Module, folded: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Per output channel, how much folding scaled each conv's weight: ``|gamma| / sqrt(var +
    eps)`` of its BatchNorm, read as the ratio of the folded to the original weight's norm (1 for
    a channel whose weights are all zero, and for a conv without BatchNorm)."""
    original = dict(model.named_modules())
    gains = {}
    for name, module in folded.named_modules():
        source = original.get(name)
        if not isinstance(module, nn.Conv2d) or not isinstance(source, nn.Conv2d):
            continue
        before = source.weight.detach().flatten(1).norm(dim=1)
        after = module.weight.detach().flatten(1).norm(dim=1)
        gains[name] = torch.where(before > 0, after / before.clamp_min(1e-30), 1.0)
    return gains


def _swap_layers(
    graph_module: fx.GraphModule,
    skipped: set[str],
    weight_range: str,
    bn_gains: dict[str, torch.Tensor],
) -> set[str]:
    """Replace every conv/linear the graph calls (not one inside a module kept whole by
    :func:`compress.quantization.tracing.trace`) and not in ``skipped`` by its weight-quantized
    twin; their names. Adaptive pools become :class:`ExportableAdaptiveAvgPool2d`.

    Folded biases train: ``fuse`` creates them frozen where the conv had no bias of its own.
    """
    quantized = set()
    for module in graph_module.modules():
        if isinstance(module, nn.Conv2d | nn.Linear) and module.bias is not None:
            module.bias.requires_grad_(module.weight.requires_grad)
    called = {node.target for node in graph_module.graph.nodes if node.op == "call_module"}
    # a layer run on constants alone (Swin V2's position-bias MLP on the coordinates table it
    # holds) computes a constant: ONNX Runtime folds it, and quantized, its input would be a
    # weight fed to QuantizeLinear (the INT8 check failed: "relative_coords_table is not stored
    # as INT8")
    constant = _parameter_values(graph_module.graph)
    on_constants = {
        node.target
        for node in graph_module.graph.nodes
        if node.op == "call_module" and node in constant
    }
    for name, module in list(graph_module.named_modules()):
        if name in skipped or name not in called or type(module) not in (nn.Conv2d, nn.Linear):
            continue
        if name in on_constants:
            continue
        graph_module.set_submodule(name, _twin(module, weight_range, bn_gains.get(name)))
        quantized.add(name)
    for name, module in list(graph_module.named_modules()):
        if (
            type(module) is nn.AdaptiveAvgPool2d
            and name in called
            and module.output_size not in (1, (1, 1))  # a global pool exports at any size
        ):
            graph_module.set_submodule(name, ExportableAdaptiveAvgPool2d(module.output_size))
    for module in graph_module.modules():
        if isinstance(module, _ACTIVATIONS):
            module.inplace = False  # fake quantization must not see a tensor change under it
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target is operator.iadd:
            node.target = operator.add
    return quantized


def _twin(
    module: nn.Conv2d | nn.Linear, weight_range: str, bn_gain: torch.Tensor | None
) -> QuantConv2d | QuantLinear:
    """The weight-quantized layer with the same hyper-parameters, sharing ``module``'s
    parameters."""
    if isinstance(module, nn.Conv2d):
        new = conv_like(module, QuantConv2d)
    else:
        new = linear_like(module, QuantLinear)
    new.weight, new.bias = module.weight, module.bias
    new._init_weight_quant(weight_range, bn_gain)
    return new


def _split_into_products(graph_module: fx.GraphModule, names: Sequence[str]) -> None:
    """Write each activation of :data:`PRODUCT_ACTIVATIONS` that ``names`` lists as what it is,
    ``x * gate(x)`` (a hard-swish ``x * hardsigmoid(x)``, a SiLU ``x * sigmoid(x)``), so that its
    product can be quantized like any other (:func:`_place_quantizers`): ONNX Runtime then runs
    it as one integer ``QLinearMul`` (and a SiLU's gate as a ``QLinearSigmoid`` table), as its own
    quantizer does.

    Why: left whole, the activation between INT8 layers is dequantized, computed in float and
    quantized again, and the float tensors between the integer kernels make ONNX Runtime
    transpose whole activations between its NHWC integer layout and the float NCHW one: our
    INT8 MobileNetV3-Large at 224 px ran 1.16x slower at batch 64 than ONNX Runtime's own PTQ
    of the same network, and our INT8 EfficientNet-B0 (SiLU everywhere) 2.3x slower at batch 16
    (benchmarks/RESULTS.md).
    """
    kinds = [PRODUCT_ACTIVATIONS[name] for name in names]
    graph = graph_module.graph
    modules = dict(graph_module.named_modules())
    for node in list(graph.nodes):
        module = modules.get(node.target) if node.op == "call_module" else None
        function = node.target if node.op == "call_function" else None
        gates = [gate for kind, call, gate in kinds if isinstance(module, kind) or function is call]
        if not gates:
            continue
        gate = gates[0]
        x = node.args[0]
        with graph.inserting_before(node):
            gated = graph.call_function(gate, (x,))
            product = graph.call_function(operator.mul, (x, gated))
        node.replace_all_uses_with(product)
        graph.erase_node(node)
    graph.lint()
    graph_module.recompile()


def _place_quantizers(
    graph_module: fx.GraphModule,
    quantized: set[str],
    signed: bool,
    int32_bias: bool = False,
    products: bool = False,
) -> None:
    """Insert an :class:`ActQuant` at each value an integer kernel reads or writes (module
    docstring). With ``int32_bias``, each conv whose output is quantized too gets its input
    quantizer as ``input_quant`` (see :meth:`WeightQuant.quantized_bias`)."""
    graph = graph_module.graph
    modules = dict(graph_module.named_modules())
    points: list[fx.Node] = []
    requantized: list[fx.Node] = []  # convs whose output is quantized: integer kernels

    def is_point(node) -> bool:
        return isinstance(node, fx.Node) and _source(node, modules) in points

    constant = _parameter_values(graph)
    for node in list(graph.nodes):
        layer = node.op == "call_module" and node.target in quantized
        if layer and not is_point(node.args[0]):
            points.append(node.args[0])
        tensor_inputs = [a for a in node.args if isinstance(a, fx.Node)]
        add = node.op == "call_function" and node.target in _ADDS and len(tensor_inputs) == 2
        mul = (
            products
            and node.op == "call_function"
            and node.target in _MULS
            and len(tensor_inputs) == 2
            and not any(a in constant for a in tensor_inputs)  # a layer scale is a weight
        )
        conv = layer and isinstance(modules[node.target], nn.Conv2d)
        if mul and any(is_point(a) for a in tensor_inputs) and not _only_output(node):
            # a product of activations (a hard-swish, a squeeze-excitation gate): both factors
            # and the product quantized, one integer QLinearMul for ONNX Runtime
            points.extend(a for a in tensor_inputs if not is_point(a))
        if (
            conv or ((add or mul) and all(is_point(a) for a in tensor_inputs))
        ) and not _only_output(node):
            points.append(_after_activation(node, modules))
            if conv:
                requantized.append(node)
    shared: dict[fx.Node, str] = {}
    for point in points:
        if point in shared:
            continue
        name = f"quant_{point.name}"
        graph_module.add_submodule(name, ActQuant(signed, network_input=point.op == "placeholder"))
        shared[point] = name
        _insert_after(graph, point, name)
    for node in list(graph.nodes):  # pass-through ops reuse their input's quantizer
        if _passthrough(node, modules) and isinstance(node.args[0], fx.Node):
            source = node.args[0]
            if source.op == "call_module" and source.target in shared.values():
                shared[node] = source.target
                _insert_after(graph, node, source.target)
    for node in requantized if int32_bias else ():
        source = node.args[0]  # the quantizer call inserted before the layer
        if source.op == "call_module" and source.target in shared.values():
            # a plain attribute: registering the quantizer twice would rename state_dict entries
            object.__setattr__(
                modules[node.target], "input_quant", graph_module.get_submodule(source.target)
            )
    graph.lint()
    graph_module.recompile()


def _parameter_values(graph: fx.Graph) -> set[fx.Node]:
    """The nodes computed from parameters and constants alone (a layer scale's ``gamma``, reshaped
    to broadcast; Swin V2's position bias, an MLP run on a coordinates table it holds): no
    activation flows into them, so a product with one is a scaled activation, not a product of
    two activations (quantizing it as one fed a weight to QuantizeLinear: FastViT's and
    EfficientFormer's layer scales failed the INT8 check), and a layer fed by one stays float
    (:func:`_swap_layers`)."""
    constant: set[fx.Node] = set()
    for node in graph.nodes:  # topological order: a node's inputs come before it
        inputs = node.all_input_nodes
        if node.op == "get_attr" or (
            node.op in ("call_function", "call_method", "call_module")
            and inputs
            and all(a in constant for a in inputs)
        ):
            constant.add(node)
    return constant


def _insert_after(graph: fx.Graph, node: fx.Node, quantizer: str) -> fx.Node:
    with graph.inserting_after(node):
        quant = graph.call_module(quantizer, (node,))
    node.replace_all_uses_with(quant, delete_user_cb=lambda user: user is not quant)
    return quant


def _after_activation(node: fx.Node, modules: dict) -> fx.Node:
    """The ReLU/ReLU6 that is the only user of ``node``, else ``node``: where its output is
    quantized."""
    users = list(node.users)
    if len(users) != 1:
        return node
    user = users[0]
    if (user.op == "call_module" and isinstance(modules.get(user.target), _ACTIVATIONS)) or (
        user.op == "call_function" and user.target in _ACTIVATION_FUNCTIONS
    ):
        return user
    return node


def _source(node: fx.Node, modules: dict) -> fx.Node:
    """The value ``node`` passes through unchanged (following max-pool/flatten/reshape/dropout)."""
    while _passthrough(node, modules) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _passthrough(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _PASSTHROUGH_MODULES)
    if node.op == "call_function":
        return node.target in _PASSTHROUGH_FUNCTIONS
    return node.op == "call_method" and node.target in _PASSTHROUGH_METHODS


def _only_output(node: fx.Node) -> bool:
    return all(user.op == "output" for user in node.users)


# --- calibration -----------------------------------------------------------------------------


class _Observer:
    """Running min/max of a quantizer's input, then (second pass) its histogram on that range."""

    def __init__(self, symmetric: bool):
        self.symmetric = symmetric
        self.low = float("inf")
        self.high = float("-inf")
        self.histogram: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.histogram is None:
            self.low = min(self.low, x.min().item())
            self.high = max(self.high, x.max().item())
        elif self.symmetric:
            self.histogram += torch.histc(x.abs(), HISTOGRAM_BINS, 0.0, self.amax).cpu()
        else:
            self.histogram += torch.histc(x, HISTOGRAM_BINS, self.low, self.high).cpu()

    @property
    def amax(self) -> float:
        return max(abs(self.low), abs(self.high))

    def start_histogram(self) -> None:
        self.low, self.high = min(self.low, 0.0), max(self.high, 0.0)  # zero must be exact
        self.histogram = torch.zeros(HISTOGRAM_BINS, dtype=torch.float64)


@torch.no_grad()
def calibrate(
    model: nn.Module, batches: Iterable[torch.Tensor], *, method: str, percentile: float = 99.99
) -> dict:
    """Set every activation quantizer's scale and zero point from real batches.

    The model runs in eval mode without gradients, its activation quantizers passing float
    values through while they observe (weights are already INT8-rounded). ``minmax`` takes the
    observed range; ``percentile`` clips to the ``percentile``-th percentile of ``|x|``
    (symmetric int8) or to the ``100 - p`` / ``p`` percentiles of ``x`` (uint8); ``mse`` picks
    the clipping range, among 1%..100% of the observed one, with the least quantization error
    on the observed histogram. Percentile and mse need a second pass over ``batches``.

    The ranges stay fixed afterwards: quantization-aware training then adapts the weights to
    them (weight scales still follow the weights), and PTQ uses them as they are.

    Args:
        model: from :func:`prepare_quantized`; its train/eval mode is restored afterwards.
        batches: preprocessed input batches on the model's device (a list: it may be read twice).
        method: ``"minmax"``, ``"percentile"`` or ``"mse"``.
        percentile: for ``"percentile"``, in (50, 100].

    Returns:
        ``{quantizer name: (scale, zero_point)}``, for the record.

    Raises:
        ValueError: unknown method, or no batch given.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(
            f"calibration: expected one of {', '.join(CALIBRATION_METHODS)}, got {method!r}"
        )
    batches = list(batches)
    if not batches:
        raise ValueError("calibration needs at least one batch")
    quantizers = {name: m for name, m in model.named_modules() if isinstance(m, ActQuant)}
    training = model.training
    model.eval()
    try:
        for quantizer in quantizers.values():
            quantizer.observer = _Observer(symmetric=quantizer.signed)
        _run(model, batches)
        if method != "minmax":
            for quantizer in quantizers.values():
                quantizer.observer.start_histogram()
            _run(model, batches)
        for quantizer in quantizers.values():
            _set_range(quantizer, _clipping_range(quantizer, method, percentile))
    finally:
        for quantizer in quantizers.values():
            quantizer.observer = None
        model.train(training)
    return {name: (q.scale.item(), q.zero_point.item()) for name, q in quantizers.items()}


def _run(model: nn.Module, batches: list[torch.Tensor]) -> None:
    for batch in batches:
        model(batch)


def _clipping_range(quantizer: ActQuant, method: str, percentile: float) -> tuple[float, float]:
    """(low, high) to quantize; symmetric quantizers use (-amax, amax)."""
    observer = quantizer.observer
    low, high = min(observer.low, 0.0), max(observer.high, 0.0)
    if quantizer.signed:
        low, high = -max(-low, high), max(-low, high)
    if method == "minmax" or high - low <= 0:
        return low, high
    centers, counts = _bins(observer)
    if method == "percentile":
        return _percentile_range(quantizer, centers, counts, percentile, low, high)
    return _mse_range(quantizer, centers, counts, low, high)


def _bins(observer: _Observer) -> tuple[torch.Tensor, torch.Tensor]:
    start, stop = (0.0, observer.amax) if observer.symmetric else (observer.low, observer.high)
    width = (stop - start) / HISTOGRAM_BINS
    centers = start + width * (torch.arange(HISTOGRAM_BINS, dtype=torch.float64) + 0.5)
    return centers, observer.histogram


def _percentile_range(quantizer, centers, counts, percentile, low, high) -> tuple[float, float]:
    cdf = counts.cumsum(0) / counts.sum().clamp_min(1)
    width = (centers[1] - centers[0]).item()

    def value_at(fraction: float) -> float:
        index = int(
            torch.searchsorted(cdf, torch.tensor([fraction], dtype=torch.float64)).clamp_max(
                len(cdf) - 1
            )
        )
        return centers[index].item() + width / 2

    if quantizer.signed:
        amax = min(value_at(percentile / 100), high)
        return -amax, amax
    lower = (
        centers[0].item() - width / 2
        if percentile == 100
        else value_at(1 - percentile / 100) - width
    )
    return max(min(lower, 0.0), low), min(max(value_at(percentile / 100), 0.0), high)


def _mse_range(quantizer, centers, counts, low, high) -> tuple[float, float]:
    best, best_error = (low, high), float("inf")
    for step in range(1, MSE_CANDIDATES + 1):
        fraction = step / MSE_CANDIDATES
        scale, zero_point = _qparams(quantizer, low * fraction, high * fraction)
        q = torch.clamp(
            torch.round(centers / scale) + zero_point, quantizer.quant_min, quantizer.quant_max
        )
        error = (counts * (centers - (q - zero_point) * scale) ** 2).sum().item()
        if error < best_error:
            best, best_error = (low * fraction, high * fraction), error
    return best


def _qparams(quantizer: ActQuant, low: float, high: float) -> tuple[float, int]:
    """Scale and zero point quantizing ``low``..``high``.

    On the network's input (uint8) the lowest value gets an exact code: images normalised to
    [-1, 1] (mean 0.5, std 0.5) with the plain range have the scale of their own 8-bit grid and a
    zero point of 127.5, rounded, so every pixel lands half-way between two codes, and the most
    common one (black, the image's lowest value) on a rounding tie that float error decides
    either way (ONNX Runtime and PyTorch disagreed on it; 1e-6 of input noise moved every image
    of an INT8 MNASNet). A scale of ``-low / zero_point`` with the zero point rounded down puts
    ``low`` on code 0, ``high`` still within 255, the other pixels off the ties; it is used where
    it coarsens the scale by under 1/64.
    """
    if quantizer.signed:
        return max(max(-low, high) / 127, _MIN_SCALE), 0
    scale = max((high - low) / 255, _MIN_SCALE)
    if quantizer.network_input and low < 0 and -low / scale >= INPUT_EXACT_MIN_STEPS:
        steps = math.floor(-low / scale)
        return -low / steps, steps
    return scale, int(min(max(round(-low / scale), 0), 255))


def _set_range(quantizer: ActQuant, bounds: tuple[float, float]) -> None:
    scale, zero_point = _qparams(quantizer, *bounds)
    quantizer.scale.fill_(scale)
    quantizer.zero_point.fill_(zero_point)
