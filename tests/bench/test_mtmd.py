"""llama.cpp's llama-mtmd-cli read from its own log: a captured run parsed, a stand-in binary run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lsd_edge.bench.mtmd import parse_mtmd, run_mtmd
from lsd_edge.errors import BenchError

# A captured llama-mtmd-cli log (llama-cpp-python 0.3.36's vendored llama.cpp, built as
# docs/BENCHMARKS.md says, `--perf -v`): qwen0.5b-edge-168's mmproj (q8_0) and a Q8_0 LLM on 1 thread,
# one image, -n 32 --ignore-eos; the model-loading lines before the chat template cut.
CAPTURED = Path(__file__).with_name("mtmd_cli_sample.log").read_text()
# what its lines say
ENCODE_MS, IMAGE_DECODE_MS, PROMPT_EVAL_MS, PROMPT_TOKENS, EVAL_MS, LOAD_MS = (
    860,
    705,
    1743.53,
    158,
    613.77,
    842.29,
)

# A stand-in for llama-mtmd-cli: logs its command line, then prints the captured log (or fails as
# llama.cpp does on a bad file).
FAKE = """#!{python}
import json, sys
with open({log!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if {fail!r}:
    sys.stderr.write("clip_model_loader: failed to open mmproj\\nmain: error: failed to load mmproj\\n")
    sys.exit(1)
sys.stderr.write({out!r})
"""


def fake_mtmd(tmp_path: Path, fail: bool = False, out: str = CAPTURED) -> dict[str, Path]:
    files = {k: tmp_path / n for k, n in (("llm", "llm.gguf"), ("mmproj", "mmproj.gguf"), ("image", "a.png"))}
    for p in files.values():
        p.write_bytes(b"GGUF")
    exe = tmp_path / "llama-mtmd-cli"
    exe.write_text(FAKE.format(python=sys.executable, log=str(tmp_path / "calls.jsonl"), fail=fail, out=out))
    exe.chmod(0o755)
    return files | {"binary": exe}


def test_a_captured_log_is_read():
    t = parse_mtmd(CAPTURED)
    assert (t.encode_ms, t.image_decode_ms) == (ENCODE_MS, IMAGE_DECODE_MS)
    assert (t.prompt_eval_ms, t.prompt_tokens) == (PROMPT_EVAL_MS, PROMPT_TOKENS)
    assert (t.eval_ms, t.eval_tokens, t.load_ms) == (EVAL_MS, 31, LOAD_MS)
    # mtmd-cli encodes the image after the template's first text chunk: llama_perf's prompt eval spans
    # the encode, so it is the TTFT, and the LLM's prefill is the rest of it
    assert t.encode_in_prompt_eval and t.ttft_ms == pytest.approx(PROMPT_EVAL_MS)
    assert t.prefill_ms == pytest.approx(PROMPT_EVAL_MS - ENCODE_MS) and t.prefill_ms > t.image_decode_ms
    assert t.prefill_tokens_per_s == pytest.approx(1000 * PROMPT_TOKENS / (PROMPT_EVAL_MS - ENCODE_MS))
    assert t.decode_tokens_per_s == pytest.approx(1000 * 31 / EVAL_MS)


def test_the_helpers_encode_line_and_several_batches_add_up():
    log = (
        "image slice encoded in 120 ms\nimage decoded (batch 1/2) in 30 ms\nimage decoded (batch 2/2) in 12 ms\n"
        "llama_perf_context_print: prompt eval time =     60.00 ms /   150 tokens (0.4 ms per token, 2500 tokens per second)\n"
        "llama_perf_context_print:        eval time =    100.00 ms /     4 runs   (25 ms per token, 40 tokens per second)\n"
    )
    t = parse_mtmd(log)
    assert (t.encode_ms, t.image_decode_ms, t.prompt_tokens, t.eval_tokens, t.load_ms) == (
        120,
        42,
        150,
        4,
        None,
    )
    # a prompt eval shorter than encode + visual tokens does not span the encode: TTFT adds both
    assert not t.encode_in_prompt_eval and t.prefill_ms == 60.0 and t.ttft_ms == pytest.approx(180.0)
    assert t.decode_tokens_per_s == pytest.approx(40.0) and t.prefill_tokens_per_s == pytest.approx(2500.0)


@pytest.mark.parametrize(
    "cut,needle",
    [
        ("mtmd batch encoding done", "no image encode time in its output .*--image"),
        ("prompt eval time", "no llama_perf_context_print timings .*--perf -v"),
        ("       eval time", "no llama_perf_context_print timings"),
    ],
)
def test_a_log_without_timings_is_one_line(cut, needle):
    log = "\n".join(line for line in CAPTURED.splitlines() if cut not in line)
    with pytest.raises(BenchError, match=needle) as e:
        parse_mtmd(log)
    assert "\n" not in str(e.value)


def test_a_run_asks_for_a_greedy_answer_of_n_tokens(tmp_path):
    f = fake_mtmd(tmp_path)
    run = run_mtmd(f["binary"], f["llm"], f["mmproj"], f["image"], "what color is the circle ?", 2, 32)
    (args,) = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    opt = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("-")}
    assert (opt["-m"], opt["--mmproj"], opt["--image"]) == (str(f["llm"]), str(f["mmproj"]), str(f["image"]))
    assert (opt["-p"], opt["-n"], opt["-t"], opt["--temp"]) == ("what color is the circle ?", "32", "2", "0")
    assert "--ignore-eos" in args  # a random model's answer runs its whole length
    assert "--perf" in args and "-v" in args  # without them it prints no timings
    assert run.timings == parse_mtmd(CAPTURED) and run.threads == 2 and 0 < run.peak_rss_mb < 1024
    rec = run.as_dict()
    assert rec["ttft_ms"] == run.timings.ttft_ms and rec["llm"] == str(f["llm"]) and "timings" not in rec


@pytest.mark.parametrize(
    "kind,needle",
    [
        ("fails", "failed on .*llm.gguf with .*mmproj.gguf: main: error: failed to load mmproj"),
        ("no image", "--image .*a.png: no such file"),
        ("no binary", "--llama-mtmd-cli .*missing: no such file"),
        ("no timings", "no image encode time"),
    ],
)
def test_a_bad_run_is_one_line(tmp_path, kind, needle):
    f = fake_mtmd(tmp_path, fail=kind == "fails", out="hello\n" if kind == "no timings" else CAPTURED)
    if kind == "no image":
        f["image"].unlink()
    binary = tmp_path / "missing" if kind == "no binary" else f["binary"]
    with pytest.raises(BenchError, match=needle) as e:
        run_mtmd(binary, f["llm"], f["mmproj"], f["image"], "q ?", 1, 4)
    assert "\n" not in str(e.value)
