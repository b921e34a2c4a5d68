"""The models the demo shows: which folders (the latest run by default), and their runners with the
memory they took.

Memory is measured once per model at start-up, one model at a time, so the figures are that model's
own: the peak growth of the process's resident memory (RSS) while its runner loads and answers one
question (weights may be read in lazily, at the first answer), plus, for PyTorch models, the bytes
of its weights (and on CUDA the allocator's peak). While the page runs, both models answer at once,
so an RSS figure taken per request would mix them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort
import torch
from PIL import Image

from lsd_edge.demo.examples import Example
from lsd_edge.errors import ModelError
from lsd_edge.infer import load_runner
from lsd_edge.models.info import config_params, live_bytes
from lsd_edge.models.load import resolve_device
from lsd_edge.runtime.memory import MiB, PeakRSS
from lsd_edge.runtime.onnx.layout import variants_in
from lsd_edge.runtime.runner import Runner
from lsd_edge.runtime.textgen import Generation
from lsd_edge.workspace import RUNS_ROOT, default_export_dir, export_source, is_export_folder, latest_run

WARMUP_QUESTION = "what is in the image ?"


@dataclass
class ModelPaths:
    """The folders the demo loads: a teacher, and a student as PyTorch weights, an ONNX export, or both."""

    teacher: Path
    student: Path | None  # HF weights
    onnx: Path | None  # export folder
    run: Path | None = None  # the run they came from, when taken from runs/
    notes: list[str] = field(default_factory=list)  # what the page should say is missing


def _check_folder(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise ModelError(f"{what} {path}: no such model folder; give a folder written by lsd-edge distill")
    return path


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
    ws = None
    if teacher is None or student is None:
        ws = latest_run(runs_root)
        if ws is None:
            raise ModelError(
                f"no --teacher/--student given and no finished run under {runs_root}/; run "
                "`lsd-edge distill recipes/tiny.toml` first, or pass --teacher DIR --student DIR"
            )
    teacher = Path(teacher) if teacher is not None else (ws.teacher_model() or ws.teacher)
    teacher = _check_folder(teacher, "teacher")
    student = _check_folder(Path(student) if student is not None else ws.student, "student")
    run = None if ws is None else ws.root
    notes = []
    if is_export_folder(student):
        onnx, export_dir = onnx or student, student
        source = export_source(export_dir)
        student = source if source is not None and source.is_dir() else None
        if student is None:
            notes.append(f"the PyTorch student {export_dir} was exported from is not here")
    elif onnx is None:
        candidate = default_export_dir(student)
        if candidate.is_dir() and is_export_folder(candidate):
            onnx = candidate
        else:
            notes.append(
                f"no ONNX export at {candidate}; run `lsd-edge export {student} --int8` to compare it"
            )
    if onnx is not None:
        onnx = Path(onnx)
        if not onnx.is_dir() or not is_export_folder(onnx):
            raise ModelError(f"ONNX export {onnx}: no *.onnx files there; run `lsd-edge export --int8` first")
    return ModelPaths(teacher, student, onnx, run, notes)


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
    with PeakRSS() as peak:
        runner = load()
        cuda = runner.backend == "torch" and runner.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        runner.generate(image, WARMUP_QUESTION, 8, ignore_eos=True)
    memory = {"peak_rss_mib": peak.grown / MiB}
    if runner.backend == "torch":
        memory["weights_mib"] = live_bytes(runner.model) / MiB
        if cuda:
            memory["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / MiB
    params = config_params(runner.path) if runner.backend == "onnx" else None
    return Measured(runner, memory, params)


# -------------------------------------------------------------------------------------------- loading


def onnx_variant(folder: Path) -> str | None:
    """int8 when the export has it (the variant the page is about), else what the export was asked for."""
    have = variants_in(folder)
    if "int8" in have:
        return "int8"
    if not have:
        raise ModelError(f"ONNX export {folder}: no complete set of graphs; re-run `lsd-edge export --int8`")
    return None  # the runner picks the export's default variant


def onnx_device(device: str) -> str:
    """The ONNX runner follows `device` when this onnxruntime can (onnxruntime-gpu), else runs on the CPU."""
    return "cuda" if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def load_models(
    paths: ModelPaths, device: str = "cpu", examples: Sequence[Example] = (), reporter=None
) -> tuple[Runner, dict[str, Runner]]:
    """The teacher's runner and the student's by backend label ("PyTorch", "ONNX int8"), each measured
    answering the first example (or a question without an image)."""
    device = resolve_device(device, "--device").type
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
