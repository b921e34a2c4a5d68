"""What goes to the trackers: the FLOPs count behind MFU, the recipe as scalars, and a run recorded by
Trackio and W&B offline."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest
import torch

from lsd_edge.models.info import ModelShape
from lsd_edge.recipe.load import parse_recipe
from lsd_edge.recipe.schema import StageConfig
from lsd_edge.train.pipeline import distill
from lsd_edge.train.track import PEAK_TFLOPS, flat_config, mfu, step_flops

from ..helpers import require_dev


def test_flops_count_the_student_trained_and_the_online_teacher_run_forward(tiny_student, tiny_teacher):
    """PaLM's count, written out for the tiny models: 2N per token forward plus attention 4*L*D*T,
    backward twice the forward when the LLM trains (once, activations only, when it is frozen)."""
    s, t = ModelShape.of(tiny_student.config), ModelShape.of(tiny_teacher.config)
    sc, tc = tiny_student.config.text_config, tiny_teacher.config.text_config
    n_s = sum(p.numel() for p in tiny_student.model.language_model.parameters()) + (
        0 if sc.tie_word_embeddings else tiny_student.lm_head.weight.numel()
    )
    n_t = sum(p.numel() for p in tiny_teacher.model.language_model.parameters()) + (
        0 if tc.tie_word_embeddings else tiny_teacher.lm_head.weight.numel()
    )
    assert s.params["llm"] == n_s and t.params["llm"] == n_t
    tokens, T = 100, 20
    fwd_s = 2 * n_s + 4 * sc.num_hidden_layers * sc.hidden_size * T
    fwd_t = 2 * n_t + 4 * tc.num_hidden_layers * tc.hidden_size * T
    sft = StageConfig.model_validate({"name": "sft", "kind": "sft", "max_steps": 1})
    dft = StageConfig.model_validate({"name": "dft", "kind": "dft", "max_steps": 1})
    dpt = StageConfig.model_validate({"name": "dpt", "kind": "dpt", "max_steps": 1})
    assert step_flops(s, t, sft, tokens, T) == tokens * fwd_s * 3, (
        "no teacher in a stage that does not distil"
    )
    assert step_flops(s, t, dft, tokens, T) == tokens * (fwd_s * 3 + fwd_t)
    assert step_flops(s, None, dft, tokens, T) == tokens * fwd_s * 3, "a teacher cache runs no forward"
    assert step_flops(s, t, dpt, tokens, T) == tokens * (fwd_s * 2 + fwd_t), "frozen LLM: activations only"


def test_mfu_only_where_the_peak_is_known():
    assert mfu(1e15, torch.device("cpu"), 1) is None
    assert PEAK_TFLOPS["H100"] == 989.0


def test_the_recipe_goes_to_the_trackers_as_scalars(recipe_dict):
    recipe_dict["run"]["report_to"] = ["tensorboard"]
    flat = flat_config(parse_recipe(recipe_dict))
    assert flat["run.seed"] == 0 and flat["run.report_to"] == "['tensorboard']"
    assert flat["student.tiny.hidden_size"] == 16 and flat["data.max_length"] == 64
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())


def test_trackio_and_wandb_record_a_run_offline(recipe_dict, tmp_path, monkeypatch):
    """run.report_to = ["trackio", "wandb"] (TensorBoard: tests/train/test_train.py): Trackio's local
    database holds every step's loss, and W&B writes its offline run under the trackers folder."""
    require_dev("trackio")
    require_dev("wandb")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is imported
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    # a project of its own: trackio may already be imported with another TRACKIO_DIR, whose database
    # can hold runs of an earlier "tracked"
    name = f"tracked-{uuid.uuid4().hex[:8]}"
    recipe_dict["run"].update(report_to=["trackio", "wandb"], name=name)
    recipe_dict["stages"] = [dict(recipe_dict["stages"][1], max_steps=3)]
    r = parse_recipe(recipe_dict)
    distill(r)
    root = Path(r.run.output_dir)
    steps = [json.loads(line) for line in (root / "log.jsonl").read_text().splitlines()]
    student = [s for s in steps if not s["stage"].startswith("teacher/")]
    assert len(student) == 3

    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs(name, SQLiteStorage.get_runs(name)[0])
    key = f"{student[0]['stage']}/loss"
    logged = [(row["step"], row[key]) for row in logs if key in row]
    assert logged == [(s["step"], pytest.approx(s["loss"], rel=1e-6)) for s in student]

    runs = list((root / "trackers" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_a_dev_dependency_that_does_not_import_fails_under_require_dev(monkeypatch):
    monkeypatch.setitem(sys.modules, "trackio", None)  # `import trackio` now raises ImportError
    monkeypatch.setenv("LSD_EDGE_REQUIRE_DEV", "1")
    with pytest.raises(pytest.fail.Exception, match="LSD_EDGE_REQUIRE_DEV=1 but trackio does not import"):
        require_dev("trackio")
    monkeypatch.delenv("LSD_EDGE_REQUIRE_DEV")
    with pytest.raises(pytest.skip.Exception, match="trackio does not import"):
        require_dev("trackio")
