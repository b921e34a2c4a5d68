"""A llama.cpp row for `lsd-edge bench`: a given `llama-bench` binary on a given GGUF file.

Two `llama-bench -o json` runs, the way llama.cpp reports its own speed: prefill (`-p P -n 0`) of
the bench's prompt length from an empty context, and decode (`-p 0 -n N -d P`) of the bench's new
tokens after that many tokens of context, so the row decodes at the same depth as the ONNX and
PyTorch rows. llama-bench measures the LLM alone: its time to first token is the prefill's, with no
vision encoder; its p50 and p90 are over the prefill's repetitions (llama-bench's `samples_ns`).
Of the TTFT's split it has the prefill alone (the whole of its TTFT): no vision part, no visual
tokens, and no first token timed apart.
Peak memory is the process's resident set, polled; the CPU share is the two runs' CPU time (their
own, from the kernel's accounting of waited-for children) over their wall time x threads, model
loading included.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lsd_edge.bench.report import BenchRow
from lsd_edge.bench.worker import percentile
from lsd_edge.errors import BenchError
from lsd_edge.runtime.memory import run_measured


@dataclass
class LlamaBench:
    """What a llama.cpp row needs: the binary, the GGUF files, and the depth (prompt tokens) to decode at."""

    binary: Path | None
    ggufs: list[Path]

    def check(self) -> None:
        if self.binary is None:
            raise BenchError("--gguf needs --llama-bench BINARY (llama.cpp's llama-bench) to measure it")
        b = Path(self.binary)
        if not b.is_file():
            raise BenchError(
                f"--llama-bench {b}: no such file; build it from llama.cpp (docs/BENCHMARKS.md: llama.cpp)"
            )
        if not self.ggufs:
            raise BenchError("--llama-bench needs at least one --gguf FILE to measure")
        for g in self.ggufs:
            if not Path(g).is_file():
                raise BenchError(f"--gguf {g}: no such file; write one with `lsd-edge export --gguf`")


@dataclass
class BenchRun:
    """One llama-bench run: its first JSON record, the peak resident memory (MiB), wall and CPU seconds."""

    record: dict[str, Any]
    peak_mb: float
    wall_s: float
    cpu_s: float


def _children_cpu_s() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def run_json(cmd: list[str]) -> BenchRun:
    """One llama-bench run, measured: what it reports and what it cost."""
    cpu0, t0 = _children_cpu_s(), time.perf_counter()
    try:
        run = run_measured(cmd)
    except OSError as e:
        raise BenchError(f"{cmd[0]}: cannot run it ({e.strerror}); give a llama-bench binary") from None
    # the child is waited for by now, so its CPU time is in RUSAGE_CHILDREN (the bench starts one at a time)
    wall_s, cpu_s = time.perf_counter() - t0, _children_cpu_s() - cpu0
    lines = [s for s in run.stderr.strip().splitlines() if s.strip()]
    if run.returncode != 0:
        why = lines[-1][:300] if lines else f"exit status {run.returncode}"
        raise BenchError(f"{cmd[0]} failed on {cmd[cmd.index('-m') + 1]}: {why}")
    try:
        records = json.loads(run.stdout)
    except json.JSONDecodeError:
        raise BenchError(
            f"{cmd[0]}: its -o json output is not JSON; is it llama.cpp's llama-bench?"
        ) from None
    if not isinstance(records, list) or not records or "avg_ts" not in records[0]:
        raise BenchError(f"{cmd[0]}: no results with avg_ts in its output; is it llama.cpp's llama-bench?")
    if not records[0].get("samples_ns"):
        raise BenchError(
            f"{cmd[0]}: no samples_ns (per-repetition times) in its -o json output; use a newer llama-bench"
        )
    return BenchRun(records[0], run.peak_mb, wall_s, cpu_s)


def measure_gguf(
    binary: Path, gguf: Path, threads: int, prompt_tokens: int, new_tokens: int, repeats: int
) -> dict[str, Any]:
    """Prefill and decode tokens/s of one GGUF file, with what a bench row reports beside them."""
    base = [str(binary), "-m", str(gguf), "-t", str(threads), "-r", str(repeats), "-o", "json"]
    t0 = time.perf_counter()
    pp_run = run_json([*base, "-p", str(prompt_tokens), "-n", "0"])
    tg_run = run_json([*base, "-p", "0", "-n", str(new_tokens), "-d", str(prompt_tokens)])
    pp, tg = pp_run.record, tg_run.record
    prefill, decode = float(pp["avg_ts"]), float(tg["avg_ts"])
    ttft_ms = [float(ns) / 1e6 for ns in pp["samples_ns"]]  # each repetition prefills the whole prompt
    ttft_p50 = percentile(ttft_ms, 50)
    total = ttft_p50 / 1000 + (new_tokens - 1) / decode
    runs = (pp_run, tg_run)
    return {
        "decode_tokens_per_s": decode,
        "prefill_tokens_per_s": prefill,
        "e2e_tokens_per_s": new_tokens / total,
        "ttft_ms_p50": ttft_p50,
        "ttft_ms_p90": percentile(ttft_ms, 90),
        "prefill_ms_p50": ttft_p50,
        "cpu_share": sum(r.cpu_s for r in runs) / (sum(r.wall_s for r in runs) * threads),
        "peak_rss_mb": max(r.peak_mb for r in runs),
        "size_mb": Path(gguf).stat().st_size / 2**20,
        "weight_mb_per_token": float(tg.get("model_size") or Path(gguf).stat().st_size) / 2**20,
        "params": int(tg.get("model_n_params") or 0),
        "precision": str(tg.get("model_type", "")).split()[-1] if tg.get("model_type") else "gguf",
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "runs": repeats,
        "load_s": time.perf_counter() - t0,
        "threads": threads,
        "build": f"{tg.get('build_commit', '?')} ({tg.get('cpu_info', tg.get('backends', ''))})",
    }


def llama_rows(
    spec: LlamaBench, threads: int, prompt_tokens: int, new_tokens: int, repeats: int, bandwidth: float
) -> list[BenchRow]:
    """One bench row per GGUF file, labelled `<file stem> (llama.cpp <type>)`."""
    rows = []
    for gguf in spec.ggufs:
        m = measure_gguf(Path(spec.binary), Path(gguf), threads, prompt_tokens, new_tokens, repeats)
        top = bandwidth / (m["weight_mb_per_token"] * 2**20)
        name = Path(gguf).stem
        rows.append(
            BenchRow(
                name=name,
                label=f"{name} (llama.cpp {m['precision']})",
                role="student",
                backend="llama.cpp",
                precision=m["precision"],
                device="cpu",
                path=str(gguf),
                accuracy=None,
                accuracy_samples=0,
                peak_mem_mb=m["peak_rss_mb"],
                cuda_max_allocated_mb=None,
                nvml_peak_mb=None,
                roofline_tokens_per_s=top,
                roofline_fraction=m["decode_tokens_per_s"] / top,
                cpu_share=m["cpu_share"],
                pid=0,
                torch_imported=False,
                samples=[{"llama_bench_build": m["build"]}],
                **{k: m[k] for k in LLAMA_FIELDS},
            )
        )
    return rows


LLAMA_FIELDS = (
    "decode_tokens_per_s",
    "prefill_tokens_per_s",
    "e2e_tokens_per_s",
    "ttft_ms_p50",
    "ttft_ms_p90",
    "prefill_ms_p50",
    "size_mb",
    "params",
    "weight_mb_per_token",
    "peak_rss_mb",
    "prompt_tokens",
    "new_tokens",
    "runs",
    "load_s",
    "threads",
)
