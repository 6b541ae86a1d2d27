"""What a stage receives besides its own config: the recipe, the run folder, the device, the
artifacts of the stages before it, and the dataset (loaded once per run)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from compress.errors import StageError
from compress.pipeline.artifacts import Artifact
from compress.pipeline.config import Recipe
from compress.training.teaching import LoopSettings


@dataclass
class RunContext:
    recipe: Recipe
    run_dir: Path
    device: torch.device
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    stage_dir: Path | None = None
    show_progress: bool = True
    stage_key: str = ""  # the running stage's input key: its training checkpoints must match it

    @cached_property
    def data(self):
        """The recipe's dataset, loaded on first use (a run whose stages all skip never loads
        it)."""
        from compress.data.load import load_dataset

        return load_dataset(self.recipe.data, seed=self.recipe.seed)

    def loaders(self):
        from compress.data.loaders import make_loaders

        return make_loaders(
            self.data,
            self.recipe.data,
            seed=self.recipe.seed,
            pin_memory=self.device.type == "cuda",
        )

    def latest(self, role: str) -> Artifact:
        """The most recent artifact whose model plays ``role`` ("teacher" or "student")."""
        for artifact in reversed(self.artifacts.values()):
            if artifact.role == role and "model" in artifact.files:
                return artifact
        raise StageError(f"no {role} model has been produced by an earlier stage")

    def checkpointing(self, desc: str) -> dict:
        """``fit``'s checkpoint arguments for the training run ``desc`` of the running stage:
        one file per run in the stage folder, valid only for the stage's current inputs."""
        from compress.training.checkpoint import checkpoint_name

        if self.stage_dir is None:
            return {}
        return {
            "checkpoint": self.stage_path(checkpoint_name(desc)),
            "checkpoint_key": f"{self.stage_key}:{desc}",
        }

    def loop(self, desc: str, prepare) -> LoopSettings:
        """How the running stage's training call ``desc`` reads and reports: ``prepare`` (the
        run's augmentation and normalisation), the run's device and progress setting, and the
        call's epoch checkpoint in the stage folder."""
        return LoopSettings(
            prepare=prepare,
            device=self.device,
            show_progress=self.show_progress,
            desc=desc,
            **self.checkpointing(desc),
        )

    def say(self, line: str) -> None:
        """Tell the user what the running stage found, unless the run is quiet."""
        if self.show_progress:
            print(line, file=sys.stderr)

    def stage_path(self, name: str) -> Path:
        assert self.stage_dir is not None
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        return self.stage_dir / name
