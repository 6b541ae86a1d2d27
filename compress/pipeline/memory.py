"""Peak resident memory of one stage of a run, measured in the process that runs it.

A process's peak (VmHWM) only grows, so after a teacher stage of 3 GB every later stage would
read 3 GB. Linux resets the peak to the current resident size when ``5`` is written to
``/proc/self/clear_refs`` (since 4.0): each stage resets it, runs, and reads its own peak (which
includes what earlier stages left resident). Where that file cannot be written, the process's
lifetime peak is recorded: still an upper bound.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from compress.benchmark.backends.timing import peak_rss_mb


@dataclass
class StagePeak:
    mb: float | None = None  # set when the ``with`` block of :func:`stage_peak_rss` ends (MiB)


@contextlib.contextmanager
def stage_peak_rss() -> Iterator[StagePeak]:
    """``with stage_peak_rss() as peak: ...`` then ``peak.mb``."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    peak = StagePeak()
    try:
        yield peak
    finally:
        peak.mb = peak_rss_mb()
