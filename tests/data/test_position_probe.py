"""scripts/position_probe.py (docs/EMBEDDED_DEFAULT.md, "Position questions"): the questions it asks
are right about their scenes, every phrasing trains and scores, the visual probe runs, bad folders
are refused in one line."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

from lsd_edge.data.shapes import COLORS, caption, generate

from ..helpers import REPO


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("position_probe", REPO / "scripts" / "position_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("probe_shapes")
    generate(out, seed=3, n_train=40, n_eval=40, image_size=16, questions_per_image=4)
    return out


def records(folder: Path, name: str) -> list[dict]:
    return json.loads((folder / name).read_text())


def test_every_phrasing_asks_what_its_scene_answers(probe, shapes):
    evaluation = records(shapes, "eval.json")
    scenes = {r["image"]: probe.scene_of(r) for r in evaluation}
    rng = random.Random(0)
    verify = probe.rephrase("verify", evaluation, scenes, rng)
    assert len(verify) == len(evaluation) and {r["conversations"][1]["value"] for r in verify} == {
        "yes",
        "no",
    }
    for r in verify:
        question, answer = (t["value"] for t in r["conversations"])
        by_cell = {s.position: s.color for s in scenes[r["image"]].shapes}
        cell = next(p for p in by_cell if f" {p} " in question)  # only occupied cells are asked about
        color = next(c for c in COLORS if question.endswith(f" {c} ?"))
        assert (by_cell[cell] == color) == (answer == "yes")
    position = [r for r in evaluation if r["type"] == "position"]
    check = probe.rephrase("check", evaluation, scenes, rng)
    assert [r["conversations"] for r in check] == [r["conversations"] for r in position]
    text = probe.rephrase("text", evaluation, scenes, rng)
    for r, source in zip(text, position, strict=True):
        assert "image" not in r
        question = source["conversations"][0]["value"].split("\n", 1)[1]
        assert r["conversations"][0]["value"] == f"{caption(scenes[source['image']])}\n{question}"
    for r in probe.rephrase("compare", evaluation, scenes, rng):
        a, b = r["conversations"][0]["value"].split()[2:5:2]
        assert (a == b) == (r["conversations"][1]["value"] == "yes")


def test_cells_of_tokens_are_the_quadrants_in_reading_order(probe):
    assert probe.cells_of_tokens(2).tolist() == [0, 1, 2, 3]
    assert probe.cells_of_tokens(4).tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]


@pytest.mark.parametrize("phrasing", ["check", "verify", "text", "compare"])
def test_each_phrasing_trains_and_scores_held_out_questions(
    probe, shapes, teacher_dir, tmp_path, capsys, phrasing
):
    out = tmp_path / "curve.json"
    argv = [str(teacher_dir), "--data", str(shapes), "--phrasing", phrasing, "--steps", "2", "--every", "1"]
    probe.main([*argv, "--batch-size", "4", "--eval-samples", "6", "--json", str(out)])
    printed = capsys.readouterr().out
    assert f"{phrasing}: " in printed and "step 2: loss" in printed
    curve = json.loads(out.read_text())["curve"]
    assert [c["step"] for c in curve] == [0, 1, 2] and all(0 <= c["accuracy"] <= 1 for c in curve)


def test_a_second_phrasing_is_trained_on_but_not_scored(probe, shapes, teacher_dir, capsys):
    argv = [str(teacher_dir), "--data", str(shapes), "--phrasing", "verify", "--with", "search"]
    probe.main([*argv, "--steps", "1", "--batch-size", "4", "--eval-samples", "6"])
    printed = capsys.readouterr().out
    # the verify questions, and as many search questions: twice the training set, held-out verify only
    evaluation = records(shapes, "instruct.json")
    assert f"verify: {2 * len(evaluation)} training and 6 held-out questions" in printed
    assert "is there a" not in printed.split("e.g.")[1].splitlines()[0]


def test_the_visual_probe_reads_cells_and_colours(probe, shapes, teacher_dir, capsys):
    probe.main([str(teacher_dir), "--data", str(shapes), "--visual", "--scenes", "40"])
    printed = capsys.readouterr().out
    assert "2 x 2 visual tokens" in printed
    assert "tower: cell of a token on a shape" in printed and "projector: cell of a token" in printed


def test_the_lookup_probe_reads_the_asked_colour_after_every_block(probe, shapes, teacher_dir, capsys):
    probe.main([str(teacher_dir), "--data", str(shapes), "--lookup", "--scenes", "30"])
    printed = capsys.readouterr().out
    # the embeddings and the conftest teacher's two blocks: three accuracies
    layers = printed.split("each block: ")[1].split(", ")
    assert len(layers) == 3 and all(0 <= float(a) <= 1 for a in layers)


def test_a_folder_that_is_not_the_quadrants_layout_is_refused(probe, shapes, teacher_dir, tmp_path):
    with pytest.raises(SystemExit, match="not a ShapesVQA folder"):
        probe.main([str(teacher_dir), "--data", str(tmp_path)])
    (tmp_path / "shapes.json").write_text(json.dumps({"layout": "free"}))
    with pytest.raises(SystemExit, match="the free layout"):
        probe.main([str(teacher_dir), "--data", str(tmp_path)])
