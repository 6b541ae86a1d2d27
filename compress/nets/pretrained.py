"""Pretrained weights in: a local file, a torchvision weights name, a timm tag or a Hugging Face
Hub repository, each fetched through its own library's loader and cache, then fitted to the
network and loaded strictly.

A user arrives with a pretrained teacher and wants a pretrained-initialised student; how they
name the weights decides where they come from:

=================================  ==========================================================
``weights:``                       where from
=================================  ==========================================================
``teacher.safetensors``            a local file (``safetensors``); ``.pt``, ``.pth``, ``.bin``,
                                   ``.ckpt``: a torch ``state_dict``, read ``weights_only``
``IMAGENET1K_V2``, ``DEFAULT``     torchvision's weights enum of the ``torchvision:`` model,
                                   cached in ``$TORCH_HOME/hub/checkpoints``
``timm:resnet50.a1_in1k``          timm's pretrained tag (or the bare tag ``a1_in1k``) of the
                                   ``timm:`` model, through timm's loader (Hub cache ``HF_HOME``)
``hf-hub:org/name[@revision]``     ``model.safetensors`` (else ``pytorch_model.bin``) of a Hub
                                   repository, through ``huggingface_hub``'s cache
``pretrained``                     the library's default weights for the model
=================================  ==========================================================

Fitting: when the weights' class count differs from the data's (an ImageNet head, a 10-class
dataset) the classifier is left new and everything else loaded; layers that the small-image stem
or the input-channel adaptation replaced are left new; prefixes of wrapped training
(``module.``, ``_orig_mod.``, ``model.``) are stripped. Anything else that does not fit is an
error listing the first few keys (``strict=False`` loads what fits and records the rest). Where a
download is needed and the network is unreachable, the error names the file and where to place
it, so a copied cache works offline.

Example:
    >>> model = build_model("torchvision:resnet50", num_classes=10)
    >>> report = load_pretrained(model, "IMAGENET1K_V2", model_name="torchvision:resnet50")
    >>> report.head_replaced   # ('fc.weight', 'fc.bias'): 1000 ImageNet classes -> 10
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from compress.core.fileio import not_a_file
from compress.errors import ModelError, first_line
from compress.nets.models import TIMM_PREFIX, build_model, classifier_key, timm_pretrained_cfg
from compress.nets.weights import mismatches, read_state_dict

FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
HF_PREFIX = "hf-hub:"
DEFAULT_WEIGHTS = "pretrained"  # the library's default weights for the model
TORCHVISION_PREFIX = "torchvision:"
HF_FILES = ("model.safetensors", "pytorch_model.bin")  # what a Hub repository's weights are called
# the prefixes wrapped training leaves on every key: DDP, torch.compile, Lightning modules
_WRAPPERS = ("module.", "_orig_mod.", "model.")
_ENUM_NAME = re.compile(r"(?:[A-Za-z][A-Za-z0-9_]*\.)?[A-Z][A-Z0-9_]*")
_TIMM_TAG = re.compile(r"[a-z0-9][a-z0-9_]*")
_HF_REPO = re.compile(r"([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?")

SOURCES_HELP = (
    "a .safetensors/.pt/.pth/.bin/.ckpt file, a torchvision weights name (IMAGENET1K_V1, "
    "DEFAULT), timm:<arch>.<tag>, hf-hub:<org>/<name> or 'pretrained'"
)


@dataclass(frozen=True)
class WeightSource:
    """Where a network's starting weights come from, parsed from what the user wrote.

    ``kind`` is ``"file"``, ``"torchvision"``, ``"timm"`` or ``"hf-hub"``; ``name`` the path,
    the weights enum member, the timm tag or the repository; ``revision`` a Hub revision."""

    kind: str
    name: str
    text: str
    revision: str | None = None

    @property
    def local_file(self) -> Path | None:
        return Path(self.name) if self.kind == "file" else None


@dataclass(frozen=True)
class WeightsLoaded:
    """What :func:`load_pretrained` did: the record a stage keeps of its starting weights."""

    source: str
    loaded: int  # tensors taken from the weights
    head_replaced: tuple[str, ...] = ()  # classifier tensors left new: the class count differs
    source_classes: int | None = None  # the weights' class count where the head was replaced
    reinitialised: tuple[str, ...] = ()  # tensors of layers the stem/input adaptation replaced
    skipped: tuple[str, ...] = ()  # strict=False only: what did not fit and was left new

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def parse_weights(text: str, model: str) -> WeightSource:
    """Read a ``weights`` value for the network ``model`` (a registered name such as
    ``torchvision:resnet50``); nothing is fetched or opened.

    Raises:
        ModelError: the value is none of the forms above, or names weights of another library
            than the model's (a torchvision name for a timm model).
    """
    text = text.strip() if isinstance(text, str) else text
    if not isinstance(text, str) or not text:
        raise ModelError(f"expected {SOURCES_HELP}, got {text!r}")
    library = model.split(":", 1)[0] if ":" in model else ""
    if text.startswith(HF_PREFIX):
        found = _HF_REPO.fullmatch(text.removeprefix(HF_PREFIX))
        if not found:
            raise ModelError(f"expected hf-hub:<org>/<name>[@revision], got {text!r}")
        return WeightSource("hf-hub", found.group(1), text, found.group(2))
    if text.startswith(TIMM_PREFIX):
        arch, _, tag = text.removeprefix(TIMM_PREFIX).partition(".")
        if library != "timm":
            raise ModelError(f"timm weights {text!r} need a timm: model, not {model}")
        if arch != model.removeprefix(TIMM_PREFIX) or not _TIMM_TAG.fullmatch(tag):
            raise ModelError(
                f"expected timm:{model.removeprefix(TIMM_PREFIX)}.<tag> (weights of the model's "
                f"own architecture), got {text!r}"
            )
        return WeightSource("timm", tag, text)
    if text.lower().endswith(FILE_SUFFIXES) or "/" in text or "\\" in text:
        if not text.lower().endswith(FILE_SUFFIXES):
            raise ModelError(
                f"{text}: expected a weights file ending in {', '.join(FILE_SUFFIXES)} "
                "(a state_dict or safetensors file)"
            )
        return WeightSource("file", text, text)
    if library == "timm" and (text == DEFAULT_WEIGHTS or _TIMM_TAG.fullmatch(text)):
        return WeightSource("timm", "" if text == DEFAULT_WEIGHTS else text, text)
    if library == "torchvision" and (text == DEFAULT_WEIGHTS or _ENUM_NAME.fullmatch(text)):
        return WeightSource("torchvision", "DEFAULT" if text == DEFAULT_WEIGHTS else text, text)
    if library not in ("timm", "torchvision") and (text == DEFAULT_WEIGHTS or "." not in text):
        raise ModelError(
            f"{model} has no named pretrained weights; give a weights file or hf-hub:<org>/<name>"
        )
    raise ModelError(f"expected {SOURCES_HELP}, got {text!r}")


def check_source(source: WeightSource, model: str) -> None:
    """What can be known before anything downloads: the file exists, torchvision or timm knows
    the named weights. Recipes are checked with it before the first stage runs.

    Raises:
        ModelError: the file is missing, or the library knows no such weights (with the names
            it knows).
    """
    if source.kind == "file":
        problem = not_a_file(source.name)
        if problem is not None:
            raise ModelError(f"{source.name}: {problem}; expected a weights file")
    elif source.kind == "torchvision":
        _torchvision_weights(source, model)
    elif source.kind == "timm":
        timm_pretrained_cfg(model, source.name or None)


def build_pretrained(
    name: str,
    num_classes: int,
    weights: str,
    *,
    cifar_stem: bool = False,
    in_channels: int = 3,
    image_size: int | None = None,
    strict: bool = True,
) -> tuple[nn.Module, WeightsLoaded]:
    """:func:`~compress.nets.models.build_model` started from pretrained ``weights`` (any form
    above).

    timm's tags go through ``timm.create_model(pretrained=True)`` itself, so timm's own
    adaptations apply (the input conv to ``in_channels``, a ViT's position embedding to
    ``image_size``); every other source is built randomly and then :func:`load_pretrained`.

    Returns:
        ``(model in training mode, what was loaded)``.

    Raises:
        ModelError: an unknown source, weights that do not fit, or a download that failed (the
            message names the file and where to place it).
    """
    source = parse_weights(weights, name)
    if source.kind != "timm":
        model = build_model(
            name, num_classes, cifar_stem=cifar_stem, in_channels=in_channels, image_size=image_size
        )
        return model, load_pretrained(model, source, model_name=name, strict=strict)
    cfg = timm_pretrained_cfg(name, source.name or None)
    with _downloading(source, cfg):
        model = build_model(
            name,
            num_classes,
            cifar_stem=cifar_stem,
            in_channels=in_channels,
            image_size=image_size,
            timm_tag=cfg["tag"],
        )
    # timm loaded everything but the head it replaced (another class count) and the layers the
    # stem adaptation replaced after it
    replaced = cfg.get("num_classes") != num_classes
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads) if replaced else ()
    keys = model.state_dict().keys()
    head_keys = tuple(k for h in heads for k in (f"{h}.weight", f"{h}.bias") if k in keys)
    reinitialised = tuple(_tensors_of(model, model.compress_adapted))
    report = WeightsLoaded(
        source=source.text,
        loaded=len(keys) - len(head_keys) - len(reinitialised),
        head_replaced=head_keys,
        source_classes=cfg.get("num_classes") if replaced else None,
        reinitialised=reinitialised,
    )
    return model, report


def load_pretrained(
    model: nn.Module,
    weights: str | WeightSource,
    *,
    model_name: str | None = None,
    strict: bool = True,
) -> WeightsLoaded:
    """Load pretrained ``weights`` into ``model`` in place, fitting them as described above.

    Args:
        model: any ``nn.Module``; a network of :func:`~compress.nets.models.build_model` also knows
            which layers its stem adaptation replaced.
        weights: a file, ``hf-hub:org/name``, or (with ``model_name``) a torchvision weights
            name or timm tag of that model.
        model_name: the registered name the model was built from (``torchvision:resnet50``);
            needed for named weights, whose library depends on it.
        strict: False loads what fits and records the rest in ``skipped``, instead of refusing.

    Returns:
        What was loaded, replaced and left new.

    Raises:
        ModelError: the weights cannot be read or fetched, or do not fit (first keys listed).
    """
    label = getattr(model, "compress_name", type(model).__name__)
    name = model_name or getattr(model, "compress_name", "").split(" (")[0]
    source = weights if isinstance(weights, WeightSource) else parse_weights(weights, name)
    state = _fetch(source, name)
    report = fit_state_dict(model, state, source.text, strict=strict, label=label)
    if source.kind == "torchvision" and hasattr(model, "transform_input"):
        # GoogLeNet's and Inception-v3's weights were trained on inputs the network
        # re-normalises itself (off when built without weights): torchvision's builder turns it
        # on with them, or the first layer sees other values
        model.transform_input = True
    return report


def fit_state_dict(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    *,
    strict: bool = True,
    label: str | None = None,
) -> WeightsLoaded:
    """Load ``state`` into ``model``: wrapper prefixes stripped, a classifier of another class
    count and the layers the stem adaptation replaced left new, everything else strict."""
    label = label or getattr(model, "compress_name", type(model).__name__)
    expected = model.state_dict()
    state = _without_aux_heads(_unwrapped(state, expected), expected)
    head = _head_keys(model, expected, state)
    adapted = set(_tensors_of(model, getattr(model, "compress_adapted", ())))
    reinitialised = [
        k for k in adapted if k in state and k in expected and state[k].shape != expected[k].shape
    ]
    left_new = set(head) | set(reinitialised)
    fitting = {k: v for k, v in state.items() if k not in left_new}
    for key, tensor in expected.items():  # BatchNorm's step counter: absent from many exports
        if key.endswith("num_batches_tracked") and key not in fitting:
            fitting[key] = tensor
    wanted = {k: v for k, v in expected.items() if k not in left_new}
    problems = mismatches(wanted, fitting)
    if problems and strict:
        raise ModelError(
            f"weights {source} do not fit {label}: {'; '.join(problems)} (strict_weights: false "
            "loads only what fits)"
        )
    usable = {
        k: v for k, v in fitting.items() if k in wanted and tuple(v.shape) == tuple(wanted[k].shape)
    }
    if not any(not k.endswith("num_batches_tracked") for k in usable):
        raise ModelError(f"weights {source} do not fit {label}: no tensor matches a layer")
    model.load_state_dict(usable, strict=False)
    skipped = sorted((set(wanted) | set(fitting)) - set(usable))
    return WeightsLoaded(
        source=source,
        loaded=len(usable),
        head_replaced=tuple(head),
        source_classes=int(state[head[0]].shape[0]) if head else None,
        reinitialised=tuple(sorted(reinitialised)),
        skipped=tuple(skipped),
    )


# --- fetching ------------------------------------------------------------------------------------


def _fetch(source: WeightSource, model: str) -> dict[str, torch.Tensor]:
    if source.kind == "file":
        return read_weights_file(source.name)
    if source.kind == "torchvision":
        return _torchvision_state(source, model)
    if source.kind == "hf-hub":
        return _hub_state(source)
    cfg = timm_pretrained_cfg(model, source.name or None)  # timm weights for a module of our own
    with _downloading(source, cfg):
        return build_model(
            model, int(cfg.get("num_classes") or 1000), timm_tag=cfg["tag"]
        ).state_dict()


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or of a torch ``state_dict`` file (read with
    ``weights_only=True``: a whole pickled model is refused with how to save a state_dict)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    if path.suffix.lower() != ".safetensors":
        return read_state_dict(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(
            f"weights file {path} is not a safetensors file, or is truncated ({first_line(exc)})"
        ) from None
    if not state:
        raise ModelError(f"weights file {path} holds no tensors")
    return state


def _torchvision_weights(source: WeightSource, model: str):
    from compress.core.compat import torchvision

    arch = model.removeprefix(TORCHVISION_PREFIX)
    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise ModelError(f"torchvision has no pretrained weights for {model}") from None
    member = source.name.rsplit(".", 1)[-1]
    if "." in source.name and source.name.split(".")[0] != enum.__name__:
        raise ModelError(f"{source.name} are not weights of {model} (its weights: {enum.__name__})")
    try:
        return enum[member]
    except KeyError:
        known = ", ".join(["DEFAULT", *enum.__members__])
        raise ModelError(f"{model} has no weights {member!r}; torchvision knows: {known}") from None


def _torchvision_state(source: WeightSource, model: str) -> dict[str, torch.Tensor]:
    weights = _torchvision_weights(source, model)
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except OSError as exc:  # URLError, a refused connection, a full disk
        raise ModelError(
            f"cannot download {weights.url} ({first_line(exc)}); without a network, place that "
            f"file at {cache} (torch.hub's cache: $TORCH_HOME/hub/checkpoints)"
        ) from None
    except Exception as exc:  # a corrupt or partial cached file fails torch.load in many ways
        raise ModelError(
            f"the cached weights {cache} cannot be read ({first_line(exc)}); delete the file to "
            "download it again"
        ) from None


def _hub_state(source: WeightSource) -> dict[str, torch.Tensor]:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:
        raise ModelError(
            f"{source.text} needs huggingface_hub: pip install huggingface_hub"
        ) from None
    for filename in HF_FILES:
        try:
            path = hf_hub_download(source.name, filename, revision=source.revision)
        except LocalEntryNotFoundError:  # offline and not cached: maybe the other name is
            continue
        except EntryNotFoundError:  # the repository has no file of this name
            continue
        except OSError as exc:
            raise ModelError(_hub_message(source, source.name, exc)) from None
        return read_weights_file(path)
    raise ModelError(_hub_message(source, source.name, None))


def _hub_message(source: WeightSource, repo: str, exc: BaseException | None) -> str:
    from huggingface_hub import constants

    # "not in the local cache" (FileNotFoundError) is what the line says already
    why = "" if exc is None or isinstance(exc, FileNotFoundError) else f" ({first_line(exc)})"
    return (
        f"cannot fetch {' or '.join(HF_FILES)} of {repo} from the Hugging Face Hub{why}, and it "
        f"is not in the Hub cache {constants.HF_HUB_CACHE}; without a network, download it "
        f"elsewhere (`hf download {repo}`), copy that cache here (or set HF_HOME) and set "
        "HF_HUB_OFFLINE=1"
    )


@contextmanager
def _downloading(source: WeightSource, cfg: dict) -> Iterator[None]:
    """timm's download failures (its Hub or URL fetch) as one line naming the file and where it
    is cached."""
    try:
        yield
    except OSError as exc:
        if cfg.get("hf_hub_id"):
            raise ModelError(_hub_message(source, cfg["hf_hub_id"], exc)) from None
        url = cfg.get("url") or "its weights"
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(str(url)).name
        raise ModelError(
            f"cannot download {url} ({first_line(exc)}); without a network, place that file at "
            f"{cache}"
        ) from None


# --- fitting -------------------------------------------------------------------------------------


# the auxiliary classifiers of torchvision's GoogLeNet and Inception-v3, which their weights
# files hold and compress builds the networks without (compress.nets.models.WITHOUT_AUX_HEADS)
AUX_HEADS = ("aux1.", "aux2.", "AuxLogits.")


def _without_aux_heads(state: dict[str, torch.Tensor], expected: dict) -> dict[str, torch.Tensor]:
    """``state`` without the auxiliary-head tensors the network has no place for."""
    present = {prefix for prefix in AUX_HEADS if any(k.startswith(prefix) for k in expected)}
    return {
        k: v
        for k, v in state.items()
        if not any(k.startswith(p) for p in AUX_HEADS if p not in present)
    }


def _unwrapped(state: dict[str, torch.Tensor], expected: dict) -> dict[str, torch.Tensor]:
    """Keys without the prefixes wrapped training adds, when every key has one and none fits."""
    while state and not state.keys() & expected.keys():
        prefix = next((p for p in _WRAPPERS if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _head_keys(model: nn.Module, expected: dict, state: dict) -> list[str]:
    """Classifier tensors of another class count: the model's classes as the first dimension
    where the weights have another, every other dimension equal (aux heads included)."""
    key = classifier_key(model)
    if key is None or key not in expected:
        return []
    classes = expected[key].shape[0]
    return [
        k
        for k, v in expected.items()
        if k in state
        and v.ndim >= 1
        and state[k].ndim == v.ndim
        and v.shape[0] == classes
        and state[k].shape[0] != classes
        and state[k].shape[1:] == v.shape[1:]
    ]


def _tensors_of(model: nn.Module, modules: tuple[str, ...]) -> list[str]:
    prefixes = tuple(f"{m}." for m in modules)
    return [k for k in model.state_dict() if prefixes and k.startswith(prefixes)]
