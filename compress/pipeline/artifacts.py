"""Run-folder layout and self-describing stage artifacts.

``exported/<run>/<stage>/`` holds what a stage made plus ``stage.json``: the stage's resolved
config, the whole resolved recipe, its metrics, the package versions, the key of its inputs and
the sha256 of every file it wrote. ``stage.json`` is written last and atomically, so its presence
with a matching key and matching file hashes is what "this stage is complete" means: a run
interrupted anywhere leaves either a complete stage or one that re-runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compress.core.fileio import content_bytes, content_sha256, sidecar, write_json_atomic
from compress.core.records import STAGE_RECORD, FileRecord, NetworkSpec, StageRecord
from compress.errors import ModelError

__all__ = [
    "STAGE_RECORD",
    "Artifact",
    "discard",
    "input_key",
    "load_completed",
    "record_stage",
]


@dataclass
class Artifact:
    """What a stage hands to later stages and to the report.

    Attributes:
        stage: the stage's name (the recipe's ``name:``; its kind unless it sets one).
        files: role -> file path (e.g. ``{"model": .../distill/model.pt}``).
        metrics: JSON-able numbers the stage measured (results only).
        role: which network the stage's ``model`` file is ("teacher" or "student"), if any.
        network: how to rebuild the network in ``files["model"]``, if the stage holds one.
    """

    stage: str
    files: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    role: str | None = None
    network: NetworkSpec | None = None
    key: str = ""
    seconds: float = 0.0
    peak_rss_mb: float | None = None  # the process's peak resident memory while the stage ran
    skipped: bool = False
    kind: str = ""  # the stage function that made it ("distill", "prune", ...); stage until renamed

    def __post_init__(self):
        self.kind = self.kind or self.stage

    @property
    def quantized(self) -> bool:
        return self.network is not None and self.network.quantized


def input_key(*parts: Any) -> str:
    """A stable hash of JSON-able parts: what a stage's result depends on."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    from compress import __version__
    from compress.core.machine import versions as runtime_versions

    return {"compress": __version__, "torch": torch.__version__} | runtime_versions()


def record_stage(
    folder: Path, run_dir: Path, artifact: Artifact, config: Any, recipe: dict
) -> None:
    """Write ``metrics.json`` and, last, ``stage.json`` (the completion marker)."""
    write_json_atomic(folder / "metrics.json", artifact.metrics)
    record = StageRecord(
        stage=artifact.stage,
        kind=artifact.kind,
        key=artifact.key,
        role=artifact.role,
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        seconds=artifact.seconds,
        peak_rss_mb=artifact.peak_rss_mb,
        files={
            role: FileRecord(
                os.path.relpath(path, run_dir), content_sha256(path), content_bytes(path)
            )
            for role, path in artifact.files.items()
        },
        metrics=artifact.metrics,
        network=artifact.network,
        config=config,
        recipe=recipe,
        versions=versions(),
    )
    write_json_atomic(folder / STAGE_RECORD, record.to_json())


def load_completed(folder: Path, run_dir: Path, key: str) -> Artifact | None:
    """The stage's artifact if it completed with this input key and its files are intact."""
    try:
        record = StageRecord.read(folder)
    except ModelError:
        return None
    if record.key != key:
        return None
    try:  # every file inside the run folder and exactly as written; else (tampered, lost) re-run
        files = {role: record.path(role) for role in record.files}
    except ModelError:
        return None
    return Artifact(
        stage=record.stage,
        kind=record.kind,
        files=files,
        metrics=record.metrics,
        role=record.role,
        network=record.network,
        key=key,
        seconds=record.seconds,
        peak_rss_mb=record.peak_rss_mb,
        skipped=True,
    )


def discard(folder: Path, run_dir: Path) -> None:
    """Forget a stage and delete the files its record lists (inside the run only).

    For a stage that is about to re-run, or that follows one: its old files were made from
    inputs that are being replaced, and a re-run that fails must not leave them looking like
    this run's deliverables (an old ``student.onnx`` beside a failed re-export). Links are
    removed, never followed; epoch checkpoints are not listed, so resume still works.
    """
    try:
        record = StageRecord.read(folder)
    except ModelError:
        record = None
    (folder / STAGE_RECORD).unlink(missing_ok=True)  # first: a crash mid-way cannot look complete
    inside = run_dir.resolve()
    for entry in record.files.values() if record else ():
        path = run_dir / entry.path
        for part in (path, sidecar(path)):  # an ONNX file over 2 GiB has its weights beside it
            inside_run = part.parent.resolve().is_relative_to(inside)
            if inside_run and (part.is_symlink() or part.is_file()):
                part.unlink(missing_ok=True)
