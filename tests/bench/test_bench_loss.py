"""`lsd-edge bench-loss`: the plain and chunked paths measured on the same inputs, agreeing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lsd_edge.bench.loss import PeakMemory, bench_loss
from lsd_edge.errors import LsdEdgeError

from ..helpers import REPO, one_red_line, run

FRESH = """
import json, sys
from lsd_edge.bench.loss import bench_loss
kw = json.loads(sys.argv[1])
print(json.dumps(bench_loss(**kw).as_dict()))
"""


def test_bench_loss_measures_both_paths():
    vocab, tokens, chunk = 4096, 256, 32
    kw = dict(vocab=vocab, tokens=tokens, student_hidden=16, teacher_hidden=24, chunk=chunk, kind="jsd")
    # In a fresh process, as the command runs: on the CPU the figure is resident memory added, and a
    # process that freed as much before reuses it without growing (a second call here can read 0).
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, json.dumps({**kw, "repeats": 1, "device": "cpu"})],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(d) >= {"plain", "chunked", "max_rel_diff"}
    for path in ("plain", "chunked"):
        assert set(d[path]) == {"peak_mb", "ms"} and d[path]["ms"] > 0
    # the plain path holds whole (N, V) fp32 logits (4 MiB here), student's and teacher's; the chunked
    # one (N/8, V) at a time: a path that measured nothing, or chunked nothing, fails one of these
    logits_mb = tokens * vocab * 4 / 2**20
    assert 2 * logits_mb <= d["plain"]["peak_mb"] < 64 * logits_mb
    assert 0 < d["chunked"]["peak_mb"] < d["plain"]["peak_mb"] / 2
    assert d["max_rel_diff"] <= 1e-5 and d["settings"]["chunk"] == chunk and d["device"] == "cpu"
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
    code, out, err = run(
        monkeypatch, capsys, "bench-loss", "--tokens", "4", "--vocab", "9", "--device", "cuda", "--repeats", "1",
        "--json", str(out_json),
    )  # fmt: skip
    if torch.cuda.is_available():
        assert code == 0, err
        assert json.loads(out_json.read_text())["device"].startswith("cuda") and "chunked" in out
    else:
        assert code == 1 and "CUDA is not available" in one_red_line(err)
