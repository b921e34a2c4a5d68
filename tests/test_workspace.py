"""The one owner of a run folder's layout: which run is the latest, where an export goes, where a
run's teacher is."""

from __future__ import annotations

import json
import os

from lsd_edge.recipe.toml import dumps_toml
from lsd_edge.workspace import Workspace, default_export_dir, export_source, latest_run

from .helpers import tiny_recipe_dict


def _run(root, name, *, finished=True, teacher=True):
    ws = Workspace(root / name)
    for folder in [ws.student] + ([ws.teacher] if teacher else []):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    if finished:
        ws.report.write_text("{}")
    return ws


def test_the_latest_run_is_the_newest_finished_one(tmp_path):
    assert latest_run(tmp_path) is None
    old, new = _run(tmp_path, "old"), _run(tmp_path, "new")
    _run(tmp_path, "cut", finished=False)  # interrupted: no report, never the latest
    os.utime(old.report, (1, 1))
    assert latest_run(tmp_path) == new
    os.utime(new.report, (0, 0))
    assert latest_run(tmp_path) == old
    (old.student / "config.json").unlink()  # a report but no student folder: not finished
    assert latest_run(tmp_path) == new and not old.finished


def test_paths_of_a_run(tmp_path):
    ws = Workspace(tmp_path / "r")
    assert (
        ws.stage("dft") == tmp_path / "r" / "dft"
        and ws.state("teacher-pt") == tmp_path / "r" / "state" / "teacher-pt"
    )
    assert ws.teacher_cache("dft") == tmp_path / "r" / "teacher-cache" / "dft"
    assert default_export_dir(ws.student) == ws.onnx
    assert default_export_dir(tmp_path / "my-model") == tmp_path / "my-model-onnx"


def test_exports_of_a_run_leave_out_failed_and_empty_folders(tmp_path):
    ws = _run(tmp_path, "r")
    for name in ("onnx", "onnx-int4", "onnx.failed", "onnx-empty"):
        (ws.root / name / "onnx").mkdir(parents=True)
    for name in ("onnx", "onnx-int4", "onnx.failed"):
        (ws.root / name / "onnx" / "decoder_model_merged.onnx").write_bytes(b"")
    assert ws.exports() == [ws.root / "onnx", ws.root / "onnx-int4"]


def test_the_teacher_of_a_run(tmp_path):
    ws = _run(tmp_path, "tiny")
    assert ws.teacher_model() == ws.teacher
    hub = _run(tmp_path, "hub", teacher=False)
    assert hub.teacher_model() is None  # no recipe: nothing to name
    local = tmp_path / "my-teacher"
    local.mkdir()
    (local / "config.json").write_text("{}")
    recipe = tiny_recipe_dict(str(tmp_path / "data"), str(hub.root))
    recipe["teacher"] = {"path": str(local)}
    recipe.pop("stages")
    recipe["stages"] = [{"name": "sft", "kind": "sft", "max_steps": 1}]
    hub.recipe_file.write_text(dumps_toml(recipe))
    assert hub.teacher_model() == local


def test_the_source_of_an_export(tmp_path):
    assert export_source(tmp_path) is None
    (tmp_path / "export_report.json").write_text(json.dumps({"model_dir": "runs/tiny/student"}))
    assert str(export_source(tmp_path)) == "runs/tiny/student"
    (tmp_path / "export_report.json").write_text("[1]")
    assert export_source(tmp_path) is None
