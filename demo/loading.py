"""What the demo shows: which model folders (the latest run by default), their runners with the memory
they took, and ShapesVQA example images with questions.

Memory is measured once per model at start-up, one model at a time, so the figures are that model's
own: the peak growth of the process's resident memory (RSS) while its runner loads and answers one
question (weights may be read in lazily, at the first answer), plus, for PyTorch models, the bytes
of its weights (and on CUDA the allocator's peak). While the page runs, both models answer at once,
so an RSS figure taken per request would mix them.
"""

from __future__ import annotations

import gc
import json
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from PIL import Image

from lsd_edge.errors import LsdEdgeError, ModelError
from lsd_edge.infer import Runner, load_runner
from lsd_edge.textgen import Generation

RUNS_ROOT = Path("runs")
WARMUP_QUESTION = "what is in the image ?"
MiB = 2**20


# ---------------------------------------------------------------------------------------- locating


@dataclass
class ModelPaths:
    """The folders the demo loads: a teacher, and a student as PyTorch weights, an ONNX export, or both."""

    teacher: Path
    student: Path | None  # HF weights
    onnx: Path | None  # export folder
    run: Path | None = None  # the run they came from, when taken from runs/
    notes: list[str] = field(default_factory=list)  # what the page should say is missing


def _is_onnx(folder: Path) -> bool:
    return any(folder.glob("*.onnx"))


def _check_folder(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise ModelError(f"{what} {path}: no such model folder; give a folder written by lsd-edge distill")
    return path


def latest_run(runs_root: Path = RUNS_ROOT) -> Path:
    """The most recent finished run under `runs_root` (newest report.json with a student)."""
    from lsd_edge.errors import ExportError
    from lsd_edge.export import latest_student

    try:
        return latest_student(runs_root).parent
    except ExportError:
        raise ModelError(
            f"no --teacher/--student given and no finished run under {runs_root}/; run "
            "`lsd-edge distill recipes/tiny.toml` first, or pass --teacher DIR --student DIR"
        ) from None


def _export_source(export_dir: Path) -> Path | None:
    """The model folder an export was made from, as its export_report.json names it."""
    from lsd_edge.onnx_runner import REPORT

    try:
        model_dir = json.loads((export_dir / REPORT).read_text(encoding="utf-8")).get("model_dir")
    except (OSError, ValueError, AttributeError):  # no report, or not one: the PyTorch column is left out
        return None
    return Path(model_dir) if isinstance(model_dir, str) and model_dir else None


def resolve_paths(
    teacher: Path | None = None,
    student: Path | None = None,
    onnx: Path | None = None,
    runs_root: Path = RUNS_ROOT,
) -> ModelPaths:
    """Fill what is not given from the latest run: run/teacher, run/student and its export run/onnx.

    `student` may be a PyTorch folder (its export beside it is found too) or an export folder (the
    PyTorch student it was exported from is found through its export_report.json).
    """
    from lsd_edge.export import default_output

    run = latest_run(runs_root) if teacher is None or student is None else None
    teacher = _check_folder(Path(teacher) if teacher is not None else run / "teacher", "teacher")
    student = _check_folder(Path(student) if student is not None else run / "student", "student")
    notes = []
    if _is_onnx(student):
        onnx, export_dir = onnx or student, student
        source = _export_source(export_dir)
        student = source if source is not None and source.is_dir() else None
        if student is None:
            notes.append(f"the PyTorch student {export_dir} was exported from is not here")
    elif onnx is None:
        candidate = default_output(student)
        if candidate.is_dir() and _is_onnx(candidate):
            onnx = candidate
        else:
            notes.append(
                f"no ONNX export at {candidate}; run `lsd-edge export {student} --int8` to compare it"
            )
    if onnx is not None:
        onnx = Path(onnx)
        if not onnx.is_dir() or not _is_onnx(onnx):
            raise ModelError(f"ONNX export {onnx}: no *.onnx files there; run `lsd-edge export --int8` first")
    return ModelPaths(teacher, student, onnx, run, notes)


# ------------------------------------------------------------------------------------------ memory


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


class PeakRSS:
    """Highest process RSS above the starting point while the block runs, sampled every `every_s`."""

    def __init__(self, every_s: float = 0.005):
        self.every_s = every_s
        self.base = self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.base = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def grown(self) -> int:
        return self.peak - self.base


def model_params(folder: Path) -> int | None:
    """Parameters of the LLaVA model a folder's config.json describes, counted on the meta device."""
    import torch
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from lsd_edge.models import count_params

    try:
        config = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            model = LlavaForConditionalGeneration._from_config(config)
    except Exception:  # a config this class cannot build: the count is shown as unknown
        return None
    return count_params(model)["total"]


class Measured:
    """A runner plus what it cost to hold: `info()` adds params (if missing) and `memory`."""

    def __init__(self, runner: Runner, memory: dict, params: int | None = None):
        self.runner = runner
        self.memory = memory
        self.params = params
        self.name = runner.name
        self.backend = runner.backend

    def generate(self, image, question: str, max_new_tokens: int = 64, **kw) -> Generation:
        return self.runner.generate(image, question, max_new_tokens, **kw)

    def info(self) -> dict:
        info = dict(self.runner.info())
        if info.get("params") is None and self.params is not None:
            info["params"] = self.params
        info["memory"] = self.memory
        return info


def measure(load: Callable[[], Runner], image: Image.Image | None) -> Measured:
    """Load a runner and answer one question, measuring each alone (see the module docstring)."""
    import torch

    with PeakRSS() as peak:
        runner = load()
        cuda = runner.backend == "torch" and runner.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        runner.generate(image, WARMUP_QUESTION, 8, ignore_eos=True)
    memory = {"peak_rss_mib": peak.grown / MiB}
    if runner.backend == "torch":
        from lsd_edge.memory import live_bytes

        memory["weights_mib"] = live_bytes(runner.model) / MiB
        if cuda:
            memory["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / MiB
    params = model_params(runner.path) if runner.backend == "onnx" else None
    return Measured(runner, memory, params)


# -------------------------------------------------------------------------------------------- loading


def onnx_variant(folder: Path) -> str | None:
    """int8 when the export has it (the variant the page is about), else what the export was asked for."""
    from lsd_edge.onnx_runner import variants_in

    have = variants_in(folder)
    if "int8" in have:
        return "int8"
    if not have:
        raise ModelError(f"ONNX export {folder}: no complete set of graphs; re-run `lsd-edge export --int8`")
    return None  # the runner picks the export's default variant


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ModelError(f"--device {device}: choose auto, cpu or cuda")
    return device


def onnx_device(device: str) -> str:
    """The ONNX runner follows `device` when this onnxruntime can (onnxruntime-gpu), else runs on the CPU."""
    import onnxruntime as ort

    return "cuda" if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def load_models(
    paths: ModelPaths, device: str = "cpu", examples: Sequence[Example] = (), reporter=None
) -> tuple[Runner, dict[str, Runner]]:
    """The teacher's runner and the student's by backend label ("PyTorch", "ONNX int8"), each measured
    answering the first example (or a question without an image)."""
    device = resolve_device(device)
    warmup_image = Image.open(examples[0].image).convert("RGB") if examples else None
    say = reporter.message if reporter is not None else (lambda text: None)

    def load(path: Path, what: str, on: str, **kw) -> Runner:
        say(f"loading the {what}: {path}")
        return measure(lambda: load_runner(path, device=on, **kw), warmup_image)

    onnx_kw = {
        "variant": onnx_variant(paths.onnx) if paths.onnx is not None else None,
        # ORT's worker threads spin between calls; beside a busy PyTorch model that only steals its cores.
        "session_config": {"session.intra_op.allow_spinning": "0"},
    }
    # The first model loaded in a process also pays for one-time set-up (lazy imports, thread pools,
    # kernel caches): run the smallest ones once, unmeasured, so every figure holds its model only.
    # They stay loaded while the others are measured, so no model's figure is memory they freed.
    primed = []
    for path, on, kw in ((paths.student, device, {}), (paths.onnx, onnx_device(device), onnx_kw)):
        if path is not None:
            primed.append(load_runner(path, device=on, **kw))
            primed[-1].generate(warmup_image, WARMUP_QUESTION, 2, ignore_eos=True)
    teacher = load(paths.teacher, "teacher", device)
    students: dict[str, Runner] = {}
    if paths.student is not None:
        students["PyTorch"] = load(paths.student, "student", device)
    if paths.onnx is not None:
        runner = load(paths.onnx, "ONNX student", onnx_device(device), **onnx_kw)
        students[f"ONNX {runner.runner.variant}"] = runner
    del primed
    if not students:
        raise ModelError("no student to show: give --student with a PyTorch folder or an ONNX export")
    return teacher, students


# ------------------------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class Example:
    image: Path
    question: str
    answer: str
    kind: str


def read_examples(eval_json: Path, images: Path | None = None, n: int = 6) -> list[Example]:
    """Up to `n` questions from a ShapesVQA-style eval file, one of each question type first."""
    from lsd_edge.data.llava import read_records, record_images
    from lsd_edge.evaluate import default_image_dir

    images = images or default_image_dir(eval_json)
    pool: list[Example] = []
    for rec in read_records(eval_json):
        files = record_images(rec)
        turns = rec.get("conversations") or []
        if len(files) != 1 or len(turns) < 2 or not (images / files[0]).is_file():
            continue
        question = str(turns[0].get("value", "")).replace("<image>", "").strip()
        pool.append(
            Example(images / files[0], question, str(turns[1].get("value", "")), str(rec.get("type", "")))
        )
    firsts: dict[str, Example] = {}
    for ex in pool:
        firsts.setdefault(ex.kind, ex)
    chosen = list(firsts.values())[:n]
    chosen += [ex for ex in pool if ex not in chosen][: n - len(chosen)]
    return chosen


def shapes_examples(folders: Sequence[Path | None] = (), n: int = 6, image_size: int = 48) -> list[Example]:
    """Examples from the eval split (held-out scenes) named by the first recipe.toml in `folders` (a run
    or model folder), or, without one, freshly rendered ShapesVQA scenes in a temporary folder."""
    recipe_file = next(
        (f / "recipe.toml" for f in folders if f is not None and (f / "recipe.toml").is_file()), None
    )
    if recipe_file is not None:
        try:
            from lsd_edge.config import load_recipe

            recipe = load_recipe(recipe_file)
            if recipe.data.eval is not None:
                path, images = recipe.data.resolve(recipe.data.eval)
                if path.is_file():
                    return read_examples(path, images, n)
            if recipe.data.shapes is not None:
                image_size = recipe.data.shapes.image_size
        except LsdEdgeError:  # a stale recipe or data: render new scenes instead
            pass
    from lsd_edge.data.shapes import generate

    out = Path(tempfile.mkdtemp(prefix="lsd-edge-demo-"))
    generate(out, seed=0, n_train=1, n_eval=4 * n, image_size=image_size, questions_per_image=1)
    return read_examples(out / "eval.json", out / "images", n)
