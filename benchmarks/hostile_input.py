"""Hostile input and faults: every case of the test modules that attack the README's promises,
with its outcome and time, and the hypothesis fuzzing budget per target.

    python benchmarks/hostile_input.py            # ~3 min on 2 CPU cores

Runs ``tests/test_faults.py`` and ``tests/test_hostile_input.py`` (slow tests included) through
pytest, prints a Markdown table and writes ``benchmarks/results/hostile_input.json``. A case
passes when its attack ended as the README promises: one line (or a clear gate verdict), no
traceback, no hang, no corrupted run folder, no unverified file at a deliverable path.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from compress.core.fileio import write_json_atomic
from compress.core.machine import machine_info

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
MODULES = ("test_faults", "test_hostile_input")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--result", default=str(HERE / "results" / "hostile_input.json"))
    args = parser.parse_args()
    report = HERE / "results" / "hostile_input.junit.xml"
    started = time.perf_counter()
    code = pytest.main(
        [
            *(str(TESTS / f"{m}.py") for m in MODULES),
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
        ]
    )
    cases = _cases(report)
    report.unlink(missing_ok=True)
    record = {
        "machine": machine_info(),
        "pytest_exit_code": int(code),
        "wall_s": round(time.perf_counter() - started, 1),
        "cases": cases,
        "outcomes": {
            o: sum(c["outcome"] == o for c in cases) for o in ("passed", "failed", "skipped")
        },
        "fuzzing": _fuzzing(),
    }
    print(_table(record))
    write_json_atomic(Path(args.result), record)


def _cases(junit: Path) -> list[dict]:
    cases = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = (
            "failed"
            if case.find("failure") is not None or case.find("error") is not None
            else "skipped"
            if case.find("skipped") is not None
            else "passed"
        )
        cases.append(
            {
                "module": case.get("classname", "").rsplit(".", 1)[-1],
                "case": case.get("name"),
                "outcome": outcome,
                "seconds": round(float(case.get("time", 0)), 2),
            }
        )
    return cases


def _fuzzing() -> list[dict]:
    """Each hypothesis target: how many examples it draws and each one's time budget."""
    sys.path.insert(0, str(TESTS))
    targets = []
    for name in MODULES:
        module = importlib.import_module(name)
        for attr in sorted(dir(module)):
            fn = getattr(module, attr)
            settings = getattr(getattr(fn, "hypothesis", None), "inner_test", None) and getattr(
                fn, "_hypothesis_internal_use_settings", None
            )
            if settings is not None:
                deadline = (
                    settings.deadline.total_seconds() * 1000
                    if settings.deadline is not None
                    else None
                )
                targets.append(
                    {
                        "module": name,
                        "target": attr,
                        "examples": settings.max_examples,
                        "deadline_ms": deadline,
                    }
                )
    return targets


def _table(record: dict) -> str:
    lines = ["| module | case | outcome | s |", "|---|---|---|---:|"]
    lines += [
        f"| {c['module']} | {c['case']} | {c['outcome']} | {c['seconds']:.2f} |"
        for c in record["cases"]
    ]
    lines += ["", "| fuzzing target | examples | deadline per example (ms) |", "|---|---:|---:|"]
    for t in record["fuzzing"]:
        deadline = t["deadline_ms"] or "none"
        lines.append(f"| {t['module']}.{t['target']} | {t['examples']} | {deadline} |")
    o = record["outcomes"]
    counts = f"{o['passed']} passed, {o['failed']} failed, {o['skipped']} skipped"
    lines += ["", f"{counts} in {record['wall_s']:.0f} s; {record['machine']['cpu']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
