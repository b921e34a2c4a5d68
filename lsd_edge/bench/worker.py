"""One bench row in a process of its own: load one model, warm up, time generations, read memory, score.

`python -m lsd_edge.bench.worker SPEC.json` reads a `RowSpec`, prints exactly one JSON line on stdout
(the row's measurements, or {"error": "..."} with exit status 1) and reports progress on stderr as
`PROGRESS {"done": k, "total": n}` lines. Memory figures are this process's own: peak RSS on the CPU,
`torch.cuda.max_memory_allocated` and NVML's per-process figure (when pynvml is installed) on CUDA.
Nothing here imports torch unless the row is a PyTorch one, so an ONNX row's memory is ONNX
Runtime's alone and its `torch_imported` field proves it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lsd_edge.data.questions import EvalItem
from lsd_edge.errors import LsdEdgeError, RuntimeModelError
from lsd_edge.evaluate.accuracy import evaluate_answers
from lsd_edge.runtime.memory import peak_rss_mb
from lsd_edge.runtime.onnx.layout import graph_file

PROGRESS = "PROGRESS "


@dataclass
class RowSpec:
    """What one worker measures. `prompts` and `eval_items`: {"image": path or None, "question", "answer"}."""

    name: str
    role: str  # teacher | student
    backend: str  # torch | onnx
    device: str = "cpu"
    path: str | None = None  # a model folder (torch) or an export folder (onnx)
    arch: dict | None = None  # {"config": LlavaConfig dict, "seed": int}: random weights, torch only
    variant: str | None = None  # onnx: fp32 | int8 | int4 | fp16
    prefill: str = "auto"  # onnx: auto | gemm | exported (OnnxRunner)
    dtype: str = "float32"  # torch
    threads: int = 1
    prompts: list[dict] = field(default_factory=list)
    eval_items: list[dict] = field(default_factory=list)
    max_new_tokens: int = 128
    repeats: int = 3
    warmup: int = 1
    eval_max_new_tokens: int = 8
    task: str = "measure"  # measure | export_arch (see lsd_edge.export.onnx.arch)

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self)), encoding="utf-8")
        return path


def progress(done: int, total: int) -> None:
    print(PROGRESS + json.dumps({"done": done, "total": total}), file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def split_p50(gens: list) -> dict[str, float | None]:
    """The median of each part of the time to first token (`Generation.vision_s`, `prefill_s`,
    `first_token_s`) in ms; a part no generation timed (vision without an image) is None. Each is
    its own median: their sum is close to, not exactly, the TTFT's median."""
    out = {}
    for key, part in (("vision", "vision_s"), ("prefill", "prefill_s"), ("first_token", "first_token_s")):
        values = [v for g in gens if (v := getattr(g, part)) is not None]
        out[f"{key}_ms_p50"] = percentile([1000 * v for v in values], 50) if values else None
    return out


def summarize(gens: list) -> dict[str, Any]:
    """Medians (decode, prefill, end-to-end tokens/s), TTFT p50/p90 and the median of each part of
    the TTFT (`split_p50`) of timed `Generation`s."""
    ttft = [1000 * g.ttft_s for g in gens]
    return {
        **split_p50(gens),
        "runs": len(gens),
        "prompt_tokens": int(np.median([g.prompt_tokens for g in gens])),
        "new_tokens": int(np.median([g.new_tokens for g in gens])),
        "ttft_ms_p50": percentile(ttft, 50),
        "ttft_ms_p90": percentile(ttft, 90),
        "decode_tokens_per_s": percentile([g.decode_tokens_per_s for g in gens], 50),
        "prefill_tokens_per_s": percentile([g.prefill_tokens_per_s for g in gens], 50),
        "e2e_tokens_per_s": percentile([g.e2e_tokens_per_s for g in gens], 50),
        "samples": [
            {
                "ttft_ms": round(1000 * g.ttft_s, 3),
                # the same generation's TTFT in parts: vision + prefill + first token = ttft_ms
                **{
                    f"{k}_ms": None if (v := ms(getattr(g, f"{k}_s"))) is None else round(v, 3)
                    for k in ("vision", "prefill", "first_token")
                },
                "decode_tokens_per_s": round(g.decode_tokens_per_s, 2),
                "prompt_tokens": g.prompt_tokens,
                "new_tokens": g.new_tokens,
            }
            for g in gens
        ],
    }


class NvmlPeak:
    """Highest GPU memory NVML attributes to this process, sampled every 20 ms (None without pynvml)."""

    def __init__(self) -> None:
        self.peak: int | None = None
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # not installed, or no driver: the row reports torch's figure only
            self._thread = None
            return
        self._nvml = pynvml
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        nv, pid = self._nvml, os.getpid()
        handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(nv.nvmlDeviceGetCount())]
        while not self._stop.wait(0.02):
            used = 0
            for h in handles:
                for p in nv.nvmlDeviceGetComputeRunningProcesses(h):
                    if p.pid == pid and p.usedGpuMemory:
                        used += p.usedGpuMemory
            self.peak = max(self.peak or 0, used)

    def stop(self) -> float | None:
        if self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        return None if not self.peak else self.peak / 2**20


# ------------------------------------------------------------------------------------------- runners


def onnx_decode_bytes(runner) -> int:
    """Bytes of the decoder graph (and its external data): every weight it holds is read per step."""
    f = runner.path / graph_file("decoder_model_merged", runner.variant)
    data = f.with_name(f.name + "_data")
    return f.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def load(spec: RowSpec):
    """The row's runner and the weight bytes one decode step reads. Each backend is imported only for
    its own rows: an ONNX row's memory is ONNX Runtime's alone, with no torch in the process."""
    if spec.backend == "torch":
        from lsd_edge.bench.torch_rows import torch_decode_bytes, torch_runner

        runner = torch_runner(spec)
        return runner, torch_decode_bytes(runner.model)
    if spec.backend == "onnx":
        from lsd_edge.runtime.onnx.runner import OnnxRunner

        runner = OnnxRunner(
            spec.path,
            device=spec.device,
            name=spec.name,
            variant=spec.variant,
            threads=spec.threads,
            prefill=spec.prefill,
        )
        return runner, onnx_decode_bytes(runner)
    raise RuntimeModelError(f"backend '{spec.backend}': choose torch or onnx")


def open_image(path: str | None):
    """The image as the file holds it: each runner converts modes the way its users get."""
    if path is None:
        return None
    with Image.open(path) as im:
        im.load()
        return im.copy()


# -------------------------------------------------------------------------------------------- measure


def eval_items(runner, items: list[dict]) -> list[EvalItem]:
    """The spec's questions as eval items, prompted by the row's own runner (its chat template)."""
    out = []
    for k, it in enumerate(items):
        image = open_image(it["image"])
        ids = runner.prompt_ids(it["question"], image is not None)
        out.append(EvalItem(str(k), "all", ids, [] if image is None else [image], it["answer"]))
    return out


def measure(spec: RowSpec) -> dict[str, Any]:
    """Load, warm up, time `repeats` x `prompts` greedy generations of exactly `max_new_tokens`
    tokens (stop tokens ignored), read memory, then score exact match on `eval_items` (the one accuracy
    path, `lsd_edge.evaluate.accuracy`)."""
    cuda = spec.device == "cuda"
    nvml = NvmlPeak() if cuda else None
    total = spec.warmup + spec.repeats * len(spec.prompts) + len(spec.eval_items)
    done = 0

    def tick():
        nonlocal done
        done += 1
        progress(done, total)

    t0 = time.perf_counter()
    runner, decode_bytes = load(spec)
    load_s = time.perf_counter() - t0
    images = [open_image(p["image"]) for p in spec.prompts]
    for _ in range(spec.warmup):
        runner.generate(images[0], spec.prompts[0]["question"], spec.max_new_tokens, ignore_eos=True)
        tick()
    gens = []
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(spec.repeats):
        for img, p in zip(images, spec.prompts, strict=True):
            gens.append(runner.generate(img, p["question"], spec.max_new_tokens, ignore_eos=True))
            tick()
    # CPU seconds of all the process's threads per second of wall time per thread: well below 1 on a
    # busy machine, where other processes hold the cores. An ONNX row counts the threads its graphs
    # use (a small graph gets fewer than asked for).
    used = max((runner.info().get("threads") or {}).values(), default=spec.threads)
    cpu_share = (time.process_time() - cpu0) / ((time.perf_counter() - wall0) * used)
    row: dict[str, Any] = {"pid": os.getpid(), "load_s": load_s, "cpu_share": cpu_share, **summarize(gens)}
    row["peak_rss_mb"] = peak_rss_mb()
    row["cuda_max_allocated_mb"] = row["nvml_peak_mb"] = None
    if cuda:
        row["nvml_peak_mb"] = nvml.stop()
        if "torch" in sys.modules:
            torch = sys.modules["torch"]
            row["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    row["accuracy"] = None
    if spec.eval_items:  # one question at a time through the decode loop, as the rows are timed
        items = eval_items(runner, spec.eval_items)
        row["accuracy"] = evaluate_answers(
            runner, items, spec.eval_max_new_tokens, progress=lambda done, total: tick()
        ).accuracy
    row["accuracy_samples"] = len(spec.eval_items)
    info = runner.info()
    row.update(
        size_mb=info["size_mb"],
        weight_mb_per_token=decode_bytes / 2**20,
        info=info,
        threads=spec.threads,
        torch_imported="torch" in sys.modules,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Libraries print to stdout (C code included): send fd 1 to stderr while working, so stdout
    # carries only the result line.
    result_fd = os.dup(1)
    os.dup2(2, 1)

    def reply(obj: dict) -> None:
        sys.stdout.flush()
        os.write(result_fd, (json.dumps(obj) + "\n").encode())

    if len(argv) != 1:
        reply({"error": "usage: python -m lsd_edge.bench.worker SPEC.json"})
        return 2
    try:
        spec = RowSpec(**json.loads(Path(argv[0]).read_text(encoding="utf-8")))
        if spec.task == "export_arch":
            from lsd_edge.export.onnx.arch import export_arch  # torch and the exporter: this task only

            a = spec.arch
            result = {
                "output": str(export_arch(a["name"], a["config"], a["seed"], Path(spec.path), spec.threads))
            }
        else:
            result = measure(spec)
    except LsdEdgeError as e:
        reply({"error": str(e)})
        return 1
    except Exception as e:  # the parent turns this into one line; the traceback stays on stderr
        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:300]
        reply({"error": f"{type(e).__name__}: {first}"})
        return 1
    reply(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
