"""Crash safety: epoch checkpoints, resuming an interrupted stage to the same result, a
diverging loss that keeps the last good checkpoint, a full disk, and kill -9 through the CLI."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import DIGITS_DATA
from torch import nn

from compress.data.augment import Preprocess
from compress.errors import StageError
from compress.training.checkpoint import load_training_state
from compress.training.loop import fit
from compress.training.spec import TrainConfig

CFG = TrainConfig(
    epochs=3, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4, schedule="cosine"
)


def loaders(seed: int = 0):
    generator = torch.Generator().manual_seed(123)
    images = torch.randint(0, 256, (96, 1, 8, 8), dtype=torch.uint8, generator=generator)
    labels = (images.float().mean(dim=(1, 2, 3)) > 127).long()
    data = torch.utils.data.TensorDataset(images, labels)
    train = torch.utils.data.DataLoader(
        data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    return train, torch.utils.data.DataLoader(data, batch_size=32)


def model_and_loss():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * 36, 2)
    )

    def loss(images, labels, epoch):
        logits = model(images)
        return F.cross_entropy(logits, labels), logits

    return model, loss


def train(checkpoint=None, key="k", wrap=None, epochs=3):
    """Train a fresh copy of the same network; ``wrap(loss)`` changes its step loss."""
    model, loss = model_and_loss()
    train_loader, test_loader = loaders()
    prep = Preprocess((0.5,), (0.25,), augment=False)
    history = fit(
        model,
        train_loader,
        test_loader,
        wrap(loss) if wrap else loss,
        TrainConfig(**{**CFG.__dict__, "epochs": epochs}),
        preprocess=prep,
        device=torch.device("cpu"),
        desc="unit",
        show_progress=False,
        checkpoint=checkpoint,
        checkpoint_key=key,
    )
    return model, history


def test_interrupted_training_resumes_to_the_same_weights_and_history(tmp_path):
    reference, reference_history = train()
    ckpt = tmp_path / "train-unit.ckpt"

    def crash_in_epoch_2(loss):
        def step(images, labels, epoch):
            if epoch == 2:
                raise KeyboardInterrupt
            return loss(images, labels, epoch)

        return step

    with pytest.raises(KeyboardInterrupt):
        train(ckpt, wrap=crash_in_epoch_2)
    assert load_training_state(ckpt, "k")["epoch"] == 1
    resumed, history = train(ckpt)  # a fresh process would rebuild exactly this
    assert [h.epoch for h in history] == [1, 2, 3]
    assert [h.train_loss for h in history] == pytest.approx(
        [h.train_loss for h in reference_history], rel=1e-6
    )
    for (name, ours), theirs in zip(
        resumed.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.allclose(ours, theirs, atol=1e-6), name


def test_a_checkpoint_of_other_inputs_is_not_resumed(tmp_path):
    ckpt = tmp_path / "train-unit.ckpt"
    train(ckpt, key="old recipe", epochs=1)
    assert load_training_state(ckpt, "new recipe") is None
    _, history = train(ckpt, key="new recipe", epochs=2)
    assert [h.epoch for h in history] == [1, 2] and load_training_state(ckpt, "new recipe")[
        "epoch"
    ] == 2


def test_corrupt_or_truncated_checkpoint_starts_over(tmp_path):
    ckpt = tmp_path / "train-unit.ckpt"
    train(ckpt, epochs=1)
    data = ckpt.read_bytes()
    for broken in (data[: len(data) // 2], b"", b"not a checkpoint"):
        ckpt.write_bytes(broken)
        assert load_training_state(ckpt, "k") is None
    _, history = train(ckpt, epochs=1)
    assert len(history) == 1


def test_nan_loss_names_step_and_terms_and_keeps_the_last_good_checkpoint(tmp_path):
    ckpt = tmp_path / "train-unit.ckpt"

    def diverge_in_epoch_2(loss):
        def step(images, labels, epoch):
            value, logits = loss(images, labels, epoch)
            if epoch == 2:
                value = value * float("nan")
            return value, logits, {"kd": value.detach(), "ce": torch.tensor(0.5)}

        return step

    with pytest.raises(
        StageError,
        match=(
            r"unit: loss became nan at epoch 2, step 0 \(terms: kd=nan, ce=0.5\).*checkpoint of "
            r"epoch 1 is kept"
        ),
    ):
        train(ckpt, wrap=diverge_in_epoch_2)
    assert load_training_state(ckpt, "k")["epoch"] == 1


def test_full_disk_is_a_clear_error_and_the_previous_checkpoint_survives(tmp_path, monkeypatch):
    ckpt = tmp_path / "train-unit.ckpt"
    train(ckpt, epochs=1)
    before = ckpt.read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(
        StageError,
        match=(
            "cannot write the training checkpoint .*the disk is full; the previous checkpoint is "
            "kept"
        ),
    ):
        train(ckpt, key="other", epochs=1)
    assert ckpt.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.name]  # no temporary file left


# --- kill -9 through the CLI ------------------------------------------------------------------

RECIPE = {
    "name": "resume",
    "seed": 0,
    "data": DIGITS_DATA,
    "teacher": {
        "model": "cifar:resnet20",
        "train": {"epochs": 1, "optimizer": "adamw", "lr": 0.003, "weight_decay": 0.0},
    },
    "student": {"model": "cifar:resnet20"},
    "stages": [
        "teacher",
        {"distill": {"train": {"epochs": 4, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9}}},
    ],
}


def compress_cli(*args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "compress", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


@pytest.mark.slow
def test_kill_9_mid_stage_then_run_again_resumes_and_matches(tmp_path):
    recipe = tmp_path / "resume.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    straight = compress_cli("run", recipe, "--out", tmp_path / "straight")
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-2000:]

    crashed = compress_cli("run", recipe, "--out", tmp_path / "crashed")
    ckpt = tmp_path / "crashed" / "resume" / "distill" / "train-distill.ckpt"
    deadline = time.monotonic() + 600
    while (
        not (ckpt.is_file() and load_training_state(ckpt, json_key(ckpt)) is not None)
        and crashed.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert crashed.poll() is None, "the run ended before its first distill checkpoint"
    os.kill(crashed.pid, signal.SIGKILL)
    crashed.wait()
    epoch = torch.load(ckpt, weights_only=True)["epoch"]
    assert 1 <= epoch < 4

    again = compress_cli("run", recipe, "--out", tmp_path / "crashed")
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-2000:]
    assert "[teacher] skipped (unchanged)" in err and f"resumed after epoch {epoch}/4" in err
    assert not ckpt.exists()  # spent once the stage completed
    metrics = [
        json.loads((tmp_path / run / "resume" / "distill" / "metrics.json").read_text())
        for run in ("straight", "crashed")
    ]
    assert metrics[1]["top1"] == pytest.approx(metrics[0]["top1"], abs=0.01)
    assert [h["train_loss"] for h in metrics[1]["history"]] == pytest.approx(
        [h["train_loss"] for h in metrics[0]["history"]], rel=1e-5
    )


def json_key(ckpt):
    """The key the checkpoint was written with (the test does not know the stage key)."""
    try:
        return torch.load(ckpt, weights_only=True)["key"]
    except Exception:
        return None


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_run_that_cannot_write_ends_with_one_line_and_keeps_finished_stages(
    tmp_path, monkeypatch, code
):
    """Root ignores folder permissions, so the failing write is planted: the stage's weights."""
    from click.testing import CliRunner

    import compress.nets.weights
    from compress.cli import cli

    recipe = tmp_path / "r.yaml"
    raw = dict(RECIPE, stages=["teacher", {"distill": {"train": {"epochs": 1}}}])
    raw["teacher"] = dict(RECIPE["teacher"], train=dict(RECIPE["teacher"]["train"], epochs=1))
    recipe.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    assert (
        CliRunner()
        .invoke(cli, ["run", str(recipe), "--out", str(out), "--set", "stages=[teacher]"])
        .exit_code
        == 0
    )
    teacher_record = (out / "resume" / "teacher" / "stage.json").read_bytes()

    real = compress.nets.weights.atomic_path

    def refuse(path, *args, **kwargs):  # the stage's weights; its epoch checkpoints still write
        if Path(path).name != "model.pt":
            return real(path, *args, **kwargs)
        raise OSError(code, os.strerror(code), str(out / "resume" / "distill" / "model.pt"))

    monkeypatch.setattr(compress.nets.weights, "atomic_path", refuse)
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert (
        lines[-1].startswith(f"error: cannot write {out / 'resume' / 'distill' / 'model.pt'}: ")
        and "Traceback" not in result.output
    )
    assert (out / "resume" / "teacher" / "stage.json").read_bytes() == teacher_record
    assert not (out / "resume" / "distill" / "stage.json").exists()


@pytest.mark.slow
def test_prune_interrupted_in_its_second_step_resumes_to_the_same_network(tmp_path, monkeypatch):
    """Each prune step fine-tunes in its own checkpointed run: on resume the pruning of step 1 is
    recomputed (deterministic), its finished fine-tuning restored, and step 2 continues."""
    from conftest import run_recipe

    import compress.training.loop as train_loop

    raw = dict(
        RECIPE,
        name="prune_resume",
        stages=[
            "teacher",
            {"distill": {"train": {"epochs": 1}}},
            {
                "prune": {
                    "speedup": 1.5,
                    "steps": 2,
                    "criterion": "magnitude",
                    "train": {"epochs": 2, "optimizer": "sgd", "lr": 0.01},
                }
            },
        ],
    )
    for name in ("straight", "crashed"):
        (tmp_path / name).mkdir()
    straight = run_recipe(tmp_path / "straight", raw)["prune"].metrics
    real_epoch, calls = train_loop._train_epoch, {"epochs": 0}

    def crash_in_step_2(*args, **kwargs):
        calls["epochs"] += 1  # teacher: 1, distill: 2, prune step 1: 3-4, step 2: 5-6
        if calls["epochs"] == 6:  # step 2, epoch 2: its epoch 1 is checkpointed
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_loop, "_train_epoch", crash_in_step_2)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(tmp_path / "crashed", raw)
    folder = tmp_path / "crashed" / "out" / "prune_resume" / "prune"
    assert sorted(p.name for p in folder.glob("train-*.ckpt")) == [
        "train-prune-step-1.ckpt",
        "train-prune-step-2.ckpt",
    ]
    counted = {"epochs": 0}

    def count(*args, **kwargs):
        counted["epochs"] += 1
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_loop, "_train_epoch", count)
    resumed = run_recipe(tmp_path / "crashed", raw)["prune"].metrics
    assert counted["epochs"] == 1  # only step 2's second epoch was trained again
    assert resumed["macs"] == straight["macs"] and resumed["steps"] == straight["steps"]
    assert resumed["top1"] == pytest.approx(straight["top1"]) and not list(
        folder.glob("train-*.ckpt")
    )
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx(
        [h["train_loss"] for h in straight["history"]], rel=1e-5
    )


@pytest.mark.slow
def test_qat_interrupted_resumes_to_the_same_quantized_network(tmp_path, monkeypatch):
    from conftest import run_recipe

    import compress.training.loop as train_loop

    raw = dict(
        RECIPE,
        name="qat_resume",
        stages=[
            "teacher",
            {"distill": {"train": {"epochs": 1}}},
            {
                "quantize": {
                    "mode": "qat",
                    "calibration_images": 64,
                    "train": {"epochs": 2, "optimizer": "sgd", "lr": 0.001},
                }
            },
        ],
    )
    for name in ("straight", "crashed"):
        (tmp_path / name).mkdir()
    straight = run_recipe(tmp_path / "straight", raw)["quantize"]
    real_epoch, calls = train_loop._train_epoch, {"epochs": 0}

    def crash_in_qat_epoch_2(*args, **kwargs):
        calls["epochs"] += 1  # teacher: 1, distill: 2, QAT: 3-4
        if calls["epochs"] == 4:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_loop, "_train_epoch", crash_in_qat_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(tmp_path / "crashed", raw)
    monkeypatch.setattr(train_loop, "_train_epoch", real_epoch)
    resumed = run_recipe(tmp_path / "crashed", raw)["quantize"]
    assert (
        resumed.metrics["top1"] == straight.metrics["top1"]
        and resumed.metrics["agreement_with_fp32"] == straight.metrics["agreement_with_fp32"]
    )
    ours, theirs = (torch.load(a.files["model"], weights_only=True) for a in (resumed, straight))
    assert ours.keys() == theirs.keys() and all(
        torch.allclose(ours[k].float(), theirs[k].float(), atol=1e-6) for k in ours
    )


def test_nan_checked_only_every_ten_steps_still_names_its_first_step(tmp_path, monkeypatch):
    """What a GPU does (it reads the flag every 10 steps), played on the CPU."""
    import compress.training.loop as train_loop

    monkeypatch.setattr(train_loop, "checks_every", lambda device: 10)
    steps = {"n": 0}

    def nan_from_step_3(loss):
        def step(images, labels, epoch):
            value, logits = loss(images, labels, epoch)
            steps["n"] += 1
            return (value * float("nan") if steps["n"] >= 4 else value), logits

        return step

    with pytest.raises(StageError, match=r"unit: loss became nan at epoch 1, step 3\b"):
        train(wrap=nan_from_step_3, epochs=1)
    assert steps["n"] == 6  # 96 images / 16: the epoch's last step read the flag, not step 3


def test_dry_run_says_which_stages_would_run_and_writes_nothing(tmp_path):
    from click.testing import CliRunner

    from compress.cli import cli

    recipe = tmp_path / "r.yaml"
    raw = dict(RECIPE, stages=["teacher", {"distill": {"train": {"epochs": 1}}}])
    raw["teacher"] = dict(RECIPE["teacher"], train=dict(RECIPE["teacher"]["train"], epochs=1))
    recipe.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    out = ["--out", str(tmp_path / "out")]
    fresh = runner.invoke(cli, ["run", str(recipe), *out, "--dry-run"])
    assert fresh.exit_code == 0 and "teacher: would run\ndistill: would run" in fresh.output
    assert not (tmp_path / "out" / "resume").exists()
    assert runner.invoke(cli, ["run", str(recipe), *out]).exit_code == 0
    run_dir = tmp_path / "out" / "resume"
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    same = runner.invoke(cli, ["run", str(recipe), *out, "--dry-run"])
    assert "teacher: reused (unchanged)\ndistill: reused (unchanged)" in same.output
    changed = runner.invoke(
        cli, ["run", str(recipe), *out, "--dry-run", "--set", "stages.distill.train.epochs=2"]
    )
    assert "teacher: reused (unchanged)\ndistill: would run" in changed.output
    forced = runner.invoke(cli, ["run", str(recipe), *out, "--dry-run", "--force"])
    assert "teacher: would run\ndistill: would run" in forced.output
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before
    (run_dir / "teacher" / "model.pt").rename(tmp_path / "lost.pt")  # the teacher would re-run,
    lost = runner.invoke(cli, ["run", str(recipe), *out, "--dry-run"])  # so would what follows
    assert "teacher: would run\ndistill: would run" in lost.output
