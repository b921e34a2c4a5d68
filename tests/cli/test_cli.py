"""The command line: help, version, each command, and one red line (no traceback) for bad input."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from lsd_edge import __version__
from lsd_edge.cli.main import main
from lsd_edge.recipe.load import parse_recipe
from lsd_edge.recipe.toml import dumps_toml

from ..helpers import REPO, distill_red_line, one_red_line, run, scored_here


def test_help_and_version(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "--help")
    assert code == 0
    for cmd in ("validate", "distill", "eval", "info", "data", "ablate", "export", "demo"):
        assert cmd in out
    code, out, _ = run(monkeypatch, capsys, "--version")
    assert code == 0 and __version__ in out


def test_validate_shipped(monkeypatch, capsys):
    code, out, _ = run(
        monkeypatch, capsys, "validate", str(REPO / "recipes" / "tiny.toml"), "--set", "run.seed=3"
    )
    assert code == 0 and "valid" in out and "seed = 3" in out


def test_validate_shows_how_teacher_and_student_see(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    tiny = str(REPO / "recipes" / "tiny.toml")
    code, out, _ = run(monkeypatch, capsys, "validate", tiny)
    # the shipped default: the student sees with the teacher's tower cut to 1 layer at 16 px, 2 x 2
    assert code == 0 and "visual tokens" in out and "projector" in out
    student = next(line for line in out.splitlines() if line.lstrip().startswith("student "))
    teacher = next(line for line in out.splitlines() if line.lstrip().startswith("teacher "))
    assert "32 px, patch 8 (4x4), 2 layers read at -1" in teacher and teacher.split()[1] == "16", out
    assert "16 px, patch 8 (2x2), 1 layers read at -1" in student
    assert student.split()[1] == "4", student  # visual tokens per image
    sets = ["--set", "student.image_size=32", "--set", "student.vision_layers=2"]
    code, out, _ = run(monkeypatch, capsys, "validate", tiny, *sets)
    assert code == 0 and out.count("32 px, patch 8 (4x4), 2 layers read at -1") == 2, out
    code, _, err = run(monkeypatch, capsys, "validate", tiny, "--set", "student.image_size=20")
    assert (
        code == 1 and "student.image_size 20 is not a multiple of the teacher's tower's patch size 8" in err
    )


def test_validate_refuses_on_policy_where_it_cannot_work(monkeypatch, capsys):
    """on_policy needs a distilling stage and an online teacher: refused in one line at load."""
    tiny = str(REPO / "recipes" / "tiny.toml")
    code, _, err = run(monkeypatch, capsys, "validate", tiny, "--set", "stages[2].on_policy.lmbda=0.5")
    assert code == 0, err
    cases = [
        (
            ["stages[1].on_policy.lmbda=0.5"],
            "on_policy: a 'sft' stage has no teacher to score the student's answers",
        ),
        (
            ["stages[2].on_policy.lmbda=0.5", "stages[2].teacher_cache=auto"],
            "on_policy: a teacher cache cannot hold targets for answers not yet written",
        ),
        (["stages[2].on_policy.lmbda=1.5"], "lmbda"),
    ]
    for sets, message in cases:
        code, _, err = run(monkeypatch, capsys, "validate", tiny, *(a for s in sets for a in ("--set", s)))
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err


def test_validate_checks_a_choice_on_a_real_teacher_s_tower(monkeypatch, capsys, tmp_path):
    """A teacher read from its config.json (llava-interleave-qwen-7b's sizes): the student's tower
    cut to 224 px and 12 layers sees 256 tokens; a size off its 14 px patch is one red line."""
    from ..realshape import write_real_configs

    real = write_real_configs(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    recipe = str(REPO / "recipes" / "qwen0.5b.toml")
    sets = ["--set", f"teacher.path={real['llava-interleave-qwen-7b-hf']}"]
    sets += ["--set", f"student.llm={real['Qwen1.5-0.5B-Chat']}"]
    edge = ["--set", "student.image_size=224", "--set", "student.vision_layers=12"]
    code, out, _ = run(monkeypatch, capsys, "validate", recipe, *sets, *edge)
    rows = {
        line.split()[0]: line
        for line in out.splitlines()
        if line.lstrip().startswith(("teacher ", "student "))
    }
    assert code == 0 and rows["teacher"].split()[1] == "729" and rows["student"].split()[1] == "256", out
    assert "224 px, patch 14 (16x16), 12 layers read at -1" in rows["student"]
    code, _, err = run(monkeypatch, capsys, "validate", recipe, *sets, "--set", "student.image_size=200")
    assert (
        code == 1 and "student.image_size 200 is not a multiple of the teacher's tower's patch size 14" in err
    )


def test_info_shows_the_vision_tower(monkeypatch, capsys, tmp_path, tiny_teacher, processor):
    from lsd_edge.models.build import build_tiny_model, student_processor
    from lsd_edge.models.load import save_model
    from lsd_edge.recipe.schema import StudentConfig, TinyConfig

    tiny = TinyConfig(
        hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32, vision="teacher"
    )
    proc = student_processor(processor, StudentConfig(tiny=tiny, image_size=8))
    save_model(build_tiny_model(tiny, proc, vision_from=tiny_teacher, image_size=8), proc, tmp_path)
    code, out, _ = run(monkeypatch, capsys, "info", str(tmp_path))
    assert code == 0 and "1 visual tokens per image" in out
    assert "vision tower: 8 px, patch 8 (1x1), 1 layers read at -1" in out


def test_validate_broken_lists_every_problem(tmp_path, monkeypatch, capsys, recipe_dict):
    recipe_dict["stages"][0]["lr"] = -1
    recipe_dict["stages"][2]["bogus"] = 1
    p = tmp_path / "r.toml"
    p.write_text(dumps_toml(recipe_dict))
    code, _, err = run(monkeypatch, capsys, "validate", str(p))
    assert code == 1 and "Traceback" not in err
    # the one error that may take more than a line: a red head line, then one line per problem
    head, *problems = err.strip().splitlines()
    assert head == f"error: {p}: 2 problem(s) in the recipe", err
    assert len(problems) == 2 and all(line.startswith("  ") for line in problems), err
    assert "stages[0].lr" in problems[0] and "stages[2].bogus" in problems[1]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["validate", "nope.toml"], "no such recipe file"),
        (["distill", "nope.toml"], "no such recipe file"),
        (["info", "no/such/dir"], "no such folder"),
        (["eval", "no_such_model_dir", "--data", "x.json"], "no such folder"),
        (["distill", "RECIPE", "--resume", "--restart"], "contradict"),
        (["validate", "RECIPE", "--set", "stages[7].lr=1"], "out of range"),
    ],
)
def test_bad_input_isone_red_line(monkeypatch, capsys, args, needle):
    args = [str(REPO / "recipes" / "tiny.toml") if a == "RECIPE" else a for a in args]
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 1
    assert needle in one_red_line(err)


def test_debug_shows_traceback_and_leaves_the_environment_as_it_was(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lsd-edge", "--debug", "validate", "nope.toml"])
    monkeypatch.setenv("LSD_EDGE_DEBUG", "0")  # restored after the test, whatever main() does
    from lsd_edge.errors import RecipeError

    with pytest.raises(RecipeError, match="nope.toml: no such recipe file"):
        main()
    # --debug reaches the command's own processes, not what runs after it in this one
    assert os.environ["LSD_EDGE_DEBUG"] == "0"


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    from lsd_edge.cli import recipe_commands

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe_commands, "load_recipe", interrupted)
    code, _, err = run(monkeypatch, capsys, "validate", str(REPO / "recipes" / "tiny.toml"))
    assert code == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted: what was finished is kept"), err
    assert lines[0].endswith("`lsd-edge distill --resume` continues a run")


def test_a_training_error_is_a_red_line_and_exit_1(tmp_path, monkeypatch, capsys, recipe_dict):
    """A NaN loss (TrainingError) through `lsd-edge distill`: after the stages' progress lines, one red line."""
    from lsd_edge.distill import losses

    real = losses.relation_sum
    monkeypatch.setattr(losses, "relation_sum", lambda s, t: real(s, t) * float("nan"))
    line = distill_red_line(monkeypatch, capsys, recipe_dict, tmp_path)
    assert "dpt step 1: loss term 'relation' is nan; the last good checkpoint is kept" in line


def test_a_runtime_model_error_is_one_red_line(tmp_path, monkeypatch, capsys, teacher_dir, onnx_dir):
    """A damaged export (RuntimeModelError) given to `lsd-edge demo`: refused before anything loads."""
    broken = tmp_path / "onnx"
    shutil.copytree(onnx_dir, broken)
    (broken / "onnx" / "vision_encoder_int8.onnx").write_bytes(b"not a protobuf")
    args = ("demo", "--teacher", str(teacher_dir), "--student", str(broken), "--device", "cpu")
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 1 and "vision_encoder_int8.onnx" in one_red_line(err) and "cannot load" in err


def test_data_shapes_info_eval(tmp_path, monkeypatch, capsys, teacher_dir):
    code, out, _ = run(
        monkeypatch,
        capsys,
        "data",
        "shapes",
        "--out",
        str(tmp_path / "s"),
        "--n-train",
        "10",
        "--n-eval",
        "4",
        "--image-size",
        "16",
        "--jitter",
        "0",
    )
    assert code == 0 and "wrote ShapesVQA" in out
    assert len(json.loads((tmp_path / "s" / "eval.json").read_text())) == 4
    assert json.loads((tmp_path / "s" / "shapes.json").read_text())["jitter"] == 0
    code, out, _ = run(monkeypatch, capsys, "info", str(teacher_dir))
    assert code == 0 and "vision" in out and "projector" in out and "MB" in out
    res = tmp_path / "res.json"
    code, out, _ = run(
        monkeypatch,
        capsys,
        "eval",
        str(teacher_dir),
        "--data",
        str(tmp_path / "s" / "eval.json"),
        "--json",
        str(res),
        "--max-new-tokens",
        "2",
    )
    assert code == 0, out
    data = json.loads(res.read_text())
    assert set(data) >= {"accuracy", "n", "by_type"} and data["n"] == 4


def test_eval_with_bad_data(tmp_path, monkeypatch, capsys, teacher_dir):
    (tmp_path / "bad.json").write_text("{nope")
    code, _, err = run(monkeypatch, capsys, "eval", str(teacher_dir), "--data", str(tmp_path / "bad.json"))
    assert code == 1 and "not valid JSON" in one_red_line(err)


def test_distill_and_ablate(tmp_path, monkeypatch, capsys, recipe_dict):
    p = tmp_path / "r.toml"
    p.write_text(dumps_toml(recipe_dict))
    code, out, err = run(monkeypatch, capsys, "distill", str(p))
    assert code == 0, err
    assert "teacher" in out and "student" in out and "report.json" in out
    code, out, err = run(monkeypatch, capsys, "distill", str(p))
    assert code == 1 and "--resume" in one_red_line(err)
    js = tmp_path / "abl.json"
    code, out, err = run(
        monkeypatch, capsys, "ablate", str(p), "--schemes", "pt-sft,dpt-sft-dft", "--json", str(js)
    )
    assert code == 0, err
    data = json.loads(js.read_text())
    assert set(data["schemes"]) == {"pt-sft", "dpt-sft-dft"}
    recipe = parse_recipe(recipe_dict)
    for row in data["schemes"].values():
        assert row["accuracy"] == scored_here(recipe, Path(row["path"]))
    # equal steps per stage: the shared stages of both schemes ran the same number of steps
    steps = {s: {st["name"]: st["steps"] for st in row["stages"]} for s, row in data["schemes"].items()}
    assert (
        steps["pt-sft"]["pt"] == steps["dpt-sft-dft"]["dpt"]
        and steps["pt-sft"]["sft"] == steps["dpt-sft-dft"]["sft"]
    )
    code, _, err = run(monkeypatch, capsys, "ablate", str(p), "--schemes", "pt-xyz")
    assert code == 1 and "scheme 'pt-xyz'" in one_red_line(err)
    code, _, err = run(monkeypatch, capsys, "ablate", str(p), "--schemes", "dpt-sft:on-policy")
    assert code == 1 and ":on-policy changes DFT stages, and the chain has none" in one_red_line(err)
