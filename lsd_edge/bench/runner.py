"""`lsd-edge bench`: teacher vs student vs ONNX student, one subprocess per row, against the roofline.

`bench(...)` plans the rows (the latest run's teacher, student and ONNX exports, given folders, or
random-weight models of real architectures with `--arch`), picks the prompts (the recipe's eval
split, else a generated ShapesVQA set), measures the machine's memory bandwidth once, runs each row
in `lsd_edge.bench.worker` (its own process, so memory is attributable and one allocator does not
pollute the next) and returns a `BenchResult`: per row TTFT p50/p90, decode / prefill / end-to-end
tokens/s, peak memory, size, parameters, exact-match accuracy and the fraction of the bandwidth
roofline the decode reaches; the efficiency ratios against the teacher; the machine. The conventions
are optimum-benchmark's, llama-bench's and vLLM's latency benchmark's: warm-up first, greedy, a
fixed number of new tokens with EOS ignored, percentiles over repeats.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path
from typing import Any

from transformers import LlavaConfig

import lsd_edge
from lsd_edge.bench.llama_cpp import LlamaBench, llama_rows
from lsd_edge.bench.machine import cuda_bandwidth, machine_info, memory_bandwidth
from lsd_edge.bench.plan import BenchSettings, Target, bench_defaults, pick_prompts, plan
from lsd_edge.bench.report import BenchResult, BenchRow
from lsd_edge.bench.worker import PROGRESS, RowSpec
from lsd_edge.errors import BenchError
from lsd_edge.export.onnx.arch import arch_export_dir, is_current
from lsd_edge.files import jsonable
from lsd_edge.models.info import ModelShape
from lsd_edge.progress import QuietReporter, Reporter
from lsd_edge.workspace import RUNS_ROOT, arch_exports_dir

SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    # The worker imports this copy of lsd_edge, whatever the working directory.
    root = str(Path(lsd_edge.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_worker(spec: RowSpec, spec_path: Path, reporter: Reporter) -> dict[str, Any]:
    """Run `spec` in `python -m lsd_edge.bench.worker`; its one JSON line, or a BenchError with its error."""
    spec.write(spec_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lsd_edge.bench.worker", str(spec_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=worker_env(spec.threads),
    )
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    tail: deque[str] = deque(maxlen=50)
    done = 0
    for line in proc.stderr:
        if line.startswith(PROGRESS):
            now = json.loads(line[len(PROGRESS) :])["done"]
            reporter.advance(now - done)
            done = now
        else:
            tail.append(line.rstrip())
    rc = proc.wait()
    reader.join()
    lines = [s for s in out if s.strip()]
    try:
        result = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        result = {}
    if rc != 0 or "error" in result or not result:
        why = result.get("error") or next((s for s in reversed(tail) if s.strip()), f"exit status {rc}")
        if os.environ.get("LSD_EDGE_DEBUG") == "1":
            sys.stderr.write("\n".join(tail) + "\n")
        raise BenchError(f"{spec.name}: the bench worker failed: {why}")
    return result


def roofline(decode_tps: float, weight_bytes: float, bandwidth: float) -> tuple[float, float]:
    """(tokens/s if every decode step only streamed its weights at `bandwidth`, the fraction reached)."""
    top = bandwidth / weight_bytes
    return top, decode_tps / top


def shape_of(target: Target) -> ModelShape:
    """Parameters per group and visual tokens per image from the folder's config.json (or the
    architecture's), counted on the meta device."""
    if target.arch is not None:
        config = target.arch.config()
    else:
        config = LlavaConfig.from_pretrained(str(target.path))
    return ModelShape.of(config)


def efficiency_ratios(rows: list[BenchRow]) -> list[dict[str, Any]]:
    """Each row against the first teacher row: decode speed-up, memory and size ratios, accuracy delta."""
    teacher = next((r for r in rows if r.role == "teacher"), None)
    if teacher is None:
        return []
    out = []
    for r in rows:
        if r is teacher:
            continue
        acc = None
        if r.accuracy is not None and teacher.accuracy is not None:
            acc = r.accuracy - teacher.accuracy
        out.append(
            {
                "name": r.label,
                "vs": teacher.label,
                "decode_speedup": r.decode_tokens_per_s / teacher.decode_tokens_per_s,
                "memory_ratio": r.peak_mem_mb / teacher.peak_mem_mb,
                "size_ratio": r.size_mb / teacher.size_mb,
                "params_ratio": r.params / teacher.params,
                "accuracy_delta": acc,
            }
        )
    return out


def _precision(target: Target, dtype: str) -> str:
    return target.variant if target.backend == "onnx" else SHORT_DTYPE.get(dtype, dtype)


def _torch_dtype(target: Target, settings: BenchSettings) -> str:
    if settings.dtype != "auto":
        return settings.dtype
    if settings.device == "cuda":
        return "bfloat16"
    return target.dtype or "float32"


def make_row(
    target: Target, w: dict[str, Any], precision: str, device: str, shape: ModelShape, bandwidth: float
) -> BenchRow:
    """A worker's measurements with the row's identity, parameters, visual tokens, headline memory
    and roofline."""
    weight_bytes = w["weight_mb_per_token"] * 2**20
    top, frac = roofline(w["decode_tokens_per_s"], weight_bytes, bandwidth) if weight_bytes else (None, None)
    if device == "cuda":
        peak = w["nvml_peak_mb"] or w["cuda_max_allocated_mb"] or w["peak_rss_mb"]
    else:
        peak = w["peak_rss_mb"]
    fields = {k: w[k] for k in BenchRow.__dataclass_fields__ if k in w}
    fields.update(
        name=target.name,
        label=f"{target.name} ({target.backend} {precision})",
        role=target.role,
        backend=target.backend,
        precision=precision,
        device=device,
        path=None if target.path is None else str(target.path),
        peak_mem_mb=float(peak),
        params=int(shape.params["total"]),
        params_by_group=dict(shape.params),
        visual_tokens=int(shape.image_tokens),
        roofline_fraction=frac,
        roofline_tokens_per_s=top,
    )
    return BenchRow(**fields)


def arch_spec(arch, seed: int) -> dict[str, Any]:
    """An architecture as a worker rebuilds it: its LlavaConfig as a dict and the weights' seed."""
    return {"name": arch.name, "config": arch.config().to_dict(), "seed": seed}


def row_spec(t: Target, settings: BenchSettings, prompts, knobs: dict[str, int], threads: int):
    """The worker's instructions for one row, and the row's precision label."""
    dtype = _torch_dtype(t, settings)
    precision = _precision(t, dtype)
    spec = RowSpec(
        name=f"{t.name} ({t.backend} {precision})",
        role=t.role,
        backend=t.backend,
        device=settings.device,
        path=None if t.path is None else str(t.path),
        arch=arch_spec(t.arch, settings.seed) if t.arch is not None and t.backend == "torch" else None,
        variant=t.variant,
        prefill=settings.prefill,
        dtype=dtype,
        threads=threads,
        prompts=prompts.speed,
        eval_items=[] if t.arch is not None else prompts.eval_items,
        eval_max_new_tokens=prompts.eval_max_new_tokens,
        max_new_tokens=knobs["max_new_tokens"],
        repeats=knobs["repeats"],
        warmup=knobs["warmup"],
    )
    return spec, precision


def bench(
    teacher: Path | None = None,
    student: Path | None = None,
    onnx: list[Path] | None = None,
    archs: list[str] | None = None,
    settings: BenchSettings | None = None,
    reporter: Reporter | None = None,
    runs_root: Path = RUNS_ROOT,
    command: str | None = None,
) -> BenchResult:
    """Measure every row in its own process; see the module docstring for what a row holds."""
    settings = settings or BenchSettings()
    reporter = reporter or QuietReporter()
    settings.check()
    llama = None
    if settings.llama_bench is not None or settings.gguf:
        llama = LlamaBench(settings.llama_bench, list(settings.gguf or []))
        llama.check()
    targets, source, run = plan(teacher, student, list(onnx or []), list(archs or []), settings, runs_root)
    knobs = bench_defaults(targets, settings)
    threads = settings.threads or os.cpu_count() or 1
    cache = Path(settings.cache) if settings.cache is not None else arch_exports_dir(runs_root)
    with tempfile.TemporaryDirectory(prefix="lsd-edge-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        prompts = pick_prompts(targets, settings, knobs["prompts"], tmp)
        if prompts.note:
            reporter.message(f"[yellow]{prompts.note}[/yellow]")
        reporter.message(f"measuring memory bandwidth ({settings.copy_mb} MiB copies)")
        if settings.device == "cuda":
            bandwidth = cuda_bandwidth(settings.copy_mb)
        else:
            bandwidth = memory_bandwidth(settings.copy_mb, threads)
        machine = machine_info(settings.device, threads, bandwidth)
        rows = []
        for i, t in enumerate(targets):
            if t.arch is not None and t.backend == "onnx":
                t.path = ensure_arch_export(t.arch, cache, settings.seed, threads, tmp, reporter)
            spec, precision = row_spec(t, settings, prompts, knobs, threads)
            reporter.task(spec.name, spec.warmup + spec.repeats * len(spec.prompts) + len(spec.eval_items))
            w = run_worker(spec, tmp / f"row{i}.json", reporter)
            reporter.done()
            rows.append(make_row(t, w, precision, settings.device, shape_of(t), bandwidth))
        if llama is not None:  # at the depth the other rows decoded at
            reporter.message(f"llama-bench on {len(llama.ggufs)} GGUF file(s)")
            depth = max((r.prompt_tokens for r in rows), default=512)
            rows += llama_rows(llama, threads, depth, knobs["max_new_tokens"], knobs["repeats"], bandwidth)
    machine["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    notes = [prompts.note] if prompts.note else []
    if any(t.arch is not None for t in targets):
        notes.append("--arch rows: random weights at real sizes; accuracy n/a, prompts ShapesVQA questions")
    return BenchResult(
        machine=machine,
        settings={
            **jsonable(settings),
            **knobs,
            "threads": threads,
            "prompt_source": prompts.source,
            "eval_max_new_tokens": prompts.eval_max_new_tokens,
            "accuracy_samples": len(prompts.eval_items),
        },
        results=rows,
        ratios=efficiency_ratios(rows),
        source=source,
        run=run,
        notes=notes,
        command=command,
    )


def ensure_arch_export(arch, cache: Path, seed: int, threads: int, tmp: Path, reporter: Reporter) -> Path:
    """The architecture's cached ONNX export, made once (in a worker) when missing or stale."""
    spec = arch_spec(arch, seed)
    out = arch_export_dir(arch.name, spec["config"], seed, cache)
    if is_current(out, arch.name, spec["config"], seed):
        return out
    reporter.message(
        f"exporting {arch.name} (random weights) to ONNX fp32, int8 and int4 once, into {out}: minutes"
    )
    reporter.task(f"export {arch.name}", 1)
    job = RowSpec(
        name=f"export {arch.name}",
        role=arch.role,
        backend="onnx",
        path=str(out),
        arch=spec,
        threads=threads,
        task="export_arch",
    )
    run_worker(job, tmp / f"export-{arch.name}.json", reporter)
    reporter.advance(1)
    reporter.done()
    return out
