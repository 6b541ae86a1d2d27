"""The coverage sweep's claim: two sweeps over one list never run the same model at once, and a
claim left by a killed sweep does not block the model forever."""

import os
import subprocess
import sys
from pathlib import Path

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
