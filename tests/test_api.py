"""The library API on a plain nn.Module: the example of docs/api.md, run as written, must train,
distil, prune, quantize, export and bench for real."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from compress.errors import RecipeError
from compress.nets.models import count_params_macs

API_PAGE = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def api_page_example() -> str:
    text = API_PAGE.read_text()
    block = re.search(
        r"<!-- library-example: begin -->\n```python\n(.*?)```\n<!-- library-example: end -->",
        text,
        re.S,
    )
    assert block, "docs/api.md lost its library example"
    return block.group(1)


@pytest.mark.slow
def test_the_readme_library_example_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "api_page_example"}
    exec(compile(api_page_example(), str(API_PAGE), "exec"), scope)  # noqa: S102  (our own docs)
    teacher, student, qmodel, history, result = (
        scope[k] for k in ("teacher", "student", "qmodel", "history", "result")
    )

    # distillation taught the student: it learned far beyond chance and ends near its teacher
    assert history[0].test_top1 < history[-1].test_top1 and history[-1].test_top1 > 85.0
    # pruning halved the MACs of the plain Sequential (round_to 4 leaves a little slack)
    macs_teacher = count_params_macs(scope["cnn"](32), 8, 1)[1]
    assert macs_teacher / count_params_macs(student, 8, 1)[1] >= 1.8
    # the INT8 file is a QDQ graph, verified against PyTorch, with weights exact on every x86 CPU
    record = scope["student_file"]
    assert (
        record["qdq"]["qlinear_conv"] + record["qdq"].get("qlinear_matmul", 0) >= 2
        and record["qdq"]["fp32_conv"] == 0
    )
    assert record["portability"]["portable"] and record["top1_agreement"] >= 0.95
    assert (
        qmodel.quant_spec.target == "onnxruntime-cpu"
        and qmodel.quant_spec.weight_range == "pair-limit"
    )
    # the bench measured both files on the held-out digits, and the INT8 student stayed accurate
    teacher, student = result.row("teacher"), result.row("student")
    assert teacher.top1 > 90.0 and student.top1 > 85.0
    assert teacher.ok and student.ok and student.p50_ms(1) > 0
    assert (tmp_path / "teacher.onnx").is_file() and (tmp_path / "student.onnx").is_file()
    assert "portable: True" in capsys.readouterr().out


def test_distill_without_a_teacher_is_cross_entropy_only():
    import torch
    from torch import nn

    import compress

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="kd need a teacher"):
        compress.distill(model, None, [(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))])
    assert compress.loss("kd", temperature=2.0).params.temperature == 2.0
    with pytest.raises(RecipeError, match="unknown loss .kdd."):
        compress.loss("kdd")
