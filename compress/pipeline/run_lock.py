"""One run at a time per run folder.

Two ``compress run`` into the same ``--out`` would train into the same checkpoints and leave a
``recipe.yaml`` that describes only one of them. The first run holds ``<run>/.lock`` (an OS file
lock through the ``filelock`` package: the kernel releases it when the holder exits or is
killed, so a crashed run never leaves a lock behind) and writes who it is beside it; a second
run refuses with one line naming the holder, or waits for it when asked to.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from compress.core.fileio import read_json, write_json_atomic
from compress.errors import StageError

LOCK_NAME = ".lock"
HOLDER_NAME = ".lock.holder.json"


@contextmanager
def run_lock(run_dir: Path, *, wait: bool = False) -> Iterator[None]:
    """Hold the run folder for the block.

    Raises:
        StageError: another process holds it and ``wait`` is False (the message names its pid,
            host and start time).
    """
    lock = FileLock(run_dir / LOCK_NAME)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            raise StageError(
                f"{run_dir} is in use by another run ({holder(run_dir)}); wait for it, run again "
                "with --wait to queue behind it, or give another --out"
            ) from None
        print(
            f"waiting for {run_dir}, in use by {holder(run_dir)} ...", file=sys.stderr, flush=True
        )
        lock.acquire()
    try:
        write_json_atomic(
            run_dir / HOLDER_NAME,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join(sys.argv)[:500],
            },
        )
        yield
    finally:
        (run_dir / HOLDER_NAME).unlink(missing_ok=True)
        lock.release()


def holder(run_dir: Path) -> str:
    """Who holds the folder, as the holder wrote it ("pid 123 on host since ...")."""
    try:
        info = read_json(run_dir / HOLDER_NAME, max_bytes=4096)
        return f"pid {info['pid']} on {info['host']} since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not said who it is yet"
