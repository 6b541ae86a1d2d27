"""The coverage sweep's claim: two sweeps over one list never run the same model at once, and a
claim left by a killed sweep does not block the model forever."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import architecture_coverage  # noqa: E402


def test_a_claim_is_held_while_its_sweep_lives(tmp_path):
    claim = tmp_path / "torchvision__resnet18.running"
    assert architecture_coverage.claimed(claim)
    assert claim.read_text() == str(os.getpid())
    assert not architecture_coverage.claimed(claim)  # a second sweep skips it


def test_a_claim_of_a_finished_process_is_taken_over(tmp_path):
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    claim = tmp_path / "timm__resnet18.running"
    claim.write_text(gone.stdout.strip())
    assert architecture_coverage.claimed(claim)
    assert claim.read_text() == str(os.getpid())


def test_a_claim_still_being_written_is_respected(tmp_path):
    claim = tmp_path / "timm__resnet18.running"
    claim.write_text("")
    assert not architecture_coverage.claimed(claim)


def test_a_huge_model_waits_for_the_other_sweeps_one(tmp_path, monkeypatch):
    """Two networks of 12-13 GB at once do not fit a 24 GiB machine: the second waits."""
    claim = tmp_path / "huge.running"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        claim.write_text(str(holder.pid))
        waits = []

        def sleep(seconds):
            waits.append(seconds)
            holder.kill()
            holder.wait()  # the other sweep's huge model is done

        monkeypatch.setattr(architecture_coverage.time, "sleep", sleep)
        architecture_coverage.wait_for(claim, "torchvision:vit_h_14")
        assert waits == [60] and claim.read_text() == str(os.getpid())
    finally:
        holder.kill()
        holder.wait()


def test_rows_lost_with_exported_come_back_from_the_result(tmp_path, monkeypatch):
    """exported/ does not follow the sweep to a new machine; the result in git does."""
    import json

    rows, result = tmp_path / "rows", tmp_path / "architecture_coverage.json"
    (tmp_path / "rows_superseded").mkdir()
    rows.mkdir()
    kept = [
        {"source": "torchvision", "model": "resnet18", "seconds": 1.0},
        {"source": "timm", "model": "lcnet_050", "seconds": 2.0, "cpu": "Intel"},
        {"source": "torchvision", "model": "efficientnet_b7", "seconds": 3.0},
        {"source": "torchvision", "model": "alexnet", "seconds": 4.0},
    ]
    result.write_text(json.dumps({"machine": {"cpu": "AMD"}, "rows": kept}))
    (tmp_path / "rows_superseded" / "torchvision__efficientnet_b7.json").write_text("{}")
    (rows / "torchvision__alexnet.json").write_text(json.dumps({"model": "alexnet", "new": 1}))
    monkeypatch.setattr(architecture_coverage, "ROWS", rows)
    monkeypatch.setattr(architecture_coverage, "RESULT", result)
    architecture_coverage.restore_rows()
    written = {p.name: json.loads(p.read_text()) for p in rows.glob("*.json")}
    assert written == {
        "torchvision__resnet18.json": {"cpu": "AMD"} | kept[0],  # its machine: the result's
        "timm__lcnet_050.json": kept[1],  # a row's own machine stays
        "torchvision__alexnet.json": {"model": "alexnet", "new": 1},  # a newer row is not replaced
    }  # and a superseded row (to be run again) is not brought back


@pytest.mark.parametrize(
    ("scores", "restarted"),
    [
        ([10.0, 9.1, 10.0, 60.0], True),  # before, after round 1, after its undoing, round 2
        ([25.0, 27.0, 60.0], False),  # round 1 gained 2 points, above chance: kept
    ],
)
def test_a_round_ending_near_chance_restarts_from_the_first_weights(monkeypatch, scores, restarted):
    """SqueezeNet answered one class for every image after a round at 1e-3, and rounds at lower
    rates continuing from there stayed at chance: such a round is undone. A round that stalls
    above chance keeps its weights; both go on at 0.3x the rate."""
    import torch

    model = torch.nn.Linear(2, 2)
    first = model.weight.detach().clone()
    rounds = []

    def fit(compress, net, data, steps, losses, lr):
        rounds.append((lr, net.weight.detach().clone()))
        with torch.no_grad():
            net.weight.add_(1.0)  # what a round changes

    scripted = iter(scores)
    monkeypatch.setattr(architecture_coverage, "fit", fit)
    monkeypatch.setattr(architecture_coverage, "top1", lambda net, test: next(scripted))
    accuracy, trained = architecture_coverage.train_well(None, model, [], [], 20, [], lr=1e-3)
    assert (accuracy, trained) == (60.0, 2)
    assert rounds[1][0] == pytest.approx(3e-4)
    assert torch.equal(rounds[1][1], first if restarted else first + 1)


def test_a_network_too_little_trained_for_its_proof_is_a_refusal_and_a_bad_file_a_crash():
    from compress.errors import ExportError, StageError, UnprovableNetworkError

    assert architecture_coverage.verdict(UnprovableNetworkError("train it further")) == "refused"
    assert architecture_coverage.verdict(StageError("prune.ignore it")) == "refused"
    assert architecture_coverage.verdict(ExportError("does not reproduce")) == "crash"
    assert architecture_coverage.verdict(RuntimeError("inside a library")) == "crash"


def test_a_network_gets_the_first_size_its_forward_accepts_the_heaviest_from_32_px():
    from torch import nn

    tried = []

    def build(name, num_classes, image_size):
        tried.append(image_size)
        if image_size < 56:  # too small for its pooling
            raise RuntimeError("output size is too small")
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1))

    size, _ = architecture_coverage.fitting_size("x", build, architecture_coverage.HEAVY_SIZES)
    assert size == 64 and tried == [32, 64]
    assert architecture_coverage.HEAVY_TRAIN_GMACS > architecture_coverage.TRAIN_GMACS


def test_a_model_is_limited_by_its_cpu_time_not_the_wall_clock(monkeypatch):
    """A child that computes past its CPU seconds is ended by the kernel; one that waits (starved
    or stopped, its CPU time standing still) outlives its CPU limit on the wall clock."""
    monkeypatch.setattr(architecture_coverage, "WALL_CLOCK_FACTOR", 30)  # a busy CI machine
    env = dict(os.environ)
    spin = [sys.executable, "-c", "while True: pass"]
    assert architecture_coverage.run_limited(spin, env, 1) == "ran past its 1 CPU-seconds"
    sleep = [sys.executable, "-c", "import time; time.sleep(2); print('ROW done')"]
    done = architecture_coverage.run_limited(sleep, env, 1)
    assert done.returncode == 0 and done.stdout == "ROW done\n"
