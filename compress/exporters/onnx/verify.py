"""The proof that an exported file matches PyTorch: ONNX Runtime and PyTorch on the same images,
within the tolerance of the file's precision, failing loudly when they disagree (CONTRIBUTING.md,
habit 6)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compress.errors import ExportError, UnprovableNetworkError, first_line

if TYPE_CHECKING:
    import onnxruntime
    from torch import nn
from compress.exporters.onnx.export import _eval_on_cpu

VERIFY_CHUNK = 64
# the quantile of the per-image |diff| taken as the file's typical difference: the median
NEAR_TIE_QUANTILE = 0.5
# a near tie's margin is at most this fraction of the largest |logit|, whatever the difference
NEAR_TIE_CAP = 0.1
# An INT8 network's own reproducibility (noise_floor): it runs again on the images times
# (1 + NOISE_FLOOR_EPSILON * standard normal noise), and so does every layer's output,
# NOISE_FLOOR_PROBES times. A relative change of 1e-6 is what float32 summation order does; it is
# what ONNX Runtime's float ops do differently from PyTorch's, at every layer.
NOISE_FLOOR_PROBES = 2
NOISE_FLOOR_EPSILON = 1e-6
# the model must reproduce itself on this share of the images for a file to be proven against it
MIN_REPRODUCED_SHARE = 0.5


_INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}  # ORT type -> numpy


def verify_onnx(
    path: Path,
    model: nn.Module,
    images: np.ndarray,
    *,
    tolerance: float,
    min_agreement: float,
    relative: bool = False,
    exact_int8: bool = False,
    noise_floor: bool = False,
) -> dict:
    """Prove an exported file reproduces the PyTorch model on real inputs (CONTRIBUTING.md, habit
    6).

    Both run on CPU: ONNX Runtime's CPUExecutionProvider and the model in float32, in eval mode
    under ``no_grad`` (its mode and device are restored afterwards). ONNX Runtime is fed the
    file's own input type (float32, or float16 for an FP16 file) and both outputs are compared in
    float64. Images go in chunks of 64; a file with a static batch size B gets chunks of exactly
    B images: only whole chunks are used, and fewer than B images are repeated to fill one.

    Args:
        path: the exported ``.onnx`` file.
        model: the PyTorch model it was exported from.
        images: float32 (N, C, H, W) batch, already normalised as the model expects.
        tolerance: largest acceptable absolute difference of any logit, multiplied by the
            largest |logit| of the PyTorch model when that exceeds 1 (:func:`allowed_abs_diff`).
        min_agreement: smallest acceptable fraction of images with the same top-1 class.
        relative: ``tolerance`` bounds the difference divided by the largest |logit| of the
            PyTorch model instead (an INT8 graph's rounding error scales with its output range,
            so an absolute bound would depend on how confident the model is).
        exact_int8: run ONNX Runtime's exact u8u8 integer kernels (``session.x64quantprecision``)
            instead of its u8s8 ones: what a VNNI CPU computes, proven on a CPU without VNNI
            (see :func:`open_session`).
        noise_floor: also run the model with its inputs and every layer's output perturbed at
            float32's own precision (:data:`NOISE_FLOOR_EPSILON`) and do not count a flip on an
            image where that alone moves the model's top-1 or its logits by half the margin
            (:func:`reference_noise`):
            for INT8 networks, where one activation rounded to the next code can cascade
            (measured: a trained EfficientNet-B3's fake-quantized network agreed 94.3% with
            itself on inputs changed by 1e-7, its largest logit moving 8.6 of 27).

    Returns:
        ``{"max_abs_diff", "mean_abs_diff", "max_abs_logit", "max_rel_diff", "top1_agreement",
        "samples", "tolerance", "relative", "min_agreement"}`` plus the keys of
        :func:`decisive_agreement`, which ``min_agreement`` bounds (``samples``: images
        compared, repeats included), and ``"proof": "reference noise"`` where the model does
        not reproduce itself and the file was judged against that
        (:func:`within_reference_noise`); worth writing into the export artifact.

    Raises:
        ExportError: the file cannot be run, its input type is neither float32 nor float16, its
            output shape differs from PyTorch's, or the difference/agreement is out of bounds
            (the message states both numbers). In the last case the error's ``result`` attribute
            holds the dict above.
    """
    path = Path(path)
    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ExportError(
            f"verify {path.name}: expected a non-empty (N, C, H, W) batch, got shape {images.shape}"
        )
    import torch

    session = open_session(path, exact_int8=exact_int8)
    chunks = _verify_chunks(images, session.get_inputs()[0].shape[0])
    with _eval_on_cpu(model), torch.no_grad():
        pairs = [_chunk_logits(session, model, chunk, path) for chunk in chunks]
        theirs = np.concatenate([theirs for _, theirs in pairs])
        noise = reference_noise(model, np.concatenate(chunks), theirs) if noise_floor else None
    return compare_logits(
        np.concatenate([ours for ours, _ in pairs]),
        theirs,
        path,
        tolerance=tolerance,
        min_agreement=min_agreement,
        relative=relative,
        noise=noise,
    )


def reference_noise(
    model: nn.Module, images: np.ndarray, reference: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """How far the model moves from its own ``reference`` logits when its inputs and every
    layer's output change at float32's precision: per image, the largest |logit change| over
    :data:`NOISE_FLOOR_PROBES` seeded perturbations of relative size :data:`NOISE_FLOOR_EPSILON`,
    and whether its top-1 class changed in any of them. Called under ``no_grad`` with the model
    in eval mode on CPU.

    A second runtime computes the same float operations in another order, so it perturbs every
    layer's result at this size, and an INT8 network rounds each result to its codes: a value
    that close to a rounding boundary takes the other code, at any depth. Perturbing the inputs
    alone reaches only the boundaries their change reaches, and understated the network's own
    chaos (an EfficientNet-B7 at 32 px, 55 blocks: its fake-quantized network flipped 40-45 of
    297 images with its inputs perturbed, 70-80 with every layer; ONNX Runtime computing the same
    Q/DQ graph unfused, 24; its INT8 file, 35). Where that alone moves the prediction, a flip is
    the network's, not the file's."""
    import torch

    inputs = torch.from_numpy(images)
    moved = np.zeros(len(images))
    unstable = np.zeros(len(images), dtype=bool)
    for probe in range(NOISE_FLOOR_PROBES):
        generator = torch.Generator().manual_seed(probe)
        noise = torch.randn(inputs.shape, generator=generator)
        outputs = []
        with _every_layer_perturbed(model, generator):
            for start in range(0, len(inputs), VERIFY_CHUNK):
                stop = start + VERIFY_CHUNK
                out = model(inputs[start:stop] * (1 + NOISE_FLOOR_EPSILON * noise[start:stop]))
                outputs.append(_logits(out).astype(np.float64))
        perturbed = np.concatenate(outputs)
        moved = np.maximum(moved, np.abs(perturbed - reference).max(axis=1))
        unstable |= perturbed.argmax(axis=1) != reference.argmax(axis=1)
    return moved, unstable


@contextmanager
def _every_layer_perturbed(model: nn.Module, generator) -> Iterator[None]:
    """Within it, each leaf module's float output (the model's own aside) is multiplied by (1 +
    NOISE_FLOOR_EPSILON * standard normal noise) drawn from ``generator``."""
    import torch

    def perturb(module, args, out):
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            noise = torch.randn(out.shape, generator=generator).to(out.dtype)
            return out * (1 + NOISE_FLOOR_EPSILON * noise)
        return None

    leaves = [  # the model's own output is the logits: nothing rounds it afterwards
        module
        for module in model.modules()
        if module is not model and next(module.children(), None) is None
    ]
    hooks = [leaf.register_forward_hook(perturb) for leaf in leaves]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def open_session(
    path: Path, threads: int = 0, *, exact_int8: bool = False
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session for ``path``; any loading failure becomes one-line ExportError.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads; 0 keeps ONNX Runtime's default (one per physical core).
        exact_int8: on x86 CPUs without VNNI, convert int8 weights to uint8 at load time
            (``session.x64quantprecision``) so no product pair saturates: slower, but the
            sums a VNNI CPU computes. No effect elsewhere.

    Returns:
        The session, with all graph optimisations enabled.

    Raises:
        ExportError: the file is missing or ONNX Runtime cannot load it.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        options.intra_op_num_threads = threads
    if exact_int8:
        options.add_session_config_entry("session.x64quantprecision", "1")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"{path}: ONNX Runtime cannot load it: {first_line(exc)}") from exc


def _verify_chunks(images: np.ndarray, batch: Any) -> list[np.ndarray]:
    """VERIFY_CHUNK-sized chunks for a dynamic batch axis (``batch`` is its name or None); for a
    static one, whole chunks of exactly ``batch`` images, repeating them if there are fewer."""
    if not isinstance(batch, int) or batch < 1:
        return [images[i : i + VERIFY_CHUNK] for i in range(0, len(images), VERIFY_CHUNK)]
    if len(images) < batch:
        images = np.resize(images, (batch, *images.shape[1:]))  # repeats the images cyclically
    return [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]


def _chunk_logits(session, model, chunk: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ONNX Runtime's logits, PyTorch's) of one chunk, in float64; the model is already in eval
    mode on CPU under no_grad."""
    import torch

    feed = session.get_inputs()[0]
    if feed.type not in _INPUT_DTYPES:
        raise ExportError(
            f"{path.name}: cannot verify an input of type {feed.type} (float or float16 only)"
        )
    ours = session.run(None, {feed.name: chunk.astype(_INPUT_DTYPES[feed.type])})[0]
    theirs = _logits(model(torch.from_numpy(chunk)))
    if ours.shape != theirs.shape:
        raise ExportError(
            f"{path.name}: ONNX output shape {ours.shape} differs from PyTorch's {theirs.shape}"
        )
    return ours.astype(np.float64), theirs.astype(np.float64)


def _logits(output) -> np.ndarray:
    """A model's logits as numpy: the first output of a model that returns several."""
    return (output[0] if isinstance(output, (tuple, list)) else output).numpy()


def compare_logits(
    ours: np.ndarray,
    theirs: np.ndarray,
    path: Path,
    *,
    tolerance: float,
    min_agreement: float,
    relative: bool,
    noise: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """The verification record of logits from another runtime (a TensorRT engine, a converted
    file) against reference logits on the same inputs, with :func:`verify_onnx`'s keys and bounds;
    ``noise``: :func:`reference_noise` of the reference on those inputs.

    Raises:
        ExportError: different shapes, or out of bounds (the error's ``result`` holds the record).
    """
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if ours.shape != theirs.shape:
        raise ExportError(
            f"{Path(path).name}: output shape {ours.shape} differs from the reference's "
            f"{theirs.shape}"
        )
    diff = np.abs(ours - theirs)
    max_abs_logit = float(np.abs(theirs).max())
    result = {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_logit": max_abs_logit,
        "max_rel_diff": float(diff.max()) / max_abs_logit
        if max_abs_logit > 0
        else float(diff.max()),
        "top1_agreement": float(np.mean(ours.argmax(axis=1) == theirs.argmax(axis=1))),
        "samples": len(ours),
        "tolerance": tolerance,
        "relative": relative,
        "min_agreement": min_agreement,
    } | decisive_agreement(ours, theirs, diff, noise)
    _raise_if_out_of_bounds(result, Path(path))
    return result


def decisive_agreement(
    ours: np.ndarray,
    theirs: np.ndarray,
    diff: np.ndarray,
    noise: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """Top-1 agreement on the images whose class the measured difference cannot flip.

    A file whose logits differ from the reference's by at most d on an image can change its
    top-1 class only if the reference's two best logits are within 2d. The typical d is the
    median (:data:`NEAR_TIE_QUANTILE`) of the per-image largest |diff|: an image whose margin is
    within twice that is a near tie, where a correct file flips as often as a weak network's
    logits tie (a short quickstart's student: 94.9% agreement at 10% of the largest logit,
    within the 20% tolerance). A flip on any other image needs a difference larger than the file
    makes on half the images: an error on some inputs (a saturated kernel, a wrong scale that
    some images reach), and it counts. A near tie is also never wider than
    :data:`NEAR_TIE_CAP` of the largest |logit|, so a file wrong on every image (its median
    difference as large as the logits) does not turn every image into a tie.

    With ``noise`` (:func:`reference_noise`: per image, how far the reference moves by itself
    at float32's precision, and whether its top-1 changes) an image is also not decisive where
    the reference's own change could flip it, or did. That is measured on the reference alone,
    so a wrong file cannot widen it; where the median image of a chaotic INT8 network has no
    difference at all, it is what stops the chaos of the others from counting as errors.

    Returns:
        ``{"decisive_agreement"`` (1.0 when no image is decisive), ``"decisive_samples"``,
        ``"near_tie_margin"`` (the margin below which an image is a near tie),
        ``"near_tie_flips"``, ``"flips"`` (all images whose top-1 differs)}; with ``noise``
        also ``"unstable_samples"`` (images whose top-1 the reference's own change moved),
        ``"unreproduced_samples"`` (images that are not near ties but left out for the
        reference's own change), ``"reference_noise_p50"`` and ``"reference_noise_max"``.
    """
    per_image = diff.max(axis=1)  # diff: |ours - theirs|, as compare_logits has it
    typical = float(np.quantile(per_image, NEAR_TIE_QUANTILE)) if len(per_image) else 0.0
    near_tie = min(2 * typical, NEAR_TIE_CAP * float(np.abs(theirs).max(initial=0.0)))
    best_two = np.sort(theirs, axis=1)[:, -2:]
    margin = (
        best_two[:, -1] - best_two[:, 0] if theirs.shape[1] > 1 else np.full(len(theirs), np.inf)
    )
    flips = ours.argmax(axis=1) != theirs.argmax(axis=1)
    decisive = margin > near_tie
    extra = {}
    if noise is not None:
        moved, unstable = noise
        reproduced = (margin > 2 * moved) & ~unstable
        extra = {
            "unstable_samples": int(unstable.sum()),
            "unreproduced_samples": int((decisive & ~reproduced).sum()),
            "reference_noise_p50": float(np.median(moved)) if len(moved) else 0.0,
            "reference_noise_max": float(moved.max()) if len(moved) else 0.0,
        }
        decisive &= reproduced
    count = int(decisive.sum())
    return {
        "decisive_agreement": 1.0 - float((flips & decisive).sum()) / count if count else 1.0,
        "decisive_samples": count,
        "near_tie_margin": near_tie,
        "near_tie_flips": int((flips & ~decisive).sum()),
        "flips": int(flips.sum()),
    } | extra


def allowed_abs_diff(result: dict) -> float:
    """The absolute bound an FP32 check applies: ``tolerance`` for logits up to 1 in magnitude,
    ``tolerance`` times the largest |logit| beyond (float rounding grows with the values: an
    undertrained network with logits of 10^4 differs by 10^-2 between two correct runtimes)."""
    return result["tolerance"] * max(1.0, result["max_abs_logit"])


def _raise_if_out_of_bounds(result: dict, path: Path) -> None:
    """Fails a file out of bounds. Where the PyTorch model does not reproduce itself (most images
    left out by the noise floor, or a difference it makes by itself), the file is judged against
    that instead: within it (:func:`within_reference_noise`) it passes with ``"proof":
    "reference noise"`` in the record; beyond it, it cannot be proven either way."""
    bad_diff = (
        result["max_rel_diff"] > result["tolerance"]
        if result["relative"]
        else result["max_abs_diff"] > allowed_abs_diff(result)
    )
    bad_agreement = result["decisive_agreement"] < result["min_agreement"]
    unreproduced = result.get("unreproduced_samples", 0)
    # a difference the PyTorch model makes by itself at float32's precision: not the file's
    own_diff = bad_diff and result["max_abs_diff"] <= 2 * result.get("reference_noise_max", 0.0)
    if unreproduced > (1 - MIN_REPRODUCED_SHARE) * result["samples"] or own_diff:
        if within_reference_noise(result, bad_agreement=bad_agreement):
            result["proof"] = "reference noise"
            return
        error = UnprovableNetworkError(
            f"{path.name} cannot be proven: the PyTorch model does not reproduce itself "
            f"(inputs and layers changed by {NOISE_FLOOR_EPSILON:g} of their value move its logits "
            f"by up to {result['reference_noise_max']:.3g}, the file's largest difference "
            f"{result['max_abs_diff']:.3g}; its top-1 changes on {result['unstable_samples']} of "
            f"{result['samples']} images, the file's on {result['flips']}): train the network "
            "further before quantizing it"
        )
        error.result = result
        raise error
    if bad_diff or bad_agreement:
        error = ExportError(
            f"{path.name} does not reproduce the PyTorch model on {result['samples']} images: max "
            f"|diff| {_diff_text(result)}, top-1 agreement {_agreement_text(result)}"
        )
        error.result = result
        raise error


def within_reference_noise(result: dict, *, bad_agreement: bool) -> bool:
    """Whether a file is as close to a PyTorch model as that model is to itself: its largest
    difference no larger than the model's own largest movement at float32's precision, no more
    top-1 changes than the model makes by itself, and the images it does reproduce still agreeing.

    Why not refuse: a chaotic INT8 network (timm LCNet-050 after pruning, 40% top-1: its logits
    move by 5.47 and its top-1 on 127 of 297 images when its inputs change by 1e-6) can have no
    better proof, and a file 0.81 away from it is as right as the model can say. A wrong scale
    moves the logits of every image the same way, past what the model moves by itself, or flips
    images the model keeps (tests/test_export_proof.py)."""
    return (
        not bad_agreement
        and result["flips"] <= result["unstable_samples"]
        and result["max_abs_diff"] <= result["reference_noise_max"]
    )


def _agreement_text(result: dict) -> str:
    """The agreement the bound judges, with all images' when near ties flipped."""
    text = (
        f"{result['decisive_agreement']:.2%} on the {result['decisive_samples']} images that are "
        f"not near ties (minimum {result['min_agreement']:.2%})"
    )
    if result.get("unstable_samples"):
        text += (
            f"; not counted: {result['unstable_samples']} images whose top-1 the PyTorch model "
            f"itself changes when its inputs move by {NOISE_FLOOR_EPSILON:g}"
        )
    if result["near_tie_flips"]:
        text += (
            f"; {result['top1_agreement']:.2%} on all {result['samples']}, "
            f"{result['near_tie_flips']} near ties flipped (margin <= "
            f"{result['near_tie_margin']:.3g})"
        )
    return text


def _diff_text(result: dict) -> str:
    if result["relative"]:
        return (
            f"{result['max_abs_diff']:.3g} = {result['max_rel_diff']:.2%} of the largest logit "
            f"{result['max_abs_logit']:.3g} (tolerance {result['tolerance']:.2%})"
        )
    if result["max_abs_logit"] > 1:
        return (
            f"{result['max_abs_diff']:.3g} (tolerance {result['tolerance']:g} x the largest logit "
            f"{result['max_abs_logit']:.3g} = {allowed_abs_diff(result):.3g})"
        )
    return f"{result['max_abs_diff']:.3g} (tolerance {result['tolerance']:g})"


MAX_CHECK_INPUT_BYTES = 1 << 30  # random inputs a converted file is checked on (64 x 3x1024x1024)


def _bytes(sample_shape: list[int]) -> int:
    return 4 * math.prod(sample_shape)


def compare_onnx_files(
    candidate: Path, reference: Path, samples: int, *, tolerance: float, min_agreement: float
) -> dict:
    """Check a converted file against the file it came from on random normal inputs (no
    PyTorch model or dataset at hand), relative to the largest |logit|, with top-1 agreement."""
    sessions = [open_session(p) for p in (candidate, reference)]
    for path, session in zip((candidate, reference), sessions, strict=True):
        count = len(session.get_inputs())
        if count != 1:
            raise ExportError(
                f"{path.name}: has {count} inputs; compress converts and checks single-input image "
                "classifiers"
            )
    shape = [d if isinstance(d, int) else None for d in sessions[1].get_inputs()[0].shape]
    if len(shape) != 4 or None in shape[1:]:
        raise ExportError(
            f"{reference.name}: its input has shape {shape}; compress checks image classifiers "
            "(N, C, H, W) with fixed C, H, W"
        )
    batch = shape[0] or max(1, min(samples, 64, MAX_CHECK_INPUT_BYTES // _bytes(shape[1:])))
    if batch * _bytes(shape[1:]) > MAX_CHECK_INPUT_BYTES:
        raise ExportError(
            f"{reference.name}: its input {[batch, *shape[1:]]} is "
            f"{batch * _bytes(shape[1:]) / 2**30:.3g} GiB of float32; compress checks inputs up to "
            f"{MAX_CHECK_INPUT_BYTES / 2**30:g} GiB (an image classifier's input, not this shape)"
        )
    inputs = np.random.default_rng(0).standard_normal((batch, *shape[1:]), dtype=np.float32)
    outputs = []
    for path, session in zip((candidate, reference), sessions, strict=True):
        feed = (
            inputs.astype(np.float16)
            if session.get_inputs()[0].type == "tensor(float16)"
            else inputs
        )
        try:
            outputs.append(session.run(None, {session.get_inputs()[0].name: feed})[0])
        # onnxruntime's own error types: the file does not run on these inputs
        except Exception as exc:
            raise ExportError(
                f"{path.name}: ONNX Runtime cannot run it on random (N, C, H, W) inputs: "
                f"{first_line(exc)}"
            ) from None
    result = compare_logits(
        outputs[0],
        outputs[1],
        candidate,
        tolerance=tolerance,
        min_agreement=min_agreement,
        relative=True,
    )
    return result | {"inputs": "random normal", "reference": reference.name}
