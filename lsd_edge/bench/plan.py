"""What a bench measures: the rows (models, exports, architectures), the prompts and the settings.

Rows default to the latest run's teacher, student and ONNX exports; prompts to the models' recipe's
eval split (its single-image questions), else a generated ShapesVQA set; prompts, new tokens,
repeats and warm-up to the recipe's [bench] table, else its defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lsd_edge.data.questions import first_questions
from lsd_edge.data.shapes import generate
from lsd_edge.errors import BenchError
from lsd_edge.models import archs as archs_module
from lsd_edge.recipe.load import folder_recipe
from lsd_edge.recipe.schema import BenchConfig
from lsd_edge.runtime.onnx.layout import VARIANT_SUFFIX, variants_in
from lsd_edge.runtime.onnx.prefill import PREFILL_MODES
from lsd_edge.workspace import RUNS_ROOT, is_export_folder, is_model_folder, latest_run

DEVICES = ("cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


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
    prefill: str = "auto"  # ONNX rows: OnnxRunner's prompt path (auto | gemm | exported)
    threads: int | None = None  # per worker (default: every core)
    copy_mb: int = 1024  # bandwidth measurement: MiB copied
    cache: Path | None = None  # --arch ONNX exports (default runs/bench-arch)
    seed: int = 0
    llama_bench: Path | None = None  # a llama.cpp `llama-bench` binary, run on each of `gguf`
    gguf: list[Path] | None = None

    def check(self) -> None:
        if self.device not in DEVICES:
            raise BenchError(f"--device {self.device}: choose cpu or cuda")
        if self.dtype not in DTYPES:
            raise BenchError(f"--dtype {self.dtype}: choose one of {', '.join(DTYPES)}")
        for k in ("prompts", "max_new_tokens", "repeats", "threads", "copy_mb", "eval_samples"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise BenchError(f"--{k.replace('_', '-')} {v}: must be at least 1")
        if self.prefill not in PREFILL_MODES:
            raise BenchError(f"--prefill {self.prefill}: choose one of {', '.join(PREFILL_MODES)}")
        if self.warmup is not None and self.warmup < 0:
            raise BenchError(f"--warmup {self.warmup}: must be 0 or more")
        if self.device == "cuda":
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
    arch: Any = None  # lsd_edge.models.archs.Arch
    dtype: str | None = None


def model_folder(path: Path, flag: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise BenchError(f"{flag} {path}: no such folder; give a model folder written by lsd-edge distill")
    if is_export_folder(path):
        raise BenchError(f"{flag} {path}: an ONNX export folder; pass it with --onnx")
    if not is_model_folder(path) or not any(path.glob("*.safetensors")):
        raise BenchError(
            f"{flag} {path}: no config.json and *.safetensors; give a model folder written by lsd-edge distill"
        )
    return path


def onnx_targets(folders: list[Path], variants: list[str] | None) -> list[Target]:
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
    known = archs_module.ARCHS
    unknown = [a for a in archs if a not in known]
    if unknown:
        raise BenchError(f"--arch {unknown[0]}: unknown; choose from {', '.join(known)}")
    run = None
    if teacher is None and student is None and not onnx and not archs:
        ws = latest_run(runs_root)
        if ws is None:
            raise BenchError(
                f"no models given and no finished run under {runs_root}/ (a folder with student/ and "
                "report.json); run `lsd-edge distill recipes/tiny.toml`, or give --teacher/--student/--onnx/--arch"
            )
        teacher = ws.teacher_model()
        if teacher is None:
            raise BenchError(
                f"the latest run {ws.root} has no teacher folder here (its teacher.path is not a local "
                "folder); give --teacher DIR"
            )
        run, student = ws.root, ws.student
        onnx = [p for p in ws.exports() if variants_in(p)]
        source = f"latest run {run}"
    else:
        source = "given models"
    targets = []
    if teacher is not None:
        targets.append(Target("teacher", "teacher", "torch", model_folder(teacher, "--teacher")))
    if student is not None:
        targets.append(Target("student", "student", "torch", model_folder(student, "--student")))
    targets += onnx_targets(onnx, settings.variants)
    for name in archs:
        a = known[name]
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


@dataclass
class Prompts:
    """Speed prompts (each with an image), accuracy questions, and where they came from."""

    speed: list[dict]
    eval_items: list[dict]
    eval_max_new_tokens: int
    source: str
    note: str | None = None


def recipe_of(folders: list[Path]):
    """The recipe.toml of the first model folder that has one (the run's settings), or None."""
    for f in folders:
        if f is not None and (r := folder_recipe(Path(f))) is not None:
            return r
    return None


def eval_questions(data: Path, images: Path | None, limit: int | None) -> list[dict]:
    """The runners' prompts: each single-image record's first question, with its image's full path."""
    return [
        {"image": str(q.image.resolve()), "question": q.question, "answer": q.answer}
        for q in first_questions(data, images, limit)
    ]


def synthetic_prompts(n: int, out: Path, seed: int = 0) -> list[dict]:
    """ShapesVQA eval questions generated into `out`: real images and questions, no trained answers."""
    generate(out, seed=seed, n_train=1, n_eval=n, image_size=48, questions_per_image=1)
    return eval_questions(out / "eval.json", out / "images", n)


def pick_prompts(targets: list[Target], settings: BenchSettings, n: int, tmp: Path) -> Prompts:
    """The recipe's eval split (or --data) for speed prompts and accuracy; generated ShapesVQA without it."""
    recipe = recipe_of([t.path for t in targets if t.path is not None])
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
    recipe = recipe_of([t.path for t in targets if t.path is not None])
    table = recipe.bench if recipe is not None else BenchConfig()
    return {
        k: v if (v := getattr(settings, k)) is not None else getattr(table, k)
        for k in BenchConfig.model_fields
    }
