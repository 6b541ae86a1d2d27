"""The shape of the code: imports flow one way (CLI -> pipeline -> stages -> library -> building
blocks -> records and I/O), no package cycle, and the vocabulary a recipe check or ``--help``
reads costs no torch. The contracts live in pyproject.toml ([tool.importlinter])."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in result.stdout


def test_help_and_the_recipe_vocabulary_import_no_torch():
    code = (
        "import sys, compress.cli, compress.pipeline.config, compress.exporters.formats, "
        "compress.benchmark.backend_table, compress.training.loss_params; "
        "from click.testing import CliRunner; out = "
        "CliRunner().invoke(compress.cli.cli, ['--help']); assert out.exit_code == 0, out.output; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', "
        "'onnxruntime', 'torch_pruning'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"
