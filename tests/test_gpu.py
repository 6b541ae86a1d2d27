"""The CUDA paths, run where a GPU exists (marked ``gpu``; skipped elsewhere): the CUDA bench
backends, training with bf16 autocast and channels_last, the delayed NaN check, resuming the
CUDA random state, and a tiny recipe end to end on the GPU. ``benchmarks/gpu_checks.sh`` runs
them together with the GPU benchmarks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_backends import FAST, check_batches, stage  # noqa: F401 (stage is a fixture)
from torch import nn

from compress.benchmark.backend_table import BACKENDS
from compress.data.augment import Preprocess
from compress.errors import StageError
from compress.training.loop import fit
from compress.training.spec import TrainConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("backend", ["torch-cuda", "torch-compile-cuda"])
def test_torch_cuda_backends_time_with_events_and_report_gpu_memory(stage, backend):  # noqa: F811
    result = BACKENDS.get(backend).measure(stage, batch_sizes=[1, 32], **FAST)
    assert result["status"] == "ok", result["error"]
    check_batches(result, [1, 32], FAST["iterations"])
    assert result["device"] == "cuda" and result["gpu_peak_mb"] > 0


def test_onnxruntime_cuda_runs_on_the_gpu_or_says_what_is_missing(tmp_path):
    import onnxruntime as ort
    from test_backends import network

    from compress.exporters.onnx.export import export_onnx

    path = export_onnx(network(), tmp_path / "m.onnx", image_size=8)
    result = BACKENDS.get("onnxruntime-cuda").measure(path, batch_sizes=[1, 32], **FAST)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert result["status"] == "error" and "onnxruntime-gpu" in result["error"]
        pytest.skip("this onnxruntime build has no CUDA provider")
    assert result["status"] == "ok", result["error"]
    assert result["providers"][0] == "CUDAExecutionProvider" and result["device"] == "cuda"


def tiny_problem():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (256,), generator=generator)
    # class 1 is 64 grey levels brighter on average: learnable in a few epochs (a label from
    # the mean of uniform noise is not: those means differ by a few levels)
    noise = torch.randint(0, 192, (256, 3, 16, 16), generator=generator)
    images = (noise + 64 * labels[:, None, None, None]).to(torch.uint8)
    data = torch.utils.data.TensorDataset(images, labels)
    train = torch.utils.data.DataLoader(
        data,
        batch_size=32,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        pin_memory=True,
    )
    return train, torch.utils.data.DataLoader(data, batch_size=64)


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 2),
    ).to(CUDA)


def train(model, step_loss=None, epochs=3, checkpoint=None, cfg=None):
    train_loader, test_loader = tiny_problem()
    prep = Preprocess((0.5,) * 3, (0.25,) * 3, augment=True).to(CUDA)

    def loss(images, labels, epoch):
        logits = model(images)
        return F.cross_entropy(logits, labels), logits

    cfg = cfg or TrainConfig(epochs=epochs, optimizer="adamw", lr=0.01, weight_decay=0.0)
    return fit(
        model,
        train_loader,
        test_loader,
        step_loss or loss,
        cfg,
        preprocess=prep,
        device=CUDA,
        desc="gpu",
        show_progress=False,
        checkpoint=checkpoint,
        checkpoint_key="k",
    )


def test_training_on_cuda_learns_with_bf16_autocast_and_channels_last():
    history = train(conv_net())
    assert history[-1].test_top1 > 80 and history[-1].train_loss < history[0].train_loss


def test_nan_on_the_gpu_names_its_first_step_though_checked_every_ten():
    model = conv_net()

    seen = {"n": 0}

    def nan_from_step_3(images, labels, epoch):
        seen["n"] += 1
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        return (loss * float("nan") if seen["n"] >= 4 else loss), logits

    with pytest.raises(StageError, match="loss became nan at epoch 1, step 3"):
        train(model, nan_from_step_3, epochs=1)


def test_resume_on_cuda_matches_an_uninterrupted_run(tmp_path):
    reference = train(conv_net(), epochs=3)
    model = conv_net()

    def crash_in_epoch_3(images, labels, epoch):
        if epoch == 3:
            raise KeyboardInterrupt
        logits = model(images)
        return F.cross_entropy(logits, labels), logits

    with pytest.raises(KeyboardInterrupt):
        train(model, crash_in_epoch_3, epochs=3, checkpoint=tmp_path / "c.ckpt")
    resumed = train(conv_net(), epochs=3, checkpoint=tmp_path / "c.ckpt")
    assert [h.train_loss for h in resumed[:2]] == pytest.approx(
        [h.train_loss for h in reference[:2]], rel=1e-3
    )
    assert resumed[2].train_loss == pytest.approx(
        reference[2].train_loss, rel=1e-2
    )  # cuDNN may be nondeterministic


def test_int8_on_cuda_matches_its_cpu_copy_then_qat_learns_and_exports(tmp_path):
    """The quantize stage's path on a GPU: every quantizer on the model's device, the same
    fake-quantized logits as on the CPU (up to TF32 convolutions moving a value across a
    rounding boundary), QAT in the stage's precision, and a QDQ file ONNX Runtime reproduces."""
    from compress import api
    from compress.training.loop import train_config_for

    model = conv_net()
    train(model, epochs=2)
    generator = torch.Generator(device=CUDA).manual_seed(0)
    calibration = [torch.randn(32, 3, 16, 16, device=CUDA, generator=generator) for _ in range(4)]
    qmodel = api.quantize(model.eval(), calibration)
    assert {t.device.type for t in [*qmodel.parameters(), *qmodel.buffers()]} == {CUDA.type}
    with torch.no_grad():
        on_gpu = qmodel(calibration[0]).cpu()
        on_cpu = copy.deepcopy(qmodel).cpu()(calibration[0].cpu())
    assert (on_gpu - on_cpu).abs().max() <= 0.05 * on_cpu.abs().max()
    assert (on_gpu.argmax(1) == on_cpu.argmax(1)).float().mean() >= 0.9

    qat = TrainConfig(epochs=2, optimizer="adamw", lr=1e-3)  # precision auto: fit picks fp32
    assert train_config_for(qmodel, qat).precision == "fp32"
    history = train(qmodel.train(), cfg=qat)
    assert history[-1].test_top1 > 80
    record = api.export(qmodel, tmp_path / "int8.onnx", check_inputs=calibration[0].cpu())
    assert record["qdq"]["int8_weights"] == 2 and record["qdq"]["fp32_conv"] == 0
    assert record["top1_agreement"] >= 0.95


def test_multi_branch_blocks_fold_when_quantized_on_the_gpu():
    """The fold check runs the block on made-up inputs: on the block's device, or a network
    prepared on a GPU kept every branch (its check raised and was read as "does not fold")."""
    pytest.importorskip("timm")
    from test_reparameterized import multi_branch_net

    from compress.quantization.fake_quant import prepare_quantized

    net = multi_branch_net().to(CUDA)
    qmodel = prepare_quantized(
        net, target="onnxruntime-cpu", example_inputs=torch.randn(2, 3, 8, 8, device=CUDA)
    )
    assert sum(isinstance(m, nn.Conv2d) for m in qmodel.modules()) == 2  # 6 branches -> 2
