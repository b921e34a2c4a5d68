"""scripts/gpu-check.sh: refuses clearly without CUDA; its plan and its Markdown table."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from .helpers import REPO

spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check
spec.loader.exec_module(gpu_check)


def test_without_cuda_it_refuses_in_one_line_and_runs_nothing(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    out = tmp_path / "out"
    p = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu-check.sh"), str(out)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
        timeout=120,
    )
    assert p.returncode == gpu_check.NO_CUDA
    assert (
        p.stderr.strip().startswith("error: gpu-check needs a CUDA GPU")
        and len(p.stderr.strip().splitlines()) == 1
    )
    assert not out.exists(), "nothing was run or written"


def test_the_plan_runs_the_gpu_tests_real_size_memory_tiny_on_cuda_and_the_cuda_export(tmp_path):
    steps = [check for check, _ in gpu_check.plan("python", tmp_path)]
    commands = [" ".join(c.command) for c in steps]
    assert "pytest -q -m gpu tests" in commands[0]
    assert any("memory recipes/qwen0.5b.toml --measure" in c and "run.device=cuda" in c for c in commands)
    tiny = next(c for c in commands if "distill recipes/tiny.toml" in c)
    assert "run.device=cuda" in tiny and "run.precision=bf16" in tiny
    assert any("export" in c and "--target cuda" in c for c in commands)


def test_figures_are_read_from_what_each_check_wrote(tmp_path):
    report = {
        "teacher": {"accuracy": 0.916},
        "student": {"accuracy": 0.924},
        "stages": [{"name": "dft", "tokens_per_s": 51234.0}],
    }
    (tmp_path / "report.json").write_text(json.dumps(report))
    figures = gpu_check.report_figures(tmp_path / "report.json")
    assert figures == {"teacher accuracy": "91.6%", "student accuracy": "92.4%", "dft tokens/s": "51,234"}
    memory = {
        "estimate": [{"stage": "dft", "total": 3 * 2**30}],
        "measured": {"peak_bytes": 2**31, "tokens_per_s": 1234.5},
    }
    (tmp_path / "memory.json").write_text(json.dumps(memory))
    assert gpu_check.memory_figures(tmp_path / "memory.json") == {
        "estimate dft": "3.0 GiB",
        "peak_bytes": "2.0 GiB",
        "tokens_per_s": "1,234",
    }
    assert gpu_check.pytest_figures("....\n===== 5 passed, 1 skipped in 3.2s =====\n") == {
        "result": "5 passed, 1 skipped in 3.2s"
    }


def test_the_table_has_a_row_per_check_and_the_output_of_a_failed_one():
    ok = gpu_check.Check("gpu tests", [], 1, ok=True, seconds=12.3, figures={"result": "5 passed"})
    bad = gpu_check.Check(
        "ONNX export, CUDA EP", [], 1, seconds=4.0, tail="error: CUDAExecutionProvider missing"
    )
    table = gpu_check.markdown("NVIDIA H200", [ok, bad])
    lines = table.splitlines()
    assert lines[0] == "GPU check on NVIDIA H200"
    assert "| gpu tests | ok | 12 | result: 5 passed |" in lines
    assert "| ONNX export, CUDA EP | FAILED | 4 | - |" in lines
    assert "error: CUDAExecutionProvider missing" in table
