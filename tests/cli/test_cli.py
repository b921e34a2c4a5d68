"""The command line: help, version, each command, and one red line (no traceback) for bad input."""

from __future__ import annotations

import json
import sys

import pytest

from lsd_edge import __version__
from lsd_edge.cli.main import main
from lsd_edge.recipe.toml import dumps_toml

from ..helpers import REPO, one_red_line, run


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


def test_validate_broken_lists_every_problem(tmp_path, monkeypatch, capsys, recipe_dict):
    recipe_dict["stages"][0]["lr"] = -1
    recipe_dict["stages"][2]["bogus"] = 1
    p = tmp_path / "r.toml"
    p.write_text(dumps_toml(recipe_dict))
    code, _, err = run(monkeypatch, capsys, "validate", str(p))
    assert code == 1
    one_red_line(err)
    assert "stages[0].lr" in err and "stages[2].bogus" in err


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


def test_debug_shows_traceback(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lsd-edge", "--debug", "validate", "nope.toml"])
    from lsd_edge.errors import RecipeError

    with pytest.raises(RecipeError):
        main()


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
    for row in data["schemes"].values():
        assert 0.0 <= row["accuracy"] <= 1.0
    # equal steps per stage: the shared stages of both schemes ran the same number of steps
    steps = {s: {st["name"]: st["steps"] for st in row["stages"]} for s, row in data["schemes"].items()}
    assert (
        steps["pt-sft"]["pt"] == steps["dpt-sft-dft"]["dpt"]
        and steps["pt-sft"]["sft"] == steps["dpt-sft-dft"]["sft"]
    )
    code, _, err = run(monkeypatch, capsys, "ablate", str(p), "--schemes", "pt-xyz")
    assert code == 1 and "scheme 'pt-xyz'" in one_red_line(err)
