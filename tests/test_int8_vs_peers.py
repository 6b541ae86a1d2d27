"""The verdict of benchmarks/int8_vs_peers.py (issue 27's goal), on made-up measurements."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from int8_vs_peers import TOLERANCE_POINTS, goal  # noqa: E402


def tools(ours_top1=98.0, peer_top1=98.0, portable=True) -> dict:
    return {
        "ours": {"top1": ours_top1, "portable": portable},
        "ort_ptq": {"top1": peer_top1, "portable": False},
        "nncf_ptq": {"top1": peer_top1 - 1, "portable": False},
    }


EVEN = {"b1": {"ort_ptq": 1.0, "nncf_ptq": 0.5}, "b64": {"ort_ptq": 1.0, "nncf_ptq": 0.2}}


def test_met_when_as_accurate_as_fast_and_portable():
    verdict = goal(tools(), EVEN)
    assert verdict["met"] and verdict["top1_vs_best_peer"] == 0
    assert verdict["latency_vs_fastest_peer"] == {"b1": 1.0, "b64": 1.0}  # the fastest peer


@pytest.mark.parametrize(
    ("case", "ours", "ratios", "failing"),
    [
        (
            "a point below the best peer",
            tools(ours_top1=98.0 - 2 * TOLERANCE_POINTS),
            EVEN,
            "accurate",
        ),
        ("within the tolerance", tools(ours_top1=98.0 - TOLERANCE_POINTS / 2), EVEN, None),
        ("not portable", tools(portable=False), EVEN, "portable"),
        ("slower than a peer at batch 64", tools(), {**EVEN, "b64": {"ort_ptq": 1.2}}, "fast"),
        ("slower within the noise bar", tools(), {**EVEN, "b1": {"ort_ptq": 1.05}}, None),
    ],
)
def test_each_condition_can_fail_the_goal(case, ours, ratios, failing):
    verdict = goal(ours, ratios)
    assert verdict["met"] is (failing is None), case
    if failing:
        assert verdict[failing] is False
