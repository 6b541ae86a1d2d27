"""The export proof judges the file, not the network's confidence: flips of near-tied logits
within the measured difference do not fail a file, flips the difference cannot explain do, and
a planted wrong scale in a real INT8 file still fails."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from compress.errors import ExportError, UnprovableNetworkError
from compress.exporters.onnx.export import export_onnx
from compress.exporters.onnx.verify import compare_logits, verify_onnx
from compress.exporters.qdq import store_int8_weights
from compress.nets.models import build_model
from compress.nets.weights import load_weights
from compress.quantization.fake_quant import calibrate, prepare_quantized

INT8 = {"tolerance": 0.2, "min_agreement": 0.95, "relative": True}


def weak_network_logits(images: int = 256, seed: int = 0) -> np.ndarray:
    """Logits of a weak network: most images have a clear winner, a fifth are near ties."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.0, (images, 10))
    winners = rng.integers(0, 10, images)
    logits[np.arange(images), winners] += 4.0
    ties = rng.choice(images, images // 5, replace=False)
    runner_up = (winners[ties] + 1) % 10
    logits[ties, runner_up] = logits[ties, winners[ties]] - rng.uniform(0.0, 0.05, len(ties))
    return logits


def test_near_ties_that_flip_within_the_measured_difference_do_not_fail_the_file():
    reference = weak_network_logits()
    rng = np.random.default_rng(1)
    file = reference + rng.normal(0.0, 0.1, reference.shape)  # 2.5% of the largest logit
    record = compare_logits(file, reference, "student.onnx", **INT8)
    assert record["top1_agreement"] < 0.95  # the raw agreement a weak network gets
    assert record["decisive_agreement"] == 1.0 and record["near_tie_flips"] > 12
    assert record["decisive_samples"] < record["samples"]


def test_flips_the_difference_cannot_explain_fail_the_file():
    reference = weak_network_logits()
    rng = np.random.default_rng(1)
    file = reference + rng.normal(0.0, 0.01, reference.shape)
    ordered = np.sort(reference, axis=1)
    margin = ordered[:, -1] - ordered[:, -2]
    wrong = np.flatnonzero((margin > 0.2) & (margin < 2.5))[:20]  # clear winners, not ties
    winner = reference[wrong].argmax(axis=1)
    second = np.argsort(reference[wrong], axis=1)[:, -2]
    step = 0.19 * np.abs(reference).max()  # within the 20% tolerance on every logit
    file[wrong, winner] -= step
    file[wrong, second] += step  # those images change class: an error on some inputs
    with pytest.raises(ExportError, match="not near ties") as error:
        compare_logits(file, reference, "student.onnx", **INT8)
    record = error.value.result
    assert record["max_rel_diff"] <= 0.2  # the difference alone would pass
    assert record["decisive_agreement"] < 0.95
    counted = (1 - record["decisive_agreement"]) * record["decisive_samples"]
    assert counted == pytest.approx(len(wrong))  # each planted flip, and no near tie


@pytest.fixture(scope="module")
def int8_file(digits_teacher, tmp_path_factory):
    """The digits teacher (cifar:resnet20 at 8x8) quantized and exported, with real digits."""
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("proof")
    pixels = torch.from_numpy(load_digits().images[:256] / 16.0).float()[:, None]
    images = ((pixels.expand(-1, 3, -1, -1) - 0.5) / 0.25).contiguous()
    model = load_weights(
        build_model("cifar:resnet20", num_classes=10, cifar_stem=True).eval(), digits_teacher
    ).eval()
    qmodel = prepare_quantized(model, target="onnxruntime-cpu", example_inputs=images[:2])
    calibrate(qmodel, [images[:128]], method="minmax")
    path = export_onnx(
        qmodel.eval(),
        folder / "int8.onnx",
        image_size=8,
        exporter="torchscript",
        transform=store_int8_weights,
    )
    return qmodel.eval(), path, images.numpy()


@pytest.mark.parametrize("noise_floor", [False, True])
def test_a_correct_int8_file_passes_and_a_planted_wrong_scale_fails(
    int8_file, tmp_path, noise_floor
):
    """With the noise floor on (as the export stage checks INT8 files) too: it excludes only
    images where the PyTorch model does not reproduce itself, which a wrong scale cannot
    change."""
    qmodel, path, images = int8_file
    record = verify_onnx(path, qmodel, images, **INT8, noise_floor=noise_floor)
    assert record["decisive_agreement"] >= 0.95
    model = onnx.load(path)
    producers = {out: node for node in model.graph.node for out in node.output}
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    scale_name = producers[conv.input[1]].input[1]  # the first convolution's weight scale
    scale = next(i for i in model.graph.initializer if i.name == scale_name)
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 1.5, scale_name))
    planted = tmp_path / "planted.onnx"
    onnx.save(model, planted)
    with pytest.raises(ExportError, match="does not reproduce"):
        verify_onnx(planted, qmodel, images, **INT8, noise_floor=noise_floor)


class ChaoticLogits(torch.nn.Module):
    """Two logits. Images whose first pixel is positive get a first logit that float32 rounding
    decides (the fractional part of a large multiple of their pixel sum) against a fixed 0.005:
    their top-1 is a coin toss for any second runtime. The others have a margin of 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = x.flatten(1).sum(1) * 1e5
        chaotic = (x[:, 0, 0, 0] > 0).to(x.dtype)
        first = chaotic * 0.01 * (total - torch.floor(total)) + (1 - chaotic)
        return torch.stack([first, torch.full_like(first, 0.005)], 1)


class Half(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((len(x),), 0.5)


class ChaoticInside(torch.nn.Module):
    """As ChaoticLogits, but what float32 decides is inside: a layer's output that lies on a
    rounding boundary (``floor(2 * 0.5)``: 1, or 0 a hair below), whatever the input. Changing
    the inputs never reaches it; a second runtime's rounding of that layer does (an INT8 network
    rounds every layer's output to its codes)."""

    def __init__(self):
        super().__init__()
        self.boundary = Half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chaotic = (x[:, 0, 0, 0] > 0).to(x.dtype)
        first = chaotic * torch.floor(2 * self.boundary(x)) + (1 - chaotic)
        return torch.stack([first, torch.full_like(first, 0.5)], 1)


@pytest.mark.parametrize("network", [ChaoticLogits, ChaoticInside])
def test_flips_where_the_model_does_not_reproduce_itself_are_the_models_not_the_files(network):
    from compress.exporters.onnx.verify import reference_noise

    torch.manual_seed(0)
    images = torch.randn(200, 3, 8, 8)
    model = network()
    with torch.no_grad():
        reference = model(images).double().numpy()
        moved, unstable = reference_noise(model, images.numpy(), reference)
    chaotic = images[:, 0, 0, 0].numpy() > 0
    assert unstable[chaotic].mean() > 0.3 and not unstable[~chaotic].any()
    assert (moved[~chaotic] == 0).all() and np.median(moved[chaotic]) > 1e-3
    # a second runtime whose rounding flips the images the model itself flips
    file = reference.copy()
    file[unstable] = file[unstable][:, ::-1]
    with pytest.raises(ExportError, match="does not reproduce"):  # the median image: no diff
        compare_logits(file, reference, "chaotic.onnx", **INT8)
    record = compare_logits(file, reference, "chaotic.onnx", **INT8, noise=(moved, unstable))
    assert record["decisive_agreement"] == 1.0
    assert record["decisive_samples"] >= int((~chaotic).sum())  # every stable image counts
    assert record["unstable_samples"] == int(unstable.sum())
    # and a file wrong on images the model reproduces still fails
    wrong = file.copy()
    wrong[~chaotic] = wrong[~chaotic][:, ::-1]
    with pytest.raises(ExportError, match="does not reproduce"):
        compare_logits(wrong, reference, "wrong.onnx", **INT8, noise=(moved, unstable))


def test_a_model_that_does_not_reproduce_itself_judges_a_file_by_its_own_noise():
    """Most images unstable (a chaotic, barely trained INT8 network): a file as close to the
    model as the model is to itself passes, marked as such; one that moves further or flips
    images the model keeps cannot be proven."""
    rng = np.random.default_rng(0)
    reference = rng.normal(0.0, 0.01, (100, 10))
    reference[:, 0] += 0.05  # class 0 wins everywhere, by a little
    moved, unstable = np.full(100, 0.1), np.arange(100) < 70  # 70 images flip by themselves
    file = reference + rng.uniform(-0.001, 0.001, reference.shape)
    file[:40, :2] = file[:40, 1::-1]  # flips only where the model flips by itself
    record = compare_logits(file, reference, "m.onnx", **INT8, noise=(moved, unstable))
    assert record["proof"] == "reference noise" and record["flips"] == 40
    far = reference + np.where(np.arange(10) == 3, 0.15, 0.0)  # class 3 raised past the noise
    with pytest.raises(
        UnprovableNetworkError, match="cannot be proven: the PyTorch model does not reproduce"
    ):
        compare_logits(far, reference, "m.onnx", **INT8, noise=(moved, unstable))
    stable_flipped = file.copy()
    stable_flipped[40:, :2] = stable_flipped[40:, 1::-1]  # also images the model keeps
    with pytest.raises(ExportError, match="the file's on 100"):
        compare_logits(stable_flipped, reference, "m.onnx", **INT8, noise=(moved, unstable))


def test_a_difference_the_model_makes_by_itself_cannot_fail_or_pass_the_file():
    """A barely trained INT8 network whose own logits move by 3 when its inputs change by 1e-6:
    a file 2.7 away (33% of its largest logit) is not proven wrong, nor right."""
    rng = np.random.default_rng(0)
    reference = rng.normal(0.0, 1.0, (100, 10))
    reference[:, 0] += 8.0  # clear winners, largest logit about 10
    file = reference + np.where(np.arange(10) == 1, 2.7, 0.0)  # class 1 raised everywhere
    moved, unstable = np.full(100, 1.5), np.zeros(100, dtype=bool)
    with pytest.raises(UnprovableNetworkError, match="cannot be proven"):
        compare_logits(file, reference, "weak.onnx", **INT8, noise=(moved, unstable))
    with pytest.raises(ExportError, match="does not reproduce") as steady:  # the file's fault
        compare_logits(file, reference, "weak.onnx", **INT8, noise=(moved / 10, unstable))
    assert not isinstance(steady.value, UnprovableNetworkError)


def test_the_report_says_when_a_file_is_proven_only_to_the_models_own_noise():
    from compress.pipeline.artifacts import Artifact
    from compress.pipeline.report import headline

    check = {"max_abs_diff": 0.8, "top1_agreement": 0.6, "reference_noise_max": 5.47}
    plain = Artifact("export", metrics={"student": check})
    weak = Artifact("export", metrics={"student": check | {"proof": "reference noise"}})
    assert "reproduces itself" not in headline(plain)
    assert "proven only as far as the model reproduces itself" in headline(weak)
    assert "5.5 alone" in headline(weak)
