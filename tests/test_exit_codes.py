"""The exit code contract (README): 0 success, 1 only for a regression a gate found, 2 for bad
input or any error (a bug included, and a bench in which every model failed), 130 for Ctrl-C."""

import types

import pytest
from click.testing import CliRunner

from compress.benchmark.rows import BenchRow
from compress.cli import cli


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"not read: bench_files is replaced in these tests")
    return path


def replace_bench(monkeypatch, behaviour):
    import compress.pipeline.stages.bench as stage

    monkeypatch.setattr(stage, "bench_files", behaviour)


@pytest.mark.parametrize("exc", [RuntimeError("boom\nsecond line"), EOFError(), MemoryError()])
def test_a_bug_is_one_line_and_exit_2_never_1(monkeypatch, model_file, exc):
    def broken(*args, **kwargs):
        raise exc

    replace_bench(monkeypatch, broken)
    result = CliRunner().invoke(cli, ["bench", str(model_file)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: unexpected {type(exc).__name__}")
    assert "--debug" in lines[0] and "second line" not in lines[0]
    assert "Traceback" not in result.output


def test_with_debug_a_bug_shows_its_traceback_and_still_exits_2(monkeypatch, model_file):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    replace_bench(monkeypatch, broken)
    result = CliRunner().invoke(cli, ["bench", str(model_file), "--debug"])
    assert result.exit_code == 2 and "Traceback" in result.output and "boom" in result.output


@pytest.mark.parametrize(("statuses", "code"), [(["error", "error"], 2), (["error", "ok"], 0)])
def test_bench_exits_2_when_every_model_failed(monkeypatch, model_file, tmp_path, statuses, code):
    table = tmp_path / "bench.md"
    table.write_text("| table |\n")
    rows = [
        BenchRow(role=f"m{i}", status=status, error="cannot allocate" if status != "ok" else None)
        for i, status in enumerate(statuses)
    ]
    replace_bench(monkeypatch, lambda *a, **k: (types.SimpleNamespace(rows=rows), table))
    result = CliRunner().invoke(cli, ["bench", str(model_file)])
    assert result.exit_code == code, result.output
    if code:
        assert "every model failed to bench (m0: cannot allocate)" in result.output


def test_every_command_follows_the_contract():
    """Each command runs inside the handler that maps errors to exit 2 (it adds --debug)."""
    for name, command in cli.commands.items():
        assert any(p.name == "debug" for p in command.params), f"compress {name} has no handler"
