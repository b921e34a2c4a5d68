"""Teacher-regenerated data (LLaVADI): the teacher's own greedy answers, written and trained on."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from lsd_edge.data.chat import ChatEncoder
from lsd_edge.data.dataset import LlavaDataset
from lsd_edge.data.questions import EvalItem
from lsd_edge.data.records import load_image, to_messages
from lsd_edge.distill.regenerate import regenerate
from lsd_edge.errors import LsdEdgeError, RecipeError
from lsd_edge.recipe.load import parse_recipe
from lsd_edge.recipe.toml import dumps_toml
from lsd_edge.runtime.torch_runner import greedy_answers
from lsd_edge.train.pipeline import DistillOptions, distill

from ..helpers import one_red_line, run
from ..messy import KINDS, messy_data


def _two_turn_data(shapes_dir: Path, out: Path) -> Path:
    """Three two-question records on ShapesVQA images, plus one whose image is missing."""
    recs = []
    for i in range(3):
        recs.append(
            {
                "id": f"r{i}",
                "image": f"train_00000{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nwhat color is the square ?"},
                    {"from": "gpt", "value": "red"},
                    {"from": "human", "value": "how many shapes are there ?"},
                    {"from": "gpt", "value": "two"},
                ],
            }
        )
    recs.append({"id": "bad", "image": "nope.png", "conversations": recs[0]["conversations"]})
    path = out / "two.json"
    path.write_text(json.dumps(recs))
    return path


def _expected(model, processor, images_dir, records, max_turns):
    """Answers made turn by turn the plain way: one greedy call per turn, own earlier answers kept."""
    enc = ChatEncoder(processor)
    out = []
    for rec in records:
        messages, _ = to_messages(rec, max_turns)
        images = [load_image(images_dir / rec["image"])]
        answers = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            item = EvalItem("x", "all", enc.encode_prompt(messages[:i]), images, m["content"][0]["text"])
            text = greedy_answers(model, processor, [item], max_new_tokens=3)[0].strip() or item.answer
            messages[i] = {"role": "assistant", "content": [{"type": "text", "text": text}]}
            answers.append(text)
        out.append(answers)
    return out


@pytest.mark.parametrize("max_turns", [None, 1])
def test_regenerate_writes_the_teachers_answers(tmp_path, shapes_dir, processor, tiny_teacher, max_turns):
    src = _two_turn_data(shapes_dir, tmp_path)
    out = tmp_path / "regen.json"
    summary = regenerate(
        tiny_teacher,
        processor,
        src,
        shapes_dir / "images",
        out,
        max_turns=max_turns,
        max_new_tokens=3,
        batch_size=2,
        block=2,  # records answered in blocks: the same answers
    )
    got = json.loads(out.read_text())
    original = json.loads(src.read_text())
    assert [r["id"] for r in got] == [r["id"] for r in original]
    assert got[3] == original[3] and summary.bad_records == 1, "an unusable record is kept as it is"
    want = _expected(tiny_teacher, processor, shapes_dir / "images", original[:3], max_turns)
    for rec, orig, answers in zip(got[:3], original[:3], want, strict=True):
        assert rec["image"] == orig["image"]
        assert [t["value"] for t in rec["conversations"] if t["from"] == "human"] == [
            t["value"] for t in orig["conversations"] if t["from"] == "human"
        ]
        gpt = [t["value"] for t in rec["conversations"] if t["from"] == "gpt"]
        assert gpt[: len(answers)] == answers
        if max_turns == 1:
            assert gpt[1] == "two", "a turn the stage never reads is left as it was"
    assert summary.answers == 3 * (max_turns or 2)
    assert summary.changed + summary.kept_reference <= summary.answers
    # the regenerated file is an ordinary LLaVA data set
    assert len(LlavaDataset(out, shapes_dir / "images", processor)) == 4


def test_distill_trains_on_regenerated_data(recipe_dict):
    r = parse_recipe(
        recipe_dict, overrides=["stages[1].regenerate=true", "stages[1].regenerate_max_new_tokens=3"]
    )
    distill(r)
    root = Path(r.run.output_dir)
    data = root / "regenerated" / "sft" / "data.json"
    manifest = json.loads((root / "regenerated" / "sft" / "manifest.json").read_text())
    assert manifest["records"] == 64 and manifest["answers"] == 64
    assert json.loads((root / "sft" / "metrics.json").read_text())["regenerated_data"] == str(data)
    assert "regenerated_data" not in json.loads((root / "dft" / "metrics.json").read_text())
    # other settings for the answers: refused, not silently mixed in
    shutil.rmtree(root / "sft")
    shutil.rmtree(root / "dft")
    other = parse_recipe(
        recipe_dict, overrides=["stages[1].regenerate=true", "stages[1].regenerate_max_new_tokens=5"]
    )
    with pytest.raises(
        LsdEdgeError,
        match=r"regenerated answers in .* is stale: max_new_tokens changed \(3 -> 5\); make them again",
    ):
        distill(other, DistillOptions(resume=True))


def test_teacher_stages_do_not_regenerate(recipe_dict):
    with pytest.raises(RecipeError, match=r"teacher.stages\[1\].regenerate"):
        parse_recipe(recipe_dict, overrides=["teacher.stages[1].regenerate=true"])


def test_regenerate_command(tmp_path, monkeypatch, capsys, recipe_dict):
    d = copy.deepcopy(recipe_dict)
    d["stages"][1]["regenerate_max_new_tokens"] = 3
    path = tmp_path / "r.toml"
    path.write_text(dumps_toml(d))
    code, out, err = run(monkeypatch, capsys, "regenerate", str(path), "--stage", "sft")
    assert code == 0, err
    assert "wrote" in out and "64 answers to 64 records" in out and "regenerate = true" in out
    code, out, _ = run(monkeypatch, capsys, "regenerate", str(path), "--stage", "sft")
    assert code == 0 and "up to date" in out
    code, _, err = run(monkeypatch, capsys, "regenerate", str(path), "--stage", "nope")
    assert code == 1 and "no such stage" in one_red_line(err)


def test_regenerate_over_messy_data_keeps_what_it_cannot_answer(tmp_path, processor, tiny_teacher):
    """Text-only, multi-image and broken records: the teacher answers the usable ones, with the
    images shown before each answer; every other record is written as it was."""
    src, kinds = messy_data(tmp_path / "messy", seed=2, n=40)
    out = tmp_path / "regen.json"
    summary = regenerate(
        tiny_teacher, processor, src, src.parent / "images", out, max_new_tokens=2, batch_size=4
    )
    got, original = json.loads(out.read_text()), json.loads(src.read_text())
    assert len(got) == len(original) == summary.records
    usable = [KINDS[k][1] is None or k == "long-prompt" for k in kinds]  # no max_length in regeneration
    for rec, orig, ok in zip(got, original, usable, strict=True):
        if not ok:
            assert rec == orig
    assert summary.bad_records == usable.count(False)
    assert len(LlavaDataset(out, src.parent / "images", processor)) == len(original)
