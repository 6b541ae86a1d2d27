"""Where do the two per-process latency modes come from? Fresh processes, one variant each.

    python benchmarks/latency_modes.py                       # the quickstart INT8 student
    python benchmarks/latency_modes.py MODEL.onnx --processes 30 --threads 2

Each variant runs a plain ``InferenceSession.run`` loop at batch 1 in ``--processes`` fresh
processes, interleaved (round r runs every variant once), and prints each variant's sorted
process medians and how many processes sit in a slow mode (median more than 20% over the
fastest variant's median process). A variant that empties the slow mode names the cause:

* ``plain``: what ``compress bench``'s worker does;
* ``aligned``: the input copied to a 4096-byte aligned buffer (numpy aligns small arrays to 16);
* ``no-arena``: ONNX Runtime's CPU memory arena off (intermediate tensors from malloc);
* ``daz``: denormals read as zero (``session.set_denormal_as_zero``);
* ``no-spin``: ``session.intra_op.allow_spinning = 0`` (matters with ``--threads`` > 1 only: one
  thread runs on the caller, with no pool to spin);
* ``pinned``: the process pinned to one core, round r on core r mod cores;
* ``not-core0``: the process kept off core 0 (which takes most device interrupts in many VMs);
* ``no-aslr``: the process started under ``setarch -R`` (the same addresses every time).

Each process also records the core it ran on and the input's address modulo 64. Writes
``benchmarks/results/latency_modes.json`` with the CPU model and flags. Hints, not results,
unless the machine is quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STUDENT = HERE.parent / "exported" / "quickstart" / "student.onnx"
VARIANTS = ("plain", "aligned", "no-arena", "daz", "no-spin", "pinned", "not-core0", "no-aslr")
SLOW = 1.2  # a process whose median is this much over the fastest typical one is in a slow mode


def child(path: str, variant: str, threads: int, runs: int, core: int) -> dict:
    """One process: the loop, its median and what might explain it."""
    import numpy as np
    import onnxruntime as ort

    if variant == "pinned":
        os.sched_setaffinity(0, {core})
    if variant == "not-core0" and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, os.sched_getaffinity(0) - {0})
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if variant == "no-arena":
        options.enable_cpu_mem_arena = False
    if variant == "daz":
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
    if variant == "no-spin":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in feed.shape]
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    if variant == "aligned":
        buffer = np.empty(x.nbytes + 4096, np.uint8)
        start = -buffer.ctypes.data % 4096
        aligned = buffer[start : start + x.nbytes].view(np.float32).reshape(x.shape)
        aligned[...] = x
        x = aligned
    for _ in range(50):
        session.run(None, {feed.name: x})
    times = []
    for _ in range(runs):
        begin = time.perf_counter()
        session.run(None, {feed.name: x})
        times.append(time.perf_counter() - begin)
    ms = np.asarray(times) * 1000
    half = len(ms) // 2
    with open("/proc/self/stat", encoding="ascii") as f:
        core_now = int(f.read().rsplit(")", 1)[1].split()[36])  # field 39: last CPU
    return {
        "p50_ms": float(np.median(ms)),
        "min_ms": float(ms.min()),
        "first_half_p50_ms": float(np.median(ms[:half])),
        "second_half_p50_ms": float(np.median(ms[half:])),
        "core": core_now,
        "input_address_mod_64": int(x.ctypes.data % 64),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, nargs="?", default=STUDENT)
    parser.add_argument("--processes", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(str(args.model), args.child, args.threads, args.runs, args.core)))
        return

    variants = [v for v in args.variants.split(",") if v]
    if "no-aslr" in variants and shutil.which("setarch") is None:
        variants.remove("no-aslr")
    cores = sorted(os.sched_getaffinity(0))
    found: dict[str, list[dict]] = {v: [] for v in variants}
    for round_ in range(args.processes):
        for variant in variants:
            command = [sys.executable, __file__, str(args.model), "--child", variant]
            command += ["--threads", str(args.threads), "--runs", str(args.runs)]
            command += ["--core", str(cores[round_ % len(cores)])]
            if variant == "no-aslr":
                command = ["setarch", os.uname().machine, "-R", *command]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            try:
                found[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
            except (IndexError, json.JSONDecodeError):
                found[variant].append({"error": (done.stderr.strip() or "no output")[-300:]})
    fastest = min(
        statistics.median(p["p50_ms"] for p in runs if "p50_ms" in p)
        for runs in found.values()
        if any("p50_ms" in p for p in runs)
    )
    record = {
        "model": str(args.model),
        "settings": {"processes": args.processes, "threads": args.threads, "runs": args.runs},
        "slow_threshold_ms": SLOW * fastest,
        "variants": {v: summarise(runs, SLOW * fastest) for v, runs in found.items()},
        **machine(),
    }
    for variant, summary in record["variants"].items():
        medians = ", ".join(f"{m:.3f}" for m in summary["sorted_p50_ms"])
        print(f"{variant:9s} slow {summary['slow']:2d}/{summary['measured']}: {medians}")
    from compress.core.fileio import write_json_atomic  # here: the children stay numpy + ORT only

    out = write_json_atomic(HERE / "results" / "latency_modes.json", record)
    print(f"written: {out}")


def summarise(runs: list[dict], threshold: float) -> dict:
    measured = [p for p in runs if "p50_ms" in p]
    return {
        "measured": len(measured),
        "slow": sum(p["p50_ms"] > threshold for p in measured),
        "sorted_p50_ms": sorted(p["p50_ms"] for p in measured),
        "processes": runs,
    }


def machine() -> dict:
    from compress.core.machine import machine_info, versions

    return {"machine": machine_info(), "versions": versions()}


if __name__ == "__main__":
    main()
