"""Model cards: the hub's front matter, what was measured, and usage snippets that run as written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lsd_edge.infer import load_runner
from lsd_edge.models.card import CARD_FACTS, README, CardFacts, code_blocks, model_card
from lsd_edge.runtime.torch_runner import TorchRunner

from ..export.test_transformers_js import WEB, node_or_skip
from ..helpers import REPO, onnx_settings


def _facts(**kw) -> CardFacts:
    base = dict(
        name="qwen student",
        pytorch_dir="runs/q/student",
        export_dir="runs/q/onnx",
        teacher="llava-hf/llava-interleave-qwen-7b-hf",
        student_llm="/models/Qwen1.5-0.5B-Chat",
        recipe="qwen0.5b",
        stages=[{"name": "dpt", "kind": "dpt", "steps": 10, "accuracy": 0.5}],
        data={"instruct": "data/llava_v1_5_mix665k.json"},
        teacher_accuracy=0.62,
        student_accuracy=0.571,
        params=500,
        teacher_params=7000,
    )
    return CardFacts(**{**base, **kw})


def test_front_matter_and_figures():
    card = model_card(_facts())
    head = card.split("---")[1]
    assert "library_name: transformers\n" in head and "pipeline_tag: image-text-to-text" in head
    assert "- llava-hf/llava-interleave-qwen-7b-hf" in head and "/models/" not in head, "hub ids only"
    assert "| this student | 57.1% | 500 |" in card and "| teacher | 62.0% | 7,000 |" in card
    assert [lang for lang, _ in code_blocks(card)] == ["python", "python", "js"]
    assert "500 parameters, 0.07x the teacher's" in card and "## How it was made" in card
    exported = model_card(_facts(export={"variants": ["fp32", "int8"], "default_variant": "int8"}))
    assert (
        "library_name: transformers.js" in exported and "- onnx" in exported and "## This export" in exported
    )


def test_a_folder_without_a_known_teacher_has_no_teacher_row():
    card = model_card(_facts(teacher="not recorded", teacher_params=None, teacher_accuracy=None, stages=[]))
    assert "| this student | 57.1% | 500 |" in card and "with 500 parameters." in card
    assert "| teacher |" not in card and "the teacher's" not in card and "How it was made" not in card


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """The tiny recipe distilled and its student exported (int8)."""
    from lsd_edge.export.onnx.pipeline import export
    from lsd_edge.recipe.load import parse_recipe
    from lsd_edge.train.pipeline import distill

    from ..helpers import tiny_recipe_dict

    tmp = tmp_path_factory.mktemp("card")
    recipe = parse_recipe(tiny_recipe_dict(str(tmp / "data"), str(tmp / "run")))
    distill(recipe)
    student = tmp / "run" / "student"
    out = export(student, tmp / "run" / "onnx", onnx_settings(tmp / "data")).output
    return student, out


def _run_python(code: str, cwd) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""


def _run_js(code: str, tmp_path) -> str:
    node = node_or_skip()
    (tmp_path / "node_modules").symlink_to(WEB / "node_modules")
    script = tmp_path / "snippet.mjs"
    script.write_text(code)
    p = subprocess.run([node, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""


@pytest.mark.slow
@pytest.mark.parametrize("which", ["student", "export"])
def test_the_cards_snippets_run_and_answer_as_the_runners_do(distilled, which, tmp_path):
    student, export_dir = distilled
    folder = student if which == "student" else export_dir
    card = (folder / README).read_text()
    facts = json.loads((student / CARD_FACTS).read_text())
    image, question = facts["example"]
    assert image.endswith(".png") and question and "Distilled with lsd-edge (recipe `test`)" in card
    assert (
        f"| this student | {100 * json.loads((student.parent / 'report.json').read_text())['student']['accuracy']:.1f}%"
        in card
    )
    if which == "export":
        assert "## This export" in card and "| int8 |" in card and "library_name: transformers.js" in card
    blocks = code_blocks(card)
    torch_answer = TorchRunner(student).generate(image, question, 32).text.strip()
    onnx_answer = load_runner(export_dir).generate(image, question, 32).text.strip()
    py_lsd, py_hf, js = (code for _, code in blocks)
    assert _run_python(py_lsd, tmp_path) == (onnx_answer if which == "export" else torch_answer)
    assert _run_python(py_hf, tmp_path) == torch_answer
    assert _run_js(js, tmp_path) == onnx_answer


def test_a_student_folder_runs_in_a_plain_transformers_pipeline(tmp_path, shapes_dir):
    from transformers import pipeline

    from ..helpers import lively_student

    folder = lively_student(tmp_path / "student")
    pipe = pipeline("image-text-to-text", model=str(folder))
    runner = TorchRunner(folder)
    records = json.loads((shapes_dir / "eval.json").read_text())[:3]
    answers = set()
    for r in records:
        image = str(shapes_dir / "images" / r["image"])
        q = r["conversations"][0]["value"].replace("<image>", "").strip()
        messages = [
            {"role": "user", "content": [{"type": "image", "url": image}, {"type": "text", "text": q}]}
        ]
        got = pipe(text=messages, max_new_tokens=8, return_full_text=False)[0]["generated_text"]
        want = runner.generate(image, q, 8).text
        assert got.strip() == want.strip() and want.strip()
        answers.add(want)
    assert len(answers) > 1
