"""The one owner of a run folder's layout, of which run is the latest, and of an export's folder.

A run folder (`run.output_dir`, `runs/tiny` for the embedded default):

    teacher/               the trained tiny teacher (HF folder; a hub teacher is not copied here)
    teacher-stages/<s>/    the teacher's finished stages while it trains
    <stage>/               each finished student stage (HF folder + recipe.toml + metrics.json)
    state/<key>/step-N/    mid-stage resume states
    teacher-cache/<stage>/ top-k teacher caches ("auto")
    regenerated/<stage>/   teacher-regenerated answers
    student/               the last stage, once the run has finished
    onnx/                  `lsd-edge export`'s default output for the run's student
    log.jsonl report.json loss_curve.png recipe.toml bench.json ablate/

and beside the runs, `runs/bench-arch/` holds the bench's exports of real architectures.

A folder with `metrics.json` is complete (it is written last). A run has finished when its
`report.json` is written and `student/` is a model folder; the latest run is the finished one
whose report is newest. Nothing else computes these paths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lsd_edge.errors import LsdEdgeError
from lsd_edge.recipe.load import load_recipe

RUNS_ROOT = Path("runs")
DONE = "metrics.json"  # written last: a folder with it is complete
EXPORT_REPORT = "export_report.json"
RECIPE_FILE = "recipe.toml"


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / DONE).is_file()


def is_model_folder(folder: str | Path) -> bool:
    return (Path(folder) / "config.json").is_file()


def is_export_folder(folder: str | Path) -> bool:
    """A folder `lsd-edge export` wrote: it holds ONNX graphs under onnx/ (its layout:
    `lsd_edge.runtime.onnx.layout`)."""
    return any(Path(folder).glob("onnx/*.onnx"))


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def teacher_stages(self) -> Path:
        return self.root / "teacher-stages"

    def stage(self, name: str) -> Path:
        return self.root / name

    @property
    def states(self) -> Path:
        return self.root / "state"

    def state(self, key: str) -> Path:
        return self.states / key

    def teacher_cache(self, stage: str) -> Path:
        return self.root / "teacher-cache" / stage

    def regenerated(self, stage: str) -> Path:
        return self.root / "regenerated" / stage

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def onnx(self) -> Path:
        return self.root / "onnx"

    @property
    def log(self) -> Path:
        return self.root / "log.jsonl"

    @property
    def trackers(self) -> Path:
        """Experiment trackers' files (run.report_to): TensorBoard event files, Trackio, W&B offline runs."""
        return self.root / "trackers"

    @property
    def report(self) -> Path:
        return self.root / "report.json"

    @property
    def recipe_file(self) -> Path:
        return self.root / RECIPE_FILE

    @property
    def loss_curve(self) -> Path:
        return self.root / "loss_curve.png"

    @property
    def ablate(self) -> Path:
        return self.root / "ablate"

    @property
    def finished(self) -> bool:
        return self.report.is_file() and is_model_folder(self.student)

    def teacher_model(self) -> Path | None:
        """The run's teacher as a local model folder: `teacher/` (a trained tiny teacher), else the
        recipe's `teacher.path` when that is a local folder; None when neither is here."""
        if is_model_folder(self.teacher):
            return self.teacher
        if not self.recipe_file.is_file():
            return None
        try:
            path = load_recipe(self.recipe_file).teacher.path
        except LsdEdgeError:  # a recipe of another version: no teacher to name
            return None
        return Path(path) if path is not None and is_model_folder(path) else None

    def exports(self) -> list[Path]:
        """The run's ONNX export folders: `onnx/` and other `onnx*` folders, never a failed one."""
        return sorted(
            p
            for p in self.root.glob("onnx*")
            if p.is_dir() and not p.name.endswith(".failed") and is_export_folder(p)
        )


def latest_run(runs_root: str | Path = RUNS_ROOT) -> Workspace | None:
    """The finished run under `runs_root` whose report.json is newest, or None."""
    runs = [Workspace(p.parent) for p in Path(runs_root).glob("*/report.json")]
    runs = [r for r in runs if r.finished]
    if not runs:
        return None
    return max(runs, key=lambda r: r.report.stat().st_mtime)


def arch_exports_dir(runs_root: str | Path = RUNS_ROOT) -> Path:
    """Where `lsd-edge bench --arch` caches its random-weight exports of real architectures."""
    return Path(runs_root) / "bench-arch"


def default_export_dir(model_dir: str | Path) -> Path:
    """`<run>/onnx` for a run's student (runs/tiny/student -> runs/tiny/onnx), else `<folder>-onnx`."""
    model_dir = Path(model_dir)
    if model_dir.name == "student":
        return Workspace(model_dir.parent).onnx
    return model_dir.with_name(model_dir.name + "-onnx")


def export_source(export_dir: str | Path) -> Path | None:
    """The model folder an export was made from, as its export report names it (None if unknown)."""
    try:
        model_dir = json.loads((Path(export_dir) / EXPORT_REPORT).read_text(encoding="utf-8")).get(
            "model_dir"
        )
    except (OSError, ValueError, AttributeError):  # no report, or not one
        return None
    return Path(model_dir) if isinstance(model_dir, str) and model_dir else None
