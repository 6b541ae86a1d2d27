"""Shared fixtures: where the real data lies, and small recipes that run in seconds."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


MAX_WORKERS = 4  # each worker builds its own session fixtures; one test holds a >2 GiB network


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject's addopts): one worker per core this process may use, at most
    MAX_WORKERS, so a many-core desktop does not run out of memory."""
    return max(1, min(usable_cores(), MAX_WORKERS))


def pytest_configure(config):
    """Under pytest-xdist, split the cores between the workers: each worker (and every CLI
    process it starts, through OMP_NUM_THREADS) gets cores // workers torch threads. Two
    workers that each spin two OpenMP threads on two cores are slower than one worker alone."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = str(max(1, usable_cores() // workers))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
        torch.set_num_threads(int(threads))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    Torch-Pruning's and tracing's many small forwards slow down 30x when two threads fight a
    busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cifar10_folder() -> Path | None:
    """../shared/data/cifar10 next to the checkout (or $COMPRESS_CIFAR10), if present."""
    folder = Path(os.environ.get("COMPRESS_CIFAR10", ROOT.parent / "shared" / "data" / "cifar10"))
    return folder if (folder / "train.npz").is_file() else None


@pytest.fixture(scope="session")
def tiny_data_section() -> str:
    """A few hundred real images: CIFAR-10 when the shared copy exists, else bundled digits."""
    folder = cifar10_folder()
    if folder is None:
        return "data: {kind: digits, image_size: 16, batch_size: 64, augment: false}"
    return (
        f"data: {{kind: cifar10, path: '{folder}', image_size: 16, batch_size: 64, subset: "
        "{train: 1000, test: 300}}"
    )


# A cifar:resnet20 teacher on 600 digits at 8x8: seconds to train, > 60% top-1. The distill,
# prune and quantize tests all learn from it (one session-wide checkpoint).
# 600 training and 200 test digits at 8x8: the data of every recipe test that trains
DIGITS_DATA = {
    "kind": "digits",
    "image_size": 8,
    "batch_size": 32,
    "augment": False,
    "subset": {"train": 600, "test": 200},
}
DIGITS_BASE = {
    "name": "digits_teacher",
    "seed": 0,
    "data": DIGITS_DATA,
    "teacher": {
        "model": "cifar:resnet20",
        "train": {"epochs": 3, "optimizer": "adamw", "lr": 0.003, "weight_decay": 0.0},
    },
    "student": {"model": "cifar:resnet20"},
    "stages": ["teacher"],
}


def run_recipe(folder: Path, raw: dict) -> dict:
    """Write ``raw`` to ``folder/<name>.yaml`` and run it quietly into ``folder/out``."""
    import yaml

    from compress.pipeline.recipe.load import load_recipe
    from compress.pipeline.runner import run

    path = folder / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return run(load_recipe(path, out=str(folder / "out")), show_progress=False)


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> str:
    """Path of the trained DIGITS_BASE teacher's weights."""
    artifacts = run_recipe(tmp_path_factory.mktemp("digits_teacher"), DIGITS_BASE)
    assert artifacts["teacher"].metrics["top1"] > 60
    return str(artifacts["teacher"].files["model"])


@pytest.fixture
def trained_digits(digits_teacher) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``(model, images, labels)``: the trained digits ResNet-20 (eval mode) and all 1,797
    digits as it takes them (8x8, 3 channels, normalised), for the INT8 decisions that need
    real margins (calibration candidates, held-out ranking)."""
    from sklearn.datasets import load_digits

    from compress.nets.models import build_model
    from compress.nets.weights import load_weights

    digits = load_digits()
    pixels = torch.from_numpy(digits.images / 16.0).float()[:, None].expand(-1, 3, -1, -1)
    images, labels = ((pixels - 0.5) / 0.25).contiguous(), torch.from_numpy(digits.target)
    model = build_model("cifar:resnet20", num_classes=10, cifar_stem=True).eval()
    return load_weights(model, digits_teacher).eval(), images, labels


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm statistics and every bias non-trivial values, and logits of order 1.

    A freshly built torchvision model has BN = identity and zero biases, which exporters may
    drop or share; a trained model has neither, and that is what the tests should describe.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1, generator=g)
                module.running_var.uniform_(0.5, 1.5, generator=g)
                module.weight.uniform_(0.5, 1.5, generator=g)
                module.bias.normal_(0, 0.1, generator=g)
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                module.bias.normal_(0, 0.1, generator=g)
            if isinstance(module, nn.Linear):
                module.weight.mul_(10)
    return model.eval()


def rebuilt_as_stages_do(qmodel: nn.Module, model: nn.Module, build, size: int, folder: Path):
    """``qmodel`` (quantized from ``model``) saved, then rebuilt as a stage rebuilds an INT8
    network: ``build()``, a fresh float network with other values in every parameter (all must
    load), prepared for quantization on zeros of ``size`` px, then loaded."""
    from compress.nets.weights import load_weights, save_weights, structure_of
    from compress.quantization.fake_quant import prepare_quantized

    path = save_weights(qmodel, folder / "model.pt", structure=structure_of(model))

    def prepare(fresh):
        for parameter in fresh.parameters():
            nn.init.normal_(parameter)
        zeros = torch.zeros(2, 3, size, size)
        return prepare_quantized(fresh.eval(), target="onnxruntime-cpu", example_inputs=zeros)

    return load_weights(build(), path, prepare=prepare).eval()


def tiny_cnn() -> torch.nn.Module:
    """A small CNN (10 classes) for loop tests on tiny images."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    )


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """``python -m compress ARGS`` in a fresh process: exit code, stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "compress", *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


def assert_one_line_error(stderr: str, *needles: str) -> str:
    """The error is one line, the last one, and nothing else on stderr but progress lines."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), stderr[-3000:]
    assert all(re.fullmatch(r"\[\w+\] running", line) for line in lines[:-1]), stderr[-3000:]
    for needle in needles:
        assert needle in lines[-1]
    return lines[-1]


def optimized_nodes(path: Path, level: str) -> list:
    """The nodes of ONNX Runtime's graph of ``path`` after its optimizations at ``level``
    (``"ORT_ENABLE_EXTENDED"``, ``"ORT_ENABLE_ALL"``...): what it will run, fusions included."""
    import onnx
    import onnxruntime as ort

    optimized = path.with_name(f"{path.stem}.{level}.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3  # the NCHWc warning of ORT_ENABLE_ALL
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return list(onnx.load(optimized).graph.node)


def register_fake_backend(monkeypatch, name: str, entry: str, table_entry: str):
    """A fake runtime registered as a bench backend for one test: whole networks measured by
    ``entry``, one-layer cells by ``table_entry`` (``"test_module:function"``)."""
    from compress.benchmark.backend_table import BACKENDS, Backend

    backend = Backend(
        name=name,
        description="fake runtime (tests)",
        device="cpu",
        artifact="onnx",
        entry=entry,
        table_entry=table_entry,
    )
    monkeypatch.setitem(BACKENDS._entries, backend.name, backend)
    return backend


def bench_result_json(**student) -> dict:
    """A minimal valid bench.json (teacher and student rows, batch-1 latency); ``student``
    overrides fields of the student's row."""
    rows = [
        {
            "role": "teacher",
            "status": "ok",
            "top1": 90.0,
            "file_bytes": 1000,
            "params": 100,
            "macs": 1000,
            "latency": [{"batch_size": 1, "status": "ok", "latency_ms": {"p50": 2.0}}],
        },
        {
            "role": "student",
            "status": "ok",
            "top1": 85.0,
            "file_bytes": 100,
            "params": 10,
            "macs": 100,
            "latency": [{"batch_size": 1, "status": "ok", "latency_ms": {"p50": 0.5}}],
        },
    ]
    rows[1] |= student
    return {"rows": rows, "reference": "teacher"}
