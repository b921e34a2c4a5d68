"""Exact-match evaluation: normalisation, scoring per type, greedy answers from a model."""

from __future__ import annotations

import json

import pytest

from lsd_edge.data.questions import EvalItem, load_eval_items
from lsd_edge.errors import DataError
from lsd_edge.evaluate.greedy import evaluate
from lsd_edge.evaluate.score import normalize_answer, score


def test_normalize_answer():
    assert normalize_answer("  Top  Left. ") == "top left"
    assert normalize_answer("yes") == normalize_answer("Yes .")
    assert normalize_answer("two") != normalize_answer("three")


def test_score_by_type():
    items = [
        EvalItem(str(i), t, [], [], a)
        for i, (t, a) in enumerate([("color", "red"), ("color", "blue"), ("count", "two")])
    ]
    res = score(items, ["red", "green", "Two."])
    assert res.n == 3 and res.correct == 2 and abs(res.accuracy - 2 / 3) < 1e-9
    assert res.by_type["color"]["accuracy"] == 0.5 and res.by_type["count"]["accuracy"] == 1.0


def test_eval_items_one_per_answer(tmp_path, shapes_dir, processor):
    recs = json.loads((shapes_dir / "eval.json").read_text())
    multi = dict(recs[0], id="multi")
    multi["conversations"] = recs[0]["conversations"] + [
        {"from": "human", "value": "how many shapes are there ?"},
        {"from": "gpt", "value": "two"},
    ]
    p = tmp_path / "e.json"
    p.write_text(json.dumps([multi, recs[1]]))
    items = load_eval_items(p, shapes_dir / "images", processor)
    assert [it.id for it in items] == ["multi", "multi/1", recs[1]["id"]]
    assert items[1].answer == "two" and len(items[1].prompt_ids) > len(items[0].prompt_ids)


def test_evaluate_model(teacher_dir, shapes_dir):
    res = evaluate(teacher_dir, shapes_dir / "eval.json", shapes_dir / "images", max_new_tokens=3)
    d = res.as_dict()
    assert (
        d["n"] == 8
        and 0.0 <= d["accuracy"] <= 1.0
        and set(d["by_type"]) <= {"color", "shape", "count", "position", "existence"}
    )
    assert sum(v["n"] for v in d["by_type"].values()) == 8
    assert d["examples"] and "prediction" in d["examples"][0]


def test_no_usable_question(tmp_path, processor):
    p = tmp_path / "e.json"
    p.write_text(
        json.dumps(
            [
                {
                    "id": "x",
                    "image": "missing.png",
                    "conversations": [
                        {"from": "human", "value": "<image>\nq"},
                        {"from": "gpt", "value": "a"},
                    ],
                }
            ]
        )
    )
    with pytest.raises(DataError, match="no usable question.*missing image"):
        load_eval_items(p, tmp_path, processor)
