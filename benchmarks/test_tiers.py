"""How long the test tiers take, serial and with pytest-xdist: the numbers the README quotes.

    python benchmarks/test_tiers.py                 # fast tier and whole suite, serial and -n 2
    python benchmarks/test_tiers.py --tiers fast    # the fast tier only

Each configuration runs ``pytest`` in a child process on this checkout and is timed by the wall
clock; the machine must be quiet (two cores: anything else running doubles the times). Prints
a table and writes ``benchmarks/results/test_tiers.json`` with the CPU model and flags; a row
measured again replaces its old one, and each row names the commit (and the number of changed
files) it ran on.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from compress.core.fileio import write_json_atomic
from compress.core.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "test_tiers.json"
TIERS = {"fast": ["-m", "not slow"], "whole": []}
SUMMARY = re.compile(r"(\d+) passed(?:, (\d+) failed)?(?:.*?(\d+) skipped)?")


def run(tier: str, workers: int) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TIERS[tier]]
    command += ["-n", str(workers if workers > 1 else 0)]  # -n 0: serial, in this process
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    match = SUMMARY.search(last)
    return {
        "tier": tier,
        "workers": workers,
        "commit": _commit(),
        "seconds": round(seconds, 1),
        "exit_code": done.returncode,
        "passed": int(match.group(1)) if match else None,
        "failed": int(match.group(2) or 0) if match else None,
        "summary": last,
    }


def _commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    changed = len([line for line in git("status", "--porcelain").splitlines() if line])
    return git("rev-parse", "--short", "HEAD").strip() + (f" +{changed} changed" if changed else "")


def _recorded() -> list[dict]:
    try:
        return json.loads(OUT.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiers", nargs="+", default=list(TIERS), choices=list(TIERS))
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    args = parser.parse_args()
    rows = []
    for tier in args.tiers:
        for workers in args.workers:
            rows.append(run(tier, workers))
            row = rows[-1]
            print(f"{tier:<6} workers {workers}: {row['seconds']:>7.1f} s  {row['summary']}")
    print("\n| tier | workers | wall time | result |\n|---|---:|---:|---|")
    for row in rows:
        minutes, seconds = divmod(row["seconds"], 60)
        print(
            f"| {row['tier']} | {row['workers']} | {int(minutes)} min {seconds:04.1f} s | "
            f"{row['summary']} |"
        )
    measured = {(row["tier"], row["workers"]) for row in rows}
    kept = [r for r in _recorded() if (r["tier"], r["workers"]) not in measured]
    write_json_atomic(OUT, {"machine": machine_info(), "rows": kept + rows})
    print(f"\nwrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
