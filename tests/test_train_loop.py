"""The shared training loop: it learns, it is reproducible, it stops on a diverged loss."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_cnn

from compress.data.augment import Preprocess
from compress.data.load import load_dataset
from compress.data.loaders import make_loaders
from compress.data.spec import DataConfig, SubsetConfig
from compress.errors import StageError
from compress.training.loop import build_optimizer, build_scheduler, evaluate, fit
from compress.training.spec import TrainConfig

DATA = DataConfig(
    kind="digits",
    image_size=8,
    batch_size=64,
    augment=False,
    subset=SubsetConfig(train=600, test=200),
)


def train_once(seed: int, epochs: int = 3, lr: float = 0.01, **settings):
    torch.manual_seed(seed)
    bundle = load_dataset(DATA, seed=seed)
    train, test = make_loaders(bundle, DATA, seed=seed)
    prep = Preprocess(bundle.mean, bundle.std, augment=False)
    model = tiny_cnn()

    def step_loss(images, labels, epoch):
        logits = model(images)
        return F.cross_entropy(logits, labels), logits

    start = evaluate(model, test, prep, torch.device("cpu"))
    cfg = TrainConfig(epochs=epochs, optimizer="adamw", lr=lr, weight_decay=0.0, **settings)
    history = fit(
        model,
        train,
        test,
        step_loss,
        cfg,
        preprocess=prep,
        device=torch.device("cpu"),
        desc="t",
        show_progress=False,
    )
    return model, start, history


def test_fit_learns_real_data():
    _, start, history = train_once(0)
    assert len(history) == 3
    assert history[-1].test_top1 > start["top1"] + 30
    assert history[-1].train_loss < history[0].train_loss


def test_bf16_autocast_and_channels_last_path_learns():
    # The CUDA defaults (bf16 autocast, channels_last) exercised on the CPU: same code path.
    model, start, history = train_once(0, precision="bf16", channels_last=True)
    assert history[-1].test_top1 > start["top1"] + 30
    assert next(model.parameters()).dtype == torch.float32  # autocast never changes the weights


def test_same_seed_gives_identical_weights_and_other_seed_does_not():
    a, _, _ = train_once(1, epochs=1)
    b, _, _ = train_once(1, epochs=1)
    c, _, _ = train_once(2, epochs=1)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert any(
        not torch.equal(pa, pc)
        for pa, pc in zip(a.state_dict().values(), c.state_dict().values(), strict=True)
    )


def test_diverged_loss_stops_with_a_clear_error():
    with pytest.raises(StageError, match="loss became nan at epoch 1, step 0"):
        bundle = load_dataset(DATA)
        train, test = make_loaders(bundle, DATA, seed=0)
        model = tiny_cnn()
        fit(
            model,
            train,
            test,
            lambda x, y, epoch: (model(x).sum() * float("nan"), model(x)),
            TrainConfig(epochs=1),
            preprocess=Preprocess(bundle.mean, bundle.std, augment=False),
            device=torch.device("cpu"),
            desc="t",
            show_progress=False,
        )


def lr_trace(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    """The learning rate at every step of a whole run."""
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=steps_per_epoch)
    lrs = []
    for _ in range(cfg.epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_onecycle_rises_then_falls():
    cfg = TrainConfig(epochs=4, lr=0.1, schedule="onecycle", warmup_epochs=1)
    lrs = lr_trace(cfg, steps_per_epoch=10)
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(0.1) and 8 <= peak <= 11
    assert lrs[0] < 0.01 and lrs[-1] < 1e-3


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_schedules_with_warmup(schedule):
    cfg = TrainConfig(epochs=4, lr=0.1, schedule=schedule, warmup_epochs=1)
    lrs = lr_trace(cfg, steps_per_epoch=10)
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(
        0.1
    )  # linear warm-up over 10 steps
    assert lrs[:10] == sorted(lrs[:10])
    if schedule == "cosine":
        assert (
            lrs[10] == pytest.approx(0.1)
            and lrs[-1] < 0.002
            and lrs[10:] == sorted(lrs[10:], reverse=True)
        )
    elif schedule == "step":
        assert (
            lrs[10] == pytest.approx(0.1)
            and lrs[26] == pytest.approx(0.01)
            and lrs[-1] == pytest.approx(0.001)
        )
    else:
        assert lrs[10:] == pytest.approx([0.1] * 30)


def test_compiled_training_step_runs_on_cpu_and_trains_like_eager():
    # train.compile is meant for CUDA; on the CPU (inductor, a C++ compiler) it must at least run
    # and train the same network as eager mode, up to float rounding of fused kernels.
    eager_model, _, eager = train_once(0, epochs=1)
    compiled_model, _, compiled = train_once(0, epochs=1, compile=True)
    assert compiled[0].train_loss == pytest.approx(eager[0].train_loss, rel=1e-3)
    assert compiled[0].test_top1 == pytest.approx(eager[0].test_top1, abs=1.0)
    assert type(compiled_model) is type(eager_model)  # the network itself is not replaced
    assert compiled_model.state_dict().keys() == eager_model.state_dict().keys()
