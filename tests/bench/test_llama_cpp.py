"""The llama.cpp row of `lsd-edge bench`: llama-bench's JSON read into a row, at the other rows' depth."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lsd_edge.bench.llama_cpp import LlamaBench, llama_rows, measure_gguf, run_json
from lsd_edge.bench.plan import BenchSettings
from lsd_edge.bench.report import check_schema, fmt_split, plot, to_markdown, ttft_parts
from lsd_edge.bench.runner import bench
from lsd_edge.errors import BenchError

from ..helpers import one_red_line, run

# A stand-in for llama-bench: answers -o json as llama.cpp's does (prefill at -p, decode at -n after
# -d tokens, one `samples_ns` entry per repetition -r, the i-th taking 1 + i/10 times the first), works
# the CPU for 0.05 s and records how long in `cpu_s`, and logs each command line, so the test sees
# what the row asked for.
FAKE = """#!{python}
import json, sys, time
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
opt = lambda k: args[args.index(k) + 1]
if {fail!r}:
    sys.stderr.write("llama_model_load: error loading model\\nmain: error: failed to load model\\n")
    sys.exit(1)
t = time.process_time()
while time.process_time() - t < 0.05:
    pass
p, n, d = int(opt("-p")), int(opt("-n")), int(opt("-d")) if "-d" in args else 0
ts = 800.0 if p else 40.0
ns = [int(1e9 * max(p, n) / ts * (1 + i / 10)) for i in range(int(opt("-r")))]
rec = dict(n_prompt=p, n_gen=n, n_depth=d, n_threads=int(opt("-t")), avg_ts=ts, samples_ns=ns,
           samples_ts=[1e9 * max(p, n) / x for x in ns], model_size=500_000_000, model_n_params=460_000_000,
           model_type="qwen2 0.5B Q8_0", build_commit="abc123", cpu_info="a fake CPU", cpu_s=time.process_time())
print({out!r} if {out!r} else json.dumps([rec]))
"""

# llama-bench's -o json record in the form llama.cpp's tools/llama-bench/README.md documents (a decode
# run of 64 tokens at depth 740, 3 repetitions), its figures made up for this test.
RECORDED = [
    {
        "build_commit": "8cf427ff", "build_number": 5163, "cpu_info": "x86_64 CPU", "gpu_info": "",
        "backends": "CPU", "model_filename": "student-Q8_0.gguf", "model_type": "qwen2 0.5B Q8_0",
        "model_size": 531_000_000, "model_n_params": 494_000_000, "n_batch": 2048, "n_ubatch": 512,
        "n_threads": 2, "n_gpu_layers": 0, "n_prompt": 0, "n_gen": 64, "n_depth": 740,
        "test_time": "2026-12-04T12:00:00Z", "avg_ns": 1_600_000_000, "stddev_ns": 100_000_000,
        "avg_ts": 40.1, "stddev_ts": 2.5, "samples_ns": [1_500_000_000, 1_600_000_000, 1_700_000_000],
        "samples_ts": [42.67, 40.0, 37.65],
    }
]  # fmt: skip


def fake_llama_bench(tmp_path: Path, fail: bool = False, out: str = "") -> tuple[Path, Path]:
    log = tmp_path / "calls.jsonl"
    exe = tmp_path / "llama-bench"
    exe.write_text(FAKE.format(python=sys.executable, log=str(log), fail=fail, out=out))
    exe.chmod(0o755)
    gguf = tmp_path / "student-Q8_0.gguf"
    gguf.write_bytes(b"GGUF" + bytes(1020))
    return exe, gguf


def test_prefill_from_empty_and_decode_at_depth(tmp_path):
    exe, gguf = fake_llama_bench(tmp_path)
    m = measure_gguf(exe, gguf, threads=2, prompt_tokens=740, new_tokens=64, repeats=3)
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert [c[c.index("-p") + 1 : c.index("-p") + 4] for c in calls] == [
        ["740", "-n", "0"],
        ["0", "-n", "64"],
    ]
    assert calls[1][-2:] == ["-d", "740"] and all(c[c.index("-t") + 1] == "2" for c in calls)
    assert m["decode_tokens_per_s"] == 40.0 and m["prefill_tokens_per_s"] == 800.0
    # TTFT from the prefill's three repetitions (1.0, 1.1 and 1.2 x 740/800 s), not from its average
    first = 1000 * 740 / 800
    assert m["ttft_ms_p50"] == pytest.approx(1.1 * first) and m["ttft_ms_p90"] == pytest.approx(1.18 * first)
    assert m["e2e_tokens_per_s"] == pytest.approx(64 / (1.1 * 740 / 800 + 63 / 40))
    # a Python child: resident, but far from a GiB
    assert m["precision"] == "Q8_0" and m["params"] == 460_000_000 and 1 < m["peak_rss_mb"] < 1024
    # one busy thread of the two asked for: at most half of 2 threads' time, and more than nothing
    assert 0 < m["cpu_share"] <= 0.55
    (row,) = llama_rows(LlamaBench(exe, [gguf]), 2, 740, 64, 3, bandwidth=50e9)
    assert (row.label, row.backend, row.accuracy) == ("student-Q8_0 (llama.cpp Q8_0)", "llama.cpp", None)
    assert row.roofline_fraction == pytest.approx(40.0 / (50e9 / 500_000_000))
    assert row.ttft_ms_p90 > row.ttft_ms_p50 and 0 < row.cpu_share <= 0.55
    # llama-bench times the LLM's prefill alone: the whole of its TTFT, no vision, no visual tokens
    assert row.prefill_ms_p50 == row.ttft_ms_p50 == m["ttft_ms_p50"]
    assert row.vision_ms_p50 is None and row.first_token_ms_p50 is None and row.visual_tokens is None
    assert fmt_split(row) == f"- / {row.ttft_ms_p50:,.1f} / -" and ttft_parts(row) == [
        ("prefill", row.ttft_ms_p50)
    ]


def test_a_run_is_measured_by_its_own_cpu_time(tmp_path):
    exe, gguf = fake_llama_bench(tmp_path)
    cmd = [str(exe), "-m", str(gguf), "-t", "1", "-r", "2", "-o", "json", "-p", "8", "-n", "0"]
    run = run_json(cmd)
    # the child's CPU time as the kernel counted it covers what the child itself saw spent
    assert run.cpu_s >= run.record["cpu_s"] >= 0.05 and run.wall_s >= run.cpu_s
    assert run.record["samples_ns"] == [10_000_000, 11_000_000]


def test_a_recorded_llama_bench_record_is_read(tmp_path):
    exe, gguf = fake_llama_bench(tmp_path, out=json.dumps(RECORDED))
    m = measure_gguf(exe, gguf, threads=2, prompt_tokens=740, new_tokens=64, repeats=3)
    assert m["decode_tokens_per_s"] == 40.1 and m["params"] == 494_000_000 and m["precision"] == "Q8_0"
    assert (m["ttft_ms_p50"], m["ttft_ms_p90"]) == (pytest.approx(1600.0), pytest.approx(1680.0))
    assert m["build"] == "8cf427ff (x86_64 CPU)"
    no_samples = [{k: v for k, v in RECORDED[0].items() if k != "samples_ns"}]
    exe, gguf = fake_llama_bench(tmp_path, out=json.dumps(no_samples))
    with pytest.raises(BenchError, match="no samples_ns .* use a newer llama-bench"):
        measure_gguf(exe, gguf, threads=2, prompt_tokens=740, new_tokens=64, repeats=3)


@pytest.mark.parametrize(
    "kind,needle",
    [
        ("no binary", "--llama-bench .*missing: no such file"),
        ("no gguf", "--gguf .*nope.gguf: no such file"),
        ("gguf only", "--gguf needs --llama-bench BINARY"),
        ("fails", "failed on .*student-Q8_0.gguf: main: error: failed to load model"),
        ("not json", "its -o json output is not JSON"),
    ],
)
def test_bad_llama_bench_input_is_one_line(tmp_path, kind, needle):
    exe, gguf = fake_llama_bench(tmp_path, fail=kind == "fails", out="| md |" if kind == "not json" else "")
    spec = {
        "no binary": LlamaBench(tmp_path / "missing", [gguf]),
        "no gguf": LlamaBench(exe, [tmp_path / "nope.gguf"]),
        "gguf only": LlamaBench(None, [gguf]),
    }.get(kind, LlamaBench(exe, [gguf]))
    with pytest.raises(BenchError, match=needle) as e:
        spec.check()
        measure_gguf(spec.binary, gguf, 1, 8, 4, 1)
    assert "\n" not in str(e.value)


def test_cli_gguf_without_llama_bench(tmp_path, monkeypatch, capsys, onnx_dir):
    _, gguf = fake_llama_bench(tmp_path)
    code, _, err = run(monkeypatch, capsys, "bench", "--onnx", str(onnx_dir), "--gguf", str(gguf))
    assert code == 1 and "--gguf needs --llama-bench BINARY" in one_red_line(err)


@pytest.mark.slow  # one ONNX worker process
def test_llama_rows_beside_the_onnx_row(tmp_path, onnx_dir, shapes_dir):
    exe, gguf = fake_llama_bench(tmp_path)
    settings = BenchSettings(
        prompts=1, max_new_tokens=4, repeats=1, warmup=0, threads=1, copy_mb=4, accuracy=False,
        data=shapes_dir / "eval.json", images=shapes_dir / "images", variants=["int8"],
        llama_bench=exe, gguf=[gguf],
    )  # fmt: skip
    result = bench(onnx=[onnx_dir], settings=settings)
    onnx_row, llama_row = result.results
    assert llama_row.backend == "llama.cpp" and llama_row.prompt_tokens == onnx_row.prompt_tokens
    assert llama_row.new_tokens == 4 and llama_row.threads == 1
    assert check_schema(result.as_dict()) == []
    assert json.loads(json.dumps(result.as_dict()))["settings"]["gguf"] == [str(gguf)]
    md = to_markdown(result)
    assert "| student-Q8_0 | llama.cpp Q8_0 | 40.0 |" in md
    assert f"| {fmt_split(llama_row)} | n/a |" in md and f"| {fmt_split(onnx_row)} | 4 |" in md
    assert onnx_row.vision_ms_p50 > 0 and onnx_row.visual_tokens == 4
    # the chart stacks what each row has: the ONNX row's three parts, llama.cpp's prefill
    assert plot(result, tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
