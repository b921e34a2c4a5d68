"""`lsd-edge bench`: teacher vs student vs ONNX student, one subprocess per row, against the roofline.

`bench(...)` plans the rows (the latest run's teacher, student and ONNX exports, given folders, or
random-weight models of real architectures with `--arch`), picks the prompts (the recipe's eval
split, else a generated ShapesVQA set), measures the machine's memory bandwidth once, runs each row
in `lsd_edge.bench_worker` (its own process, so memory is attributable and one allocator does not
pollute the next) and returns a `BenchResult`: per row TTFT p50/p90, decode / prefill / end-to-end
tokens/s, peak memory, size, parameters, exact-match accuracy and the fraction of the bandwidth
roofline the decode reaches; the efficiency ratios against the teacher; the machine. The conventions
are optimum-benchmark's, llama-bench's and vLLM's latency benchmark's: warm-up first, greedy, a
fixed number of new tokens with EOS ignored, percentiles over repeats.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import lsd_edge
from lsd_edge.bench_worker import PROGRESS, RowSpec
from lsd_edge.checkpoint import atomic_dir, write_json
from lsd_edge.errors import BenchError
from lsd_edge.progress import QuietReporter, Reporter

SCHEMA_VERSION = 1
RUNS_ROOT = Path("runs")
DEVICES = ("cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# What every row of the JSON holds (None where a figure does not apply: accuracy with random weights).
RESULT_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "role": (str,),
    "backend": (str,),
    "precision": (str,),
    "device": (str,),
    "decode_tokens_per_s": (float,),
    "prefill_tokens_per_s": (float,),
    "e2e_tokens_per_s": (float,),
    "ttft_ms_p50": (float,),
    "ttft_ms_p90": (float,),
    "peak_mem_mb": (float,),
    "size_mb": (float,),
    "params": (int,),
    "accuracy": (float, type(None)),
    "roofline_fraction": (float, type(None)),
}
MACHINE_FIELDS = ("label", "cores", "memory_gib", "gpu", "bandwidth_gb_s")


@dataclass
class BenchSettings:
    """How rows are measured; None means the recipe's [bench] / [eval] value, else DEFAULTS."""

    device: str = "cpu"
    dtype: str = "auto"  # torch rows: auto = bf16 on CUDA, fp32 on CPU (an --arch teacher: bf16)
    prompts: int | None = None
    max_new_tokens: int | None = None
    repeats: int | None = None
    warmup: int | None = None
    eval_samples: int | None = None  # accuracy questions (default: the recipe's eval.max_samples, all)
    accuracy: bool = True
    data: Path | None = None  # LLaVA-format eval JSON (default: the recipe's eval split)
    images: Path | None = None
    variants: list[str] | None = None  # ONNX variants to measure (default: all in each folder)
    threads: int | None = None  # per worker (default: every core)
    copy_mb: int = 1024  # bandwidth measurement: MiB copied
    cache: Path | None = None  # --arch ONNX exports (default runs/bench-arch)
    seed: int = 0

    def check(self) -> None:
        if self.device not in DEVICES:
            raise BenchError(f"--device {self.device}: choose cpu or cuda")
        if self.dtype not in DTYPES:
            raise BenchError(f"--dtype {self.dtype}: choose one of {', '.join(DTYPES)}")
        for k in ("prompts", "max_new_tokens", "repeats", "threads", "copy_mb", "eval_samples"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise BenchError(f"--{k.replace('_', '-')} {v}: must be at least 1")
        if self.warmup is not None and self.warmup < 0:
            raise BenchError(f"--warmup {self.warmup}: must be 0 or more")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise BenchError("--device cuda: no CUDA device is visible to torch; run with --device cpu")


@dataclass
class Target:
    """One row to measure: a model folder, an export folder and variant, or an architecture."""

    name: str
    role: str
    backend: str
    path: Path | None = None
    variant: str | None = None
    arch: Any = None  # lsd_edge.archs.Arch
    dtype: str | None = None


@dataclass
class BenchRow:
    """One measured row; see RESULT_FIELDS for the ones the JSON schema promises."""

    name: str
    label: str  # name (backend precision): unique within a bench
    role: str
    backend: str
    precision: str
    device: str
    path: str | None
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    e2e_tokens_per_s: float
    ttft_ms_p50: float
    ttft_ms_p90: float
    peak_mem_mb: float
    size_mb: float
    params: int
    accuracy: float | None
    roofline_fraction: float | None
    roofline_tokens_per_s: float | None
    weight_mb_per_token: float
    peak_rss_mb: float
    cuda_max_allocated_mb: float | None
    nvml_peak_mb: float | None
    accuracy_samples: int
    prompt_tokens: int
    new_tokens: int
    runs: int
    load_s: float
    cpu_share: float  # CPU time / (wall time x threads) during the timed runs: < 1 when the cores are shared
    threads: int
    pid: int
    torch_imported: bool
    samples: list[dict] = field(default_factory=list)


@dataclass
class BenchResult:
    machine: dict[str, Any]
    settings: dict[str, Any]
    results: list[BenchRow]
    ratios: list[dict[str, Any]]
    source: str
    run: Path | None = None  # the run folder benchmarked when no model was given
    notes: list[str] = field(default_factory=list)
    command: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "command": self.command,
            "source": self.source,
            "run": None if self.run is None else str(self.run),
            "machine": self.machine,
            "settings": self.settings,
            "results": [asdict(r) for r in self.results],
            "ratios": self.ratios,
            "notes": self.notes,
        }


def check_schema(data: dict[str, Any]) -> list[str]:
    """Problems of a bench JSON against schema version 1 (empty when it conforms)."""
    problems = []
    if data.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version {data.get('schema_version')!r} is not {SCHEMA_VERSION}")
    machine = data.get("machine")
    if not isinstance(machine, dict):
        problems.append("machine: not an object")
    else:
        problems += [f"machine.{k}: missing" for k in MACHINE_FIELDS if k not in machine]
    results = data.get("results")
    if not isinstance(results, list) or not results:
        return problems + ["results: not a non-empty list"]
    for i, row in enumerate(results):
        for k, types in RESULT_FIELDS.items():
            if k not in row:
                problems.append(f"results[{i}].{k}: missing")
            elif not isinstance(row[k], types) or isinstance(row[k], bool):
                problems.append(f"results[{i}].{k}: {type(row[k]).__name__}, not {types[0].__name__}")
    return problems


# ------------------------------------------------------------------------------------------- planning


def latest_run(runs_root: Path = RUNS_ROOT) -> Path:
    """The run folder under `runs_root` whose report.json is newest and that has teacher/ and student/."""
    runs = [
        p.parent
        for p in Path(runs_root).glob("*/report.json")
        if all((p.parent / m / "config.json").is_file() for m in ("teacher", "student"))
    ]
    if not runs:
        raise BenchError(
            f"no models given and no finished run under {runs_root}/ (a folder with teacher/, student/ and "
            "report.json); run `lsd-edge distill recipes/tiny.toml`, or give --teacher/--student/--onnx/--arch"
        )
    return max(runs, key=lambda r: (r / "report.json").stat().st_mtime)


def run_exports(run: Path) -> list[Path]:
    """The ONNX export folders of a run: `<run>/onnx` (export's default) and other `onnx*` folders."""
    from lsd_edge.onnx_runner import variants_in

    return sorted(
        p for p in run.glob("onnx*") if p.is_dir() and not p.name.endswith(".failed") and variants_in(p)
    )


def _model_folder(path: Path, flag: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise BenchError(f"{flag} {path}: no such folder; give a model folder written by lsd-edge distill")
    if any(path.glob("*.onnx")):
        raise BenchError(f"{flag} {path}: an ONNX export folder; pass it with --onnx")
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise BenchError(
            f"{flag} {path}: no config.json and *.safetensors; give a model folder written by lsd-edge distill"
        )
    return path


def _onnx_targets(folders: list[Path], variants: list[str] | None) -> list[Target]:
    from lsd_edge.onnx_runner import VARIANT_SUFFIX, variants_in

    for v in variants or []:
        if v not in VARIANT_SUFFIX:
            raise BenchError(f"--variant {v}: choose one of {', '.join(VARIANT_SUFFIX)}")
    targets = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise BenchError(f"--onnx {folder}: no such folder; run `lsd-edge export` first")
        have = variants_in(folder)
        if not have:
            raise BenchError(
                f"--onnx {folder}: no complete set of ONNX graphs (vision_encoder, embed_tokens, "
                "decoder_model_merged); give a folder written by `lsd-edge export`"
            )
        chosen = [v for v in have if variants is None or v in variants]
        if not chosen:
            raise BenchError(
                f"--onnx {folder}: has {', '.join(have)}, none of --variant {', '.join(variants)}"
            )
        name = "student" if len(folders) == 1 else folder.name
        targets += [Target(name, "student", "onnx", folder, v) for v in chosen]
    return targets


def plan(
    teacher: Path | None,
    student: Path | None,
    onnx: list[Path],
    archs: list[str],
    settings: BenchSettings,
    runs_root: Path = RUNS_ROOT,
) -> tuple[list[Target], str, Path | None]:
    """The rows to measure, where they came from, and the run folder when nothing was given (then
    the latest run under `runs_root`)."""
    from lsd_edge.archs import ARCHS

    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise BenchError(f"--arch {unknown[0]}: unknown; choose from {', '.join(ARCHS)}")
    run = None
    if teacher is None and student is None and not onnx and not archs:
        run = latest_run(runs_root)
        teacher, student, onnx = run / "teacher", run / "student", run_exports(run)
        source = f"latest run {run}"
    else:
        source = "given models"
    targets = []
    if teacher is not None:
        targets.append(Target("teacher", "teacher", "torch", _model_folder(teacher, "--teacher")))
    if student is not None:
        targets.append(Target("student", "student", "torch", _model_folder(student, "--student")))
    targets += _onnx_targets(onnx, settings.variants)
    for name in archs:
        a = ARCHS[name]
        targets.append(Target(a.name, a.role, "torch", arch=a, dtype=a.dtype))
        if a.onnx:
            targets += [
                Target(a.name, a.role, "onnx", variant=v, arch=a) for v in settings.variants or ["int8"]
            ]
    if archs:
        source = (
            f"{source if teacher or student or onnx else 'real architectures'}, random weights: "
            + ", ".join(archs)
        )
    return targets, source, run


# -------------------------------------------------------------------------------------------- prompts


@dataclass
class Prompts:
    """Speed prompts (each with an image), accuracy questions, and where they came from."""

    speed: list[dict]
    eval_items: list[dict]
    eval_max_new_tokens: int
    source: str
    note: str | None = None


def _recipe_of(folders: list[Path]):
    from lsd_edge.export import _model_recipe

    for f in folders:
        if f is not None and (r := _model_recipe(Path(f))) is not None:
            return r
    return None


def eval_questions(data: Path, images: Path | None, limit: int | None) -> list[dict]:
    """Single-image questions of a LLaVA-format eval file: each record's first question and answer.

    Records with another number of images, or that do not parse, are skipped; a record's later turns
    are not asked (the runners take one image and one question).
    """
    from lsd_edge.data.llava import BadSample, load_image, read_records, record_images, to_messages
    from lsd_edge.evaluate import default_image_dir

    image_dir = Path(images) if images is not None else default_image_dir(data)
    out = []
    for rec in read_records(data):
        if limit is not None and len(out) >= limit:
            break
        try:
            messages, n_images = to_messages(rec, max_turns=1)
            files = record_images(rec)
            if n_images != 1 or len(files) != 1:
                continue
            load_image(image_dir / files[0])  # a missing or corrupt image is skipped here, not in a worker
        except BadSample:
            continue
        question = " ".join(c["text"] for c in messages[0]["content"] if c["type"] == "text")
        answer = " ".join(c["text"] for c in messages[1]["content"] if c["type"] == "text")
        out.append({"image": str((image_dir / files[0]).resolve()), "question": question, "answer": answer})
    return out


def synthetic_prompts(n: int, out: Path, seed: int = 0) -> list[dict]:
    """ShapesVQA eval questions generated into `out`: real images and questions, no trained answers."""
    from lsd_edge.data.shapes import generate

    generate(out, seed=seed, n_train=1, n_eval=n, image_size=48, questions_per_image=1)
    return eval_questions(out / "eval.json", out / "images", n)


def pick_prompts(targets: list[Target], settings: BenchSettings, n: int, tmp: Path) -> Prompts:
    """The recipe's eval split (or --data) for speed prompts and accuracy; generated ShapesVQA without it."""
    recipe = _recipe_of([t.path for t in targets if t.path is not None])
    data, images, note = settings.data, settings.images, None
    if data is None and recipe is not None and recipe.data.eval is not None:
        data, images = recipe.data.resolve(recipe.data.eval)
        if not data.is_file():
            note = f"the recipe's eval data {data} is not here (pass --data): accuracy is n/a"
            data = None
    if data is not None and not Path(data).is_file():
        raise BenchError(f"--data {data}: no such file; give a LLaVA-format eval JSON")
    max_new = recipe.eval.max_new_tokens if recipe is not None else 8
    if data is None:
        speed = synthetic_prompts(n, tmp / "shapes", settings.seed)
        return Prompts(speed, [], max_new, "generated ShapesVQA (no eval data)", note)
    limit = settings.eval_samples or (recipe.eval.max_samples if recipe is not None else None)
    items = eval_questions(Path(data), images, None if not settings.accuracy else limit)
    if not items:
        raise BenchError(f"{data}: no single-image question to ask; give an eval file with images")
    speed = [{k: it[k] for k in ("image", "question")} for it in items[:n]]
    if len(speed) < n:  # a small eval set: cycle through it
        speed = [speed[i % len(speed)] for i in range(n)]
    return Prompts(speed, items if settings.accuracy else [], max_new, str(data), note)


def bench_defaults(targets: list[Target], settings: BenchSettings) -> dict[str, int]:
    """prompts, max_new_tokens, repeats, warmup: the command line's, else the [bench] table of the
    models' recipe, else BenchConfig's defaults."""
    from lsd_edge.config import BenchConfig

    recipe = _recipe_of([t.path for t in targets if t.path is not None])
    table = recipe.bench if recipe is not None else BenchConfig()
    return {
        k: v if (v := getattr(settings, k)) is not None else getattr(table, k)
        for k in BenchConfig.model_fields
    }


# ----------------------------------------------------------------------------------------- machine


def memory_bandwidth(mb: int = 1024, threads: int | None = None, repeats: int = 5) -> float:
    """Bytes/s of the best of `repeats` copies of `mb` MiB with `threads` threads (numpy releases the
    GIL in a copy), counted as STREAM's copy counts: bytes read + bytes written."""
    threads = threads or os.cpu_count() or 1
    n = mb * 2**20 // 8
    src = np.ones(n)
    dst = np.zeros(n)  # touched, so page faults are not timed
    bounds = np.linspace(0, n, threads + 1, dtype=np.int64)
    parts = [(src[a:b], dst[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(lambda p: np.copyto(p[1], p[0]), parts))
            best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def cuda_bandwidth(mb: int = 1024, repeats: int = 5) -> float:
    """Bytes/s of the best device-to-device copy of `mb` MiB (read + write)."""
    import torch

    src = torch.ones(mb * 2**18, device="cuda")
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy warms the allocator up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    return 2 * src.numel() * 4 / best


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str, threads: int, bandwidth: float) -> dict[str, Any]:
    import onnxruntime
    import psutil
    import torch
    import transformers

    cores = os.cpu_count() or 1
    mem = psutil.virtual_memory().total / 2**30
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    label = f"{cores} cores, {mem:.0f} GiB, {gpu or 'no GPU'} ({_cpu_name()}, {platform.machine()})"
    return {
        "label": label,
        "cpu": _cpu_name(),
        "cores": cores,
        "memory_gib": round(mem, 1),
        "gpu": gpu,
        "device": device,
        "threads_per_worker": threads,
        "bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "bandwidth_method": (
            "best device-to-device torch copy, read + write bytes"
            if device == "cuda"
            else f"best of 5 numpy copies on {threads} thread(s), read + write bytes"
        ),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "lsd_edge": lsd_edge.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }


# --------------------------------------------------------------------------------------- --arch exports


def arch_spec(arch, seed: int) -> dict[str, Any]:
    config, _ = arch.build()
    return {"name": arch.name, "config": config.to_dict(), "seed": seed}


def arch_export_dir(arch, cache: Path, seed: int) -> Path:
    """Where an architecture's ONNX export is cached: keyed by its config, seed and lsd-edge version."""
    spec = arch_spec(arch, seed)
    key = json.dumps([spec["config"], seed, lsd_edge.__version__], sort_keys=True, default=str)
    return cache / f"{arch.name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def export_arch(spec: RowSpec) -> Path:
    """Random weights of `spec.arch` in fp32 -> the three graphs and their int8 variant in `spec.path`,
    with the processor files the ONNX runner reads. Runs in a worker: the fp32 model and the exporter
    take several times the weights' memory, which the bench process should not keep.

    The parity gate of `lsd-edge export` is not run: random weights have no accuracy to keep, and the
    gate is tested on trained tiny models.
    """
    import torch
    from transformers import LlavaConfig

    from lsd_edge.archs import arch_processor
    from lsd_edge.export import _versions, export_graphs, quantize_graphs, sizes_mb
    from lsd_edge.memory import random_model
    from lsd_edge.onnx_runner import REPORT

    torch.set_num_threads(spec.threads)
    config = LlavaConfig.from_dict(spec.arch["config"])
    processor = arch_processor(config.vision_config.image_size, config.vision_config.patch_size)
    t0 = time.perf_counter()
    with atomic_dir(Path(spec.path)) as tmp:
        model = random_model(config, torch.float32, torch.device("cpu"), spec.arch["seed"])
        export_graphs(model, tmp)
        del model
        quantize_graphs(tmp, "int8", "cpu")
        config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json(
            tmp / REPORT,
            {
                "arch": spec.arch["name"],
                "random_weights": True,
                "default_variant": "int8",
                "variants": ["fp32", "int8"],
                "sizes_mb": sizes_mb(tmp, ["fp32", "int8"]),
                "seconds": round(time.perf_counter() - t0, 1),
                "versions": _versions(),
            },
        )
    return Path(spec.path)


# -------------------------------------------------------------------------------------------- workers


def _worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    # The worker imports this copy of lsd_edge, whatever the working directory.
    root = str(Path(lsd_edge.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_worker(spec: RowSpec, spec_path: Path, reporter: Reporter) -> dict[str, Any]:
    """Run `spec` in `python -m lsd_edge.bench_worker`; its one JSON line, or a BenchError with its error."""
    spec.write(spec_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lsd_edge.bench_worker", str(spec_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_worker_env(spec.threads),
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


# --------------------------------------------------------------------------------------------- results


def roofline(decode_tps: float, weight_bytes: float, bandwidth: float) -> tuple[float, float]:
    """(tokens/s if every decode step only streamed its weights at `bandwidth`, the fraction reached)."""
    top = bandwidth / weight_bytes
    return top, decode_tps / top


def params_of(target: Target) -> int:
    """Parameters from the folder's config.json (or the architecture's), counted on the meta device."""
    from transformers import LlavaConfig

    from lsd_edge.memory import ModelShape

    if target.arch is not None:
        config, _ = target.arch.build()
    else:
        config = LlavaConfig.from_pretrained(str(target.path))
    return ModelShape.of(config).params["total"]


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
    target: Target, w: dict[str, Any], precision: str, device: str, params: int, bandwidth: float
) -> BenchRow:
    """A worker's measurements with the row's identity, parameters, headline memory and roofline."""
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
        params=int(params),
        roofline_fraction=frac,
        roofline_tokens_per_s=top,
    )
    return BenchRow(**fields)


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
    targets, source, run = plan(teacher, student, list(onnx or []), list(archs or []), settings, runs_root)
    knobs = bench_defaults(targets, settings)
    threads = settings.threads or os.cpu_count() or 1
    cache = Path(settings.cache) if settings.cache is not None else Path(runs_root) / "bench-arch"
    with tempfile.TemporaryDirectory(prefix="lsd-edge-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        prompts = pick_prompts(targets, settings, knobs["prompts"], tmp)
        if prompts.note:
            reporter.message(f"[yellow]{prompts.note}[/yellow]")
        reporter.message(f"measuring memory bandwidth ({settings.copy_mb} MiB copies)")
        bandwidth = (
            cuda_bandwidth(settings.copy_mb)
            if settings.device == "cuda"
            else memory_bandwidth(settings.copy_mb, threads)
        )
        machine = machine_info(settings.device, threads, bandwidth)
        rows = []
        for i, t in enumerate(targets):
            if t.arch is not None and t.backend == "onnx":
                t.path = _ensure_arch_export(t.arch, cache, settings.seed, threads, tmp, reporter)
            dtype = _torch_dtype(t, settings)
            precision = _precision(t, dtype)
            spec = RowSpec(
                name=f"{t.name} ({t.backend} {precision})",
                role=t.role,
                backend=t.backend,
                device=settings.device,
                path=None if t.path is None else str(t.path),
                arch=arch_spec(t.arch, settings.seed)
                if t.arch is not None and t.backend == "torch"
                else None,
                variant=t.variant,
                dtype=dtype,
                threads=threads,
                prompts=prompts.speed,
                eval_items=[] if t.arch is not None else prompts.eval_items,
                eval_max_new_tokens=prompts.eval_max_new_tokens,
                max_new_tokens=knobs["max_new_tokens"],
                repeats=knobs["repeats"],
                warmup=knobs["warmup"],
            )
            reporter.task(spec.name, spec.warmup + spec.repeats * len(spec.prompts) + len(spec.eval_items))
            w = run_worker(spec, tmp / f"row{i}.json", reporter)
            reporter.done()
            rows.append(make_row(t, w, precision, settings.device, params_of(t), bandwidth))
    machine["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    notes = [prompts.note] if prompts.note else []
    if any(t.arch is not None for t in targets):
        notes.append("--arch rows: random weights at real sizes; accuracy n/a, prompts ShapesVQA questions")
    return BenchResult(
        machine=machine,
        settings={
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
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


def _ensure_arch_export(arch, cache: Path, seed: int, threads: int, tmp: Path, reporter: Reporter) -> Path:
    from lsd_edge.onnx_runner import REPORT

    out = arch_export_dir(arch, cache, seed)
    if (out / REPORT).is_file():
        return out
    reporter.message(f"exporting {arch.name} (random weights) to ONNX int8 once, into {out}: minutes")
    reporter.task(f"export {arch.name}", 1)
    spec = RowSpec(
        name=f"export {arch.name}",
        role=arch.role,
        backend="onnx",
        path=str(out),
        arch=arch_spec(arch, seed),
        threads=threads,
        task="export_arch",
    )
    run_worker(spec, tmp / f"export-{arch.name}.json", reporter)
    reporter.advance(1)
    reporter.done()
    return out


# ---------------------------------------------------------------------------------------------- output


def write_result(result: BenchResult, path: Path) -> Path:
    write_json(path, result.as_dict())
    return Path(path)


def plot(result: BenchResult, path: Path) -> Path:
    """Decode tokens/s and peak memory bars per row, accuracy and roofline fraction written on them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.results
    labels = [f"{r.name}\n{r.backend} {r.precision}" for r in rows]
    y = np.arange(len(rows))
    colors = [
        "#c44e52" if r.role == "teacher" else "#4c72b0" if r.backend == "torch" else "#55a868" for r in rows
    ]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 1.0 + 0.7 * len(rows)), sharey=True)
    speed = [r.decode_tokens_per_s for r in rows]
    ax1.barh(y, speed, color=colors)
    for i, r in enumerate(rows):
        acc = "acc n/a" if r.accuracy is None else f"acc {100 * r.accuracy:.1f}%"
        roof = "" if r.roofline_fraction is None else f", {fmt_percent(r.roofline_fraction)} of roofline"
        ax1.text(speed[i], i, f" {acc}{roof}", va="center", fontsize=8)
    ax1.set_yticks(y, labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("decode tokens/s (higher is better)")
    ax1.set_xlim(0, max(speed) * 1.6)
    mem = [r.peak_mem_mb for r in rows]
    ax2.barh(y, mem, color=colors)
    for i, m in enumerate(mem):
        ax2.text(m, i, f" {m:,.0f} MB", va="center", fontsize=8)
    ax2.set_xlabel("peak memory MB (lower is better)")
    ax2.set_xlim(0, max(mem) * 1.3)
    fig.suptitle(f"lsd-edge bench: {result.machine['label']}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fmt_percent(f: float | None) -> str:
    if f is None:
        return "n/a"
    return f"{100 * f:.1f}%" if f < 0.1 else f"{100 * f:.0f}%"


def to_markdown(result: BenchResult) -> str:
    """The table and the ratio lines as Markdown, for docs and reports."""
    head = (
        "| model | backend | decode tok/s | prefill tok/s | TTFT p50 / p90 ms | e2e tok/s | peak MB "
        "| size MB | params | accuracy | roofline |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in result.results:
        lines.append(
            f"| {r.name} | {r.backend} {r.precision} | {r.decode_tokens_per_s:,.1f} | "
            f"{r.prefill_tokens_per_s:,.0f} | {r.ttft_ms_p50:,.1f} / {r.ttft_ms_p90:,.1f} | "
            f"{r.e2e_tokens_per_s:,.1f} | {r.peak_mem_mb:,.0f} | {r.size_mb:,.2f} | {r.params:,} | "
            f"{fmt_percent(r.accuracy)} | {fmt_percent(r.roofline_fraction)} |"
        )
    lines.append("")
    for q in result.ratios:
        delta = "n/a" if q["accuracy_delta"] is None else f"{100 * q['accuracy_delta']:+.1f} points"
        lines.append(
            f"- {q['name']} vs {q['vs']}: decode **{q['decode_speedup']:.2f}x**, peak memory "
            f"{q['memory_ratio']:.2f}x, size {q['size_ratio']:.3f}x, accuracy {delta}"
        )
    return "\n".join(lines) + "\n"
