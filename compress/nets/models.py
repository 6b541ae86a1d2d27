"""Model zoo: torchvision and timm classifiers and the CIFAR ResNets, built by name.

Names are ``torchvision:<name>`` (any classification model torchvision knows),
``cifar:resnet8/14/20/32/44/56/110`` and ``timm:<name>`` (any model timm knows; timm is an optional
extra, imported on first use). Networks are built randomly initialised; pretrained weights come
in through :mod:`compress.nets.pretrained`, which names its source explicitly (a file, a torchvision
weights name, a timm tag, a Hub repository): nothing downloads unless a recipe asks for it.

Example:
    >>> model = build_model("torchvision:resnet18", num_classes=10, cifar_stem=True)
    >>> params, macs = count_params_macs(model, image_size=32)
"""

from __future__ import annotations

import copy
import difflib
import functools
from collections.abc import Callable

import torch
import torch_pruning as tp
from torch import nn

from compress.core.compat import torchvision
from compress.core.registry import Registry
from compress.errors import ModelError, first_line
from compress.nets.modes import evaluating

# name -> build(num_classes, image_size): image_size None or the side the network is sized for
MODELS: Registry[Callable[[int, int | None], nn.Module]] = Registry("model", ModelError)

_CIFAR_DEPTHS = (8, 14, 20, 32, 44, 56, 110)


# --- CIFAR ResNets -----------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convs plus a shortcut; a 1x1 conv + BN shortcut where the shape changes.

    He et al. used a parameter-free zero-padding shortcut (option A) on CIFAR. The projection
    (option B) costs ~3k parameters on resnet56 but is an ordinary conv that Torch-Pruning's
    dependency graph can prune and every ONNX runtime executes without special cases.
    """

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. 2016, "Deep Residual Learning for Image Recognition", sec. 4.2.

    A 3x3 conv with 16 channels, three stages of ``n`` basic blocks with 16/32/64 channels (the
    last two start with stride 2), global average pooling and a linear classifier: depth 6n+2.
    Attribute names (``conv1``, ``bn1``, ``fc``) follow torchvision's ResNet.
    """

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ModelError(
                f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110), got {depth}"
            )
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _stage(16, 16, n, stride=1)
        self.layer2 = _stage(16, 32, n, stride=2)
        self.layer3 = _stage(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_planes, planes, stride)]
    layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


# --- registration ------------------------------------------------------------------------------


# torchvision classifiers with auxiliary heads: built without them. In training mode they make the
# network return a tuple that no loss here reads (GoogLeNet crashed inside the loss), and
# Inception-v3's needs 299 px inputs (at 224 px its 5x5 convolution meets a 3x3 map). Weights
# files that hold them load without them (compress.nets.pretrained.AUX_HEADS).
WITHOUT_AUX_HEADS = ("googlenet", "inception_v3")


def _register_torchvision() -> None:
    for name in torchvision.models.list_models(module=torchvision.models):

        def build(num_classes: int, image_size: int | None, name: str = name) -> nn.Module:
            sized = {"image_size": image_size} if image_size and name.startswith("vit_") else {}
            if name in WITHOUT_AUX_HEADS:
                sized["aux_logits"] = False
            return torchvision.models.get_model(
                name, weights=None, num_classes=num_classes, **sized
            )

        MODELS.register(f"torchvision:{name}")(build)


def _register_cifar() -> None:
    for depth in _CIFAR_DEPTHS:

        def build(num_classes: int, image_size: int | None, depth: int = depth) -> nn.Module:
            return CifarResNet(depth, num_classes)

        MODELS.register(f"cifar:resnet{depth}")(build)


_register_torchvision()
_register_cifar()


def model_names() -> list[str]:
    """Every registered name :func:`build_model` accepts, sorted (``timm:`` names are not listed:
    :data:`TIMM_NAMES` says what they are).

    Returns:
        Names such as ``"cifar:resnet56"`` and ``"torchvision:mobilenet_v2"``.
    """
    return MODELS.names()


def unknown_model(name: str) -> str | None:
    """Why ``name`` cannot be built (an unknown name, with close matches, or a missing timm
    extra), or None when :func:`build_model` knows it. Recipes are checked with it before
    anything runs."""
    if name.startswith(TIMM_PREFIX):
        try:
            _timm_architecture(name)
        except ModelError as exc:
            return str(exc)
        return None
    return None if name in MODELS else MODELS.unknown_message(name)


# --- building ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def module_names(name: str) -> tuple[str, ...]:
    """Names of a model's submodules (what forward hooks and feature losses refer to).

    The stem and class count do not change the names, so one build per architecture suffices.
    """
    return tuple(n for n, _ in build_model(name, num_classes=10).named_modules() if n)


def build_model(
    name: str,
    num_classes: int,
    cifar_stem: bool = False,
    in_channels: int = 3,
    image_size: int | None = None,
    *,
    timm_tag: str | None = None,
) -> nn.Module:
    """Build a classifier by name, randomly initialised (or timm-pretrained, ``timm_tag``).

    Args:
        name: A registered name, e.g. ``"torchvision:resnet18"`` or ``"cifar:resnet56"``, or
            ``"timm:<name>"`` for any timm model (needs the timm extra).
        num_classes: Outputs of the classifier head.
        cifar_stem: Adapt an ImageNet-shaped network to small (32x32) inputs, whose ImageNet stem
            would downsample 32x away before the first block. ResNets (torchvision's and timm's):
            the first stem conv gets stride 1 (a 7x7 one becomes 3x3) and the max-pool is
            removed. MobileNetV2/V3 (and timm's MobileNets and EfficientNets): the stem conv and
            the first stride-2 depthwise conv get stride 1 (total downsampling 8 instead of 32),
            the usual practice of CIFAR MobileNet ports such as kuangliu/pytorch-cifar and
            Torch-Pruning's CIFAR benchmarks. timm vision transformers: 4x4 patches
            (:data:`VIT_CIFAR_PATCH`), as CIFAR ViTs use, instead of 16x16 ones that would leave
            four tokens of a 32x32 image. Ignored for ``cifar:`` models, already CIFAR-shaped.
        in_channels: Input channels; anything but 3 replaces the first conv (ResNets and
            MobileNets only; any timm model).
        image_size: Side of the input images. Only vision transformers use it (their position
            embedding has one entry per patch): timm's (with ``cifar_stem`` they need it) and
            torchvision's ``vit_*`` (a multiple of the patch size; None: their 224).

        timm_tag: Build a ``timm:`` model with timm's pretrained weights of this tag (e.g.
            ``"a1_in1k"``), through timm's own loader and cache: it adapts the input conv to
            ``in_channels``, resizes a ViT's position embedding to ``image_size`` and leaves a
            new head where ``num_classes`` differs. Download failures (``OSError``) are raised
            as they are, for :mod:`compress.nets.pretrained` to explain.

    Returns:
        The model, in training mode, with ``compress_name`` set to ``"<name> (num_classes=K)"``
        for error messages and ``compress_adapted`` to the names of the layers the stem or input
        adaptation replaced (pretrained weights cannot fill them).

    Raises:
        ModelError: Unknown name (with close matches), a ``timm:`` name without the timm extra,
            or ``cifar_stem`` / ``in_channels`` asked of an architecture we do not know how to
            adapt.
    """
    if num_classes < 1:
        raise ModelError(f"{name}: num_classes must be positive, got {num_classes}")
    if name.startswith(TIMM_PREFIX):
        model, adapted = _build_timm(
            name, num_classes, cifar_stem, in_channels, image_size, timm_tag
        )
    else:
        if timm_tag is not None:
            raise ModelError(f"{name}: timm weights ({timm_tag!r}) need a timm: model")
        model, adapted = MODELS.get(name)(num_classes, image_size), []
        if cifar_stem and not isinstance(model, CifarResNet):
            adapted += _adapt_cifar_stem(model, name)
        if in_channels != 3:
            adapted += _adapt_in_channels(model, name, in_channels)
    model.compress_name = f"{name} (num_classes={num_classes})"
    model.compress_adapted = tuple(adapted)
    return model


def _first_conv(model: nn.Module) -> tuple[nn.Module, str, str] | None:
    """The module holding the first conv, its attribute name and the conv's full name; None for
    unknown families."""
    if isinstance(model, torchvision.models.ResNet | CifarResNet):
        return model, "conv1", "conv1"
    if isinstance(model, torchvision.models.MobileNetV2 | torchvision.models.MobileNetV3):
        return model.features[0], "0", "features.0.0"
    return None


def _replace_conv(parent: nn.Module, attr: str, **changes) -> None:
    """Swap a conv for one with some hyper-parameters changed, initialised like torchvision does."""
    old: nn.Conv2d = getattr(parent, attr)
    settings = {
        "in_channels": old.in_channels,
        "out_channels": old.out_channels,
        "kernel_size": old.kernel_size,
        "stride": old.stride,
        "padding": old.padding,
        "dilation": old.dilation,
        "groups": old.groups,
        "bias": old.bias is not None,
    }
    new = nn.Conv2d(**{**settings, **changes})
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    setattr(parent, attr, new)


def _adapt_cifar_stem(model: nn.Module, name: str) -> list[str]:
    """Small-image stem; returns the names of the layers it replaced (strides change in place)."""
    if isinstance(model, torchvision.models.ResNet):
        _replace_conv(model, "conv1", kernel_size=3, stride=1, padding=1)
        model.maxpool = nn.Identity()
        return ["conv1"]
    elif isinstance(model, torchvision.models.MobileNetV2 | torchvision.models.MobileNetV3):
        model.features[0][0].stride = (1, 1)
        _first_strided_depthwise(model.features[1:], name).stride = (1, 1)
        return []
    else:
        raise ModelError(
            f"{name}: cifar_stem is only known for ResNet and MobileNetV2/V3 models; "
            "set cifar_stem: false (or pick one of those)"
        )


def _first_strided_depthwise(features: nn.Module, name: str) -> nn.Conv2d:
    for module in features.modules():
        if isinstance(module, nn.Conv2d) and module.stride == (2, 2) and module.groups > 1:
            return module
    raise ModelError(f"{name}: found no stride-2 depthwise conv to adapt for cifar_stem")


def _adapt_in_channels(model: nn.Module, name: str, in_channels: int) -> list[str]:
    if in_channels < 1:
        raise ModelError(f"{name}: in_channels must be positive, got {in_channels}")
    place = _first_conv(model)
    if place is None:
        raise ModelError(
            f"{name}: in_channels={in_channels} is only supported for ResNet and MobileNet models"
        )
    parent, attr, full_name = place
    _replace_conv(parent, attr, in_channels=in_channels)
    return [full_name]


# --- timm --------------------------------------------------------------------------------------

TIMM_PREFIX = "timm:"
TIMM_EXTRA = "pip install -e '.[timm]'"
TIMM_NAMES = f"{TIMM_PREFIX}<name>: any model timm knows, never pretrained (needs {TIMM_EXTRA})"
VIT_CIFAR_PATCH = 4  # the patch side of CIFAR ViTs: 8x8 tokens of a 32x32 image
# timm modules whose models are VisionTransformer: patch_size and img_size are arguments
_TIMM_VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit")


def _timm(name: str):
    """timm, imported on first use: an optional extra, and seconds to import. torchvision is
    imported first (through :mod:`compress.core.compat`, at the top of this module): timm imports
    it, and on a CPU-only torch only our import of torchvision works."""
    try:
        import timm
    except ImportError:
        raise ModelError(f"{name} needs the timm extra: {TIMM_EXTRA}") from None
    return timm


def _timm_architecture(name: str) -> str:
    """The timm name behind ``timm:<name>``, checked against timm's registry."""
    timm = _timm(name)
    arch = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = (
            f" (did you mean {', '.join(repr(TIMM_PREFIX + c) for c in close)}?)" if close else ""
        )
        raise ModelError(
            f"unknown model {name!r}{hint}; timm's names are listed by timm.list_models()"
        )
    return arch


def _build_timm(
    name: str,
    num_classes: int,
    cifar_stem: bool,
    in_channels: int,
    image_size: int | None,
    tag: str | None,
) -> tuple[nn.Module, list[str]]:
    timm = _timm(name)
    arch = _timm_architecture(name)
    options = {"pretrained": tag is not None, "num_classes": num_classes, "in_chans": in_channels}
    vit = timm.models.model_entrypoint(arch).__module__ in _TIMM_VIT_MODULES
    if vit:
        options |= _vit_options(name, cifar_stem, image_size)
    full = arch if tag is None else f"{arch}.{tag}"
    try:
        model = _create_timm(timm, full, options, None if vit else image_size)
    except Exception as exc:  # timm asserts and raises many kinds of errors on bad arguments
        if tag is not None and isinstance(exc, OSError):
            raise  # a download failure: compress.nets.pretrained names the file and where it goes
        what = "load its pretrained weights" if tag is not None else "build it"
        raise ModelError(f"{name}: timm cannot {what} ({first_line(exc)})") from None
    adapted = _adapt_timm_cifar_stem(model, name) if cifar_stem and not vit else []
    return model, adapted


def _create_timm(timm, name: str, options: dict, image_size: int | None) -> nn.Module:
    """``timm.create_model``, built for ``image_size`` where the model takes an ``img_size``
    (Swin, LeViT, MaxViT, EfficientFormer...: their window or attention-bias tables are sized to
    the input; built for 224 px they refuse a 64 px image), else as timm builds it."""
    if image_size is None:
        return timm.create_model(name, **options)
    try:
        return timm.create_model(name, **options, img_size=image_size)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        return timm.create_model(name, **options)


def timm_pretrained_cfg(name: str, tag: str | None) -> dict:
    """timm's description of the pretrained weights ``<arch>.<tag>`` of ``timm:<arch>`` (where
    they are downloaded from, their class count, classifier layers, mean and std); ``tag`` None:
    timm's default weights for the architecture (their ``tag`` is in the result).

    Raises:
        ModelError: timm knows no such weights; the message lists the tags it knows.
    """
    timm = _timm(name)
    arch = _timm_architecture(name)
    try:
        cfg = timm.models.get_pretrained_cfg(arch if tag is None else f"{arch}.{tag}")
    except RuntimeError:  # timm's word for an unknown tag
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        known = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
        listed = ", ".join(known[:8]) + (f" (+{len(known) - 8} more)" if len(known) > 8 else "")
        raise ModelError(
            f"{name} has no pretrained weights"
            + (f" tagged {tag!r}" if tag is not None else "")
            + "; "
            + (f"timm knows: {listed}" if known else "timm has none for this architecture")
        )
    return cfg.to_dict()


def _vit_options(name: str, cifar_stem: bool, image_size: int | None) -> dict:
    """img_size (and with ``cifar_stem`` the patch size) of a timm ViT: its position embedding
    has one entry per patch, fixed when it is built."""
    if image_size is None:
        if cifar_stem:
            raise ModelError(
                f"{name}: a vision transformer's position embedding is sized to its input; "
                "cifar_stem needs image_size"
            )
        return {}
    if cifar_stem and image_size % VIT_CIFAR_PATCH:
        raise ModelError(
            f"{name}: cifar_stem cuts images into {VIT_CIFAR_PATCH}x{VIT_CIFAR_PATCH} patches, so "
            f"image_size must be a multiple of {VIT_CIFAR_PATCH}, got {image_size}"
        )
    return {"img_size": image_size} | ({"patch_size": VIT_CIFAR_PATCH} if cifar_stem else {})


def _adapt_timm_cifar_stem(model: nn.Module, name: str) -> list[str]:
    """timm's ResNets (``conv1`` a conv or a deep stem, then ``maxpool``) and its
    MobileNets/EfficientNets (``conv_stem``, then ``blocks``), as their torchvision twins.
    Returns the names of the layers it replaced."""
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3
    from timm.models.resnet import ResNet

    if isinstance(model, ResNet) and isinstance(model.maxpool, nn.MaxPool2d):
        replaced = []
        if isinstance(model.conv1, nn.Conv2d):
            _replace_conv(model, "conv1", kernel_size=3, stride=1, padding=1)
            replaced = ["conv1"]
        else:  # a deep stem: three 3x3 convs, the first one strided
            model.conv1[0].stride = (1, 1)
        model.maxpool = nn.Identity()
        return replaced
    elif isinstance(model, EfficientNet | MobileNetV3):
        model.conv_stem.stride = (1, 1)
        _first_strided_depthwise(model.blocks, name).stride = (1, 1)
        return []
    else:
        raise ModelError(
            f"{name}: cifar_stem is only known for timm ResNets (with a max-pool stem), "
            "MobileNets/EfficientNets and vision transformers; set cifar_stem: false "
            "(or pick one of those)"
        )


def classifier_key(model: nn.Module) -> str | None:
    """The state_dict key of the classifier's weight: the model's last Linear (or Conv2d, as in
    SqueezeNet) layer, whose first dimension is the number of classes."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            last = name
    return f"{last}.weight" if last else None


# --- measuring ---------------------------------------------------------------------------------


def count_params_macs(model: nn.Module, image_size: int, in_channels: int = 3) -> tuple[int, int]:
    """Parameters and multiply-accumulates of one forward pass on a single image.

    Counted by Torch-Pruning's op counter (the same one its pruning examples report), on CPU and
    in eval mode so that the numbers do not depend on where the model lives or its BN mode.

    Args:
        model: Any model taking ``(1, in_channels, image_size, image_size)`` inputs; its
            device and train/eval modes are left as they were.
        image_size: Height and width of the input.
        in_channels: Channels of the input.

    Returns:
        ``(params, macs)``.
    """
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    target = model if on_cpu else copy.deepcopy(model).cpu()
    with evaluating(target):
        macs, params = tp.utils.count_ops_and_params(
            target, torch.zeros(1, in_channels, image_size, image_size)
        )
    return int(params), int(macs)
