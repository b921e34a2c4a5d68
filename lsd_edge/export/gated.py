"""What the ONNX and GGUF exports share: the model folder they start from, the samples their parity
gates run on, the versions their reports record, and the gated folder itself.

An export is built in a temporary folder beside its output. Its gate decides: a folder that passes
is renamed into place with its export_report.json; one that fails is kept beside the output as
`<output>.failed`, with the reasons in its report, an earlier good export stays where it was, and
the call raises `ExportError` naming the reasons.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image

from lsd_edge.data.chat import ChatEncoder, user_message
from lsd_edge.data.questions import EvalItem, load_eval_items
from lsd_edge.errors import ExportError
from lsd_edge.files import atomic_dir, write_json
from lsd_edge.progress import Reporter
from lsd_edge.runtime.onnx.layout import REPORT
from lsd_edge.workspace import RUNS_ROOT, latest_run

SYNTHETIC_QUESTIONS = ("describe the image .", "what is in the image ?", "how many shapes are there ?")


@dataclass
class ExportResult:
    output: Path
    report: dict[str, Any] = field(default_factory=dict)


def latest_student(runs_root: Path = RUNS_ROOT) -> Path:
    """The student of the most recent finished run under `runs_root`."""
    run = latest_run(runs_root)
    if run is None:
        raise ExportError(
            f"no model folder given and no finished run under {runs_root}/ (a run folder with student/ and "
            "report.json); give one, e.g. `lsd-edge export runs/tiny/student`"
        )
    return run.student


def source_folder(model_dir, reporter: Reporter, runs_root: Path) -> tuple[Path, bool]:
    """The model folder to export (given, or the latest run's student) and whether it was picked."""
    picked = model_dir is None
    model_dir = latest_student(runs_root) if picked else Path(model_dir)
    if picked:
        reporter.message(f"exporting the student of the most recent run: {model_dir}")
    if not model_dir.is_dir():
        raise ExportError(f"{model_dir}: no such model folder; give a folder written by lsd-edge distill")
    return model_dir, picked


def recipe_eval(recipe, overrides: dict[str, Any]) -> dict[str, Any]:
    """A gate's accuracy settings from the recipe a model folder holds: its eval split (data, images)
    when the file is here, else a note saying why accuracy is not compared; eval.max_samples and
    eval.max_new_tokens. The user's --data (in `overrides`) replaces the split, its images and note."""
    values: dict[str, Any] = {
        "eval_samples": recipe.eval.max_samples,
        "max_new_tokens": recipe.eval.max_new_tokens,
    }
    if recipe.data.eval is not None and overrides.get("data") is None:
        path, images = recipe.data.resolve(recipe.data.eval)
        if path.is_file():
            values.update(data=path, images=images)
        else:  # exported from another folder than the run's: check on synthetic inputs
            values["note"] = f"the recipe's eval data {path} is not here; pass --data to compare accuracy"
    return values


def check_data(data: Path) -> None:
    if not Path(data).is_file():
        raise ExportError(
            f"{data}: no such eval data file; pass --data with a LLaVA-format eval JSON "
            "(the parity gate compares answers on it)"
        )


def parity_items(
    data: Path | None, images: Path | None, processor, n: int | None
) -> tuple[list[EvalItem], str]:
    """Eval questions for the gate, and where they came from; synthetic ones when there is no eval data."""
    if data is not None:
        check_data(data)
        return load_eval_items(data, images, processor, n), str(data)
    # No eval data: random images and fixed questions still check logits and greedy tokens.
    enc = ChatEncoder(processor)
    rng = np.random.default_rng(0)
    size = processor.image_processor.size
    h, w = size.get("height") or size.get("shortest_edge"), size.get("width") or size.get("shortest_edge")
    out = []
    for i in range(n or 4):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ids = enc.encode_prompt([user_message(SYNTHETIC_QUESTIONS[i % len(SYNTHETIC_QUESTIONS)], 1)])
        out.append(EvalItem(f"synthetic-{i}", "all", ids, [img], ""))
    return out, "synthetic (random images; no eval data)"


def rel_diff(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max |ref|: the largest error relative to the logits' own scale."""
    return float(np.abs(a.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12))


def versions(**more: str | None) -> dict[str, str | None]:
    """The versions an export report records: PyTorch's and transformers', then the format's own."""
    return {"torch": torch.__version__, "transformers": transformers.__version__, **more}


def gated(out: Path, report: dict[str, Any], build: Callable[[Path], list[str]], gate: str) -> ExportResult:
    """Build the export into a temporary folder (`build(tmp)` fills it and `report`, and returns the
    gate's reasons to refuse it, none if it passed), write the report there, and put it in place as
    `out`, or, refused, as `<out>.failed` with an ExportError naming `gate` and the reasons."""
    failed = out.with_name(out.name + ".failed")
    with atomic_dir(out) as tmp:
        reasons = build(tmp)
        write_json(tmp / REPORT, report)
        if reasons:
            shutil.rmtree(failed, ignore_errors=True)
            os.replace(tmp, failed)  # keep what was made for inspection; an earlier good export stays
            report["output"] = str(failed)
            write_json(failed / REPORT, report)
            raise ExportError(f"{gate} failed: {'; '.join(reasons)}; the export is kept in {failed}")
    shutil.rmtree(failed, ignore_errors=True)
    return ExportResult(out, report)
