"""Exact-match evaluation: normalisation, scoring per type, greedy answers from a model."""

from __future__ import annotations

import json

import pytest

from lsd_edge.data.questions import EvalItem, load_eval_items
from lsd_edge.errors import DataError
from lsd_edge.evaluate.greedy import evaluate
from lsd_edge.evaluate.score import normalize_answer, score
from lsd_edge.models.load import load_llava
from lsd_edge.runtime.torch_runner import greedy_answers


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


def test_evaluate_model(lively_dir, shapes_dir, tmp_path):
    """Eval data whose references are the model's own answers (asked one at a time, no padding) on
    every other question: batched evaluation must score exactly half."""
    model, processor = load_llava(str(lively_dir))
    items = load_eval_items(shapes_dir / "eval.json", shapes_dir / "images", processor)
    own = greedy_answers(model, processor, items, max_new_tokens=3, batch_size=1)
    assert all(a.strip() for a in own) and len(set(own)) > 1, own  # answers that vary with the question
    recs = json.loads((shapes_dir / "eval.json").read_text())
    assert len(recs) == len(items) == 8  # one question per record
    for i, r in enumerate(recs):
        r["conversations"][1]["value"] = own[i] if i % 2 == 0 else "no such answer"
    (tmp_path / "eval.json").write_text(json.dumps(recs))
    res = evaluate(lively_dir, tmp_path / "eval.json", shapes_dir / "images", max_new_tokens=3)
    d = res.as_dict()
    assert d["n"] == 8 and d["correct"] == 4 and d["accuracy"] == 0.5
    assert set(d["by_type"]) <= {"color", "shape", "count", "position", "existence"}
    assert sum(v["n"] for v in d["by_type"].values()) == 8
    assert sum(v["correct"] for v in d["by_type"].values()) == 4
    assert [e["correct"] for e in d["examples"]] == [True, False, True, False, True]


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
