"""`lsd-edge bench-loss`: the plain and chunked paths measured on the same inputs, agreeing."""

from __future__ import annotations

import json

import pytest
import torch

from lsd_edge.bench.loss import PeakMemory, bench_loss
from lsd_edge.errors import LsdEdgeError

from ..helpers import one_red_line, run


def test_bench_loss_measures_both_paths():
    res = bench_loss(
        vocab=300, tokens=40, student_hidden=16, teacher_hidden=24, chunk=7, kind="jsd", repeats=1
    )
    d = res.as_dict()
    assert set(d) >= {"plain", "chunked", "max_rel_diff"}
    for path in ("plain", "chunked"):
        assert set(d[path]) == {"peak_mb", "ms"} and d[path]["peak_mb"] >= 0 and d[path]["ms"] > 0
    assert d["max_rel_diff"] <= 1e-5 and d["settings"]["chunk"] == 7 and d["device"] == "cpu"
    with pytest.raises(LsdEdgeError, match="not a KL kind"):
        bench_loss(vocab=10, tokens=4, kind="nope")
    for bad in (dict(vocab=0), dict(chunk=0), dict(temperature=0.0)):
        with pytest.raises(LsdEdgeError, match="must be positive, --temperature > 0"):
            bench_loss(tokens=4, **{"vocab": 10, **bad})


def test_peak_memory_sees_a_large_tensor():
    with PeakMemory(torch.device("cpu")) as m:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    assert m.mb >= 48


def test_bench_loss_command(tmp_path, monkeypatch, capsys):
    out_json = tmp_path / "b.json"
    code, out, err = run(
        monkeypatch, capsys, "bench-loss", "--vocab", "200", "--tokens", "30", "--student-hidden", "8",
        "--teacher-hidden", "12", "--chunk", "8", "--repeats", "1", "--json", str(out_json),
    )  # fmt: skip
    assert code == 0, err
    assert "plain" in out and "chunked (8)" in out and "max relative difference" in out
    data = json.loads(out_json.read_text())
    assert {"peak_mb", "ms"} <= set(data["plain"]) and data["max_rel_diff"] <= 1e-5
    code, _, err = run(monkeypatch, capsys, "bench-loss", "--tokens", "4", "--vocab", "9", "--device", "cuda")
    if not torch.cuda.is_available():
        assert code == 1 and "CUDA is not available" in one_red_line(err)
