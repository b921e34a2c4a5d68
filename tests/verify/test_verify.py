"""`lsd-edge verify`: one table over every runtime and variant of an export, judged against PyTorch;
a corrupted variant or an impossible bound fails in one red line naming the row and the figure;
folders, eval data and bounds it cannot use fail in one line."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from lsd_edge.runtime.torch_runner import TorchRunner
from lsd_edge.verify.browser import browser_missing
from lsd_edge.verify.local import llama_missing
from lsd_edge.verify.node import node_missing
from lsd_edge.verify.plan import VerifyError, eval_questions
from lsd_edge.verify.report import first_token_kl

from ..helpers import one_red_line, red_line_after_progress, run

N = 6  # questions per row
TOKENS = "4"


def pytorch_answer_key(model_dir, data, images, out):
    """`data`'s eval records with PyTorch's own answers as references: PyTorch scores 100%, so a
    row that answers otherwise loses exact match (a random student scores 0 on the real answers)."""
    runner = TorchRunner(model_dir)
    _, items = eval_questions(data, images, N, runner.processor)
    answers = runner.answers(items, int(TOKENS))  # through the decode loop, as verify asks PyTorch
    records = json.loads(data.read_text())
    seen, keyed = 0, []
    for rec in records:  # verify asks each record's first question
        if seen == len(answers):
            break
        rec = {**rec, "conversations": rec["conversations"][:2]}
        rec["conversations"][1] = {**rec["conversations"][1], "value": answers[seen]}
        keyed.append(rec)
        seen += 1
    out.write_text(json.dumps(keyed))
    return out


def corrupt_fp32_embeddings(folder):
    """The fp32 token embeddings of an export scaled and shuffled, as a broken conversion would leave them."""
    import onnx
    from onnx import numpy_helper

    path = folder / "onnx" / "embed_tokens.onnx"
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    w = numpy_helper.to_array(init)
    rng = np.random.default_rng(0)
    init.CopyFrom(numpy_helper.from_array(rng.permutation(w) * 3, init.name))
    onnx.save(model, str(path))


def required(*runtimes: str) -> list[str]:
    """`--require R` for each runtime CI requires (LSD_EDGE_REQUIRE_NODE=1, ...): there it may not be skipped."""
    env = {"node": "NODE", "browser": "BROWSER", "llama.cpp": "LLAMA_CPP"}
    return [
        a for r in runtimes if os.environ.get(f"LSD_EDGE_REQUIRE_{env[r]}") == "1" for a in ("--require", r)
    ]


def verify_args(folder, data, images, *more):
    """verify on N questions of `data`, whose images are in `images`."""
    return [
        "verify",
        str(folder),
        "--data",
        str(data),
        "--images",
        str(images),
        "--n",
        str(N),
        "--max-new-tokens",
        TOKENS,
        *more,
    ]


@pytest.mark.slow
def test_honest_export_passes_and_a_corrupted_variant_fails(
    lively_dir, lively_onnx_dir, shapes_dir, tmp_path, monkeypatch, capsys
):
    data = pytorch_answer_key(
        lively_dir, shapes_dir / "eval.json", shapes_dir / "images", tmp_path / "key.json"
    )
    # the lively student's int8 graphs are far from PyTorch by design (tests/helpers.py): its own bound
    loose = ["--max-drop", "onnx/int8=100", "--max-drop", "node/int8=100"]
    only = ["--only", "onnx", "--only", "node", "--only", "browser/fp32"] + required("node", "browser")
    code, out, err = run(
        monkeypatch,
        capsys,
        *verify_args(
            lively_onnx_dir, data, shapes_dir / "images", *loose, *only, "--json", str(tmp_path / "v.json")
        ),
    )
    assert code == 0, err
    result = json.loads((tmp_path / "v.json").read_text())
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows)[:3] == ["pytorch/fp32", "onnx/fp32", "onnx/int8"]
    assert rows["pytorch/fp32"]["accuracy"] == 1.0 and result["questions"] == N
    fp32 = rows["onnx/fp32"]
    assert fp32["status"] == "ok" and fp32["accuracy"] == 1.0 and fp32["agreement"] == 1.0
    assert 0 <= fp32["first_token_kl"] < 1e-4
    assert rows["onnx/int8"]["first_token_kl"] > fp32["first_token_kl"]
    if node_missing() is None:
        assert rows["node/fp32"]["agreement"] == 1.0 and rows["node/fp32"]["first_token_kl"] is None
    else:
        assert rows["node/fp32"]["status"] == "skipped" and rows["node/fp32"]["reason"] == node_missing()
    assert "lsd-edge verify" in out and "every runtime within its bounds" in out
    if browser_missing() is None:  # the page's WASM fp32 answers as the runner does
        assert rows["browser/fp32"]["agreement"] == 1.0 and rows["browser/fp32"]["accuracy"] == 1.0
    else:
        assert rows["browser/fp32"]["status"] == "skipped"
    assert "browser/int8" not in rows and not result["failures"]
    assert result["bounds"]["max_drop"] == {"": 1.0, "onnx/int8": 100.0, "node/int8": 100.0}

    broken = tmp_path / "broken"
    shutil.copytree(lively_onnx_dir, broken)
    corrupt_fp32_embeddings(broken)
    code, out, err = run(
        monkeypatch, capsys, *verify_args(broken, data, shapes_dir / "images", "--only", "onnx/fp32")
    )
    line = red_line_after_progress(err)
    assert code == 1 and "verify failed: onnx/fp32: exact match" in line and "below PyTorch's 100.0%" in line
    assert "onnx/fp32: exact match" in out  # the table and its failures come first, on stdout

    # an impossible bound: the same answers as PyTorch yet 5 points above it asked for
    code, _, err = run(
        monkeypatch,
        capsys,
        *verify_args(lively_onnx_dir, data, shapes_dir / "images", "--only", "onnx/fp32", "--max-drop", "-5"),
    )
    assert (
        code == 1
        and "onnx/fp32: exact match 100.0% is 0.0 points below PyTorch's 100.0% (bound -5)"
        in red_line_after_progress(err)
    )
    # a low agreement fails on its own: the corrupted fp32 graphs, their exact-match bound lifted
    code, _, err = run(
        monkeypatch,
        capsys,
        *verify_args(
            broken,
            data,
            shapes_dir / "images",
            "--only",
            "onnx/fp32",
            "--min-agreement",
            "onnx/fp32=0.99",
            "--max-drop",
            "onnx/fp32=100",
        ),
    )
    assert code == 1 and "onnx/fp32: agrees with PyTorch on" in red_line_after_progress(err)


def test_a_required_runtime_that_cannot_run_fails(student_dir, shapes_dir, tmp_path, monkeypatch, capsys):
    """A fake ONNX export with no graphs to run: its rows are measured only if they can run; a
    skipped runtime asked for with --require fails."""
    monkeypatch.setattr("lsd_edge.verify.run.MISSING", {"node": lambda: "no node on PATH (test)"})
    export = fake_export(tmp_path / "export", student_dir)
    data = shapes_dir / "eval.json"
    code, out, err = run(
        monkeypatch,
        capsys,
        *verify_args(export, data, shapes_dir / "images", "--only", "node", "--require", "node"),
    )
    line = red_line_after_progress(err)
    assert code == 1 and "node/fp32: required (--require node) but skipped: no node on PATH (test)" in line
    assert "node/fp32 skipped: no node on PATH" in out
    # a runtime that cannot load its files is a failed row naming why, not a traceback
    code, out, err = run(
        monkeypatch, capsys, *verify_args(export, data, shapes_dir / "images", "--only", "onnx")
    )
    line = red_line_after_progress(err)
    assert (
        code == 1
        and line.startswith("error: verify failed: onnx/fp32: ")
        and "missing model config" in line
        and "missing model config" in out.replace("\n", "")
    )


def fake_export(folder, model_dir):
    """An export folder in the layout whose graphs are a few bytes, made from `model_dir`."""
    (folder / "onnx").mkdir(parents=True)
    for g in ("vision_encoder", "embed_tokens", "decoder_model_merged"):
        (folder / "onnx" / f"{g}.onnx").write_bytes(b"not a graph")
    (folder / "export_report.json").write_text(json.dumps({"model_dir": str(model_dir)}))
    return folder


def test_bad_inputs_are_one_red_line(student_dir, shapes_dir, tmp_path, monkeypatch, capsys):
    data = shapes_dir / "eval.json"
    (tmp_path / "empty").mkdir()
    gone = fake_export(tmp_path / "orphan", tmp_path / "deleted-student")
    cases = [
        (
            ["verify", str(tmp_path / "empty"), "--data", str(data)],
            "not an export (no onnx/*.onnx, no *.gguf",
        ),
        (["verify", str(tmp_path / "nowhere")], "no such folder"),
        (["verify", str(student_dir), "--data", str(tmp_path / "missing.json")], "no such eval data file"),
        (["verify", str(student_dir)], "its recipe names no eval split; pass --data"),
        (["verify", str(gone), "--data", str(data)], "is not there; name it with --pytorch"),
        (
            ["verify", str(student_dir), "--data", str(data), "--only", "tflite"],
            "--only tflite: choose among",
        ),
        (
            ["verify", str(student_dir), "--data", str(data), "--require", "ollama"],
            "--require ollama: choose among",
        ),
        (
            ["verify", str(student_dir), "--data", str(data), "--max-drop", "tvm=1"],
            "--max-drop tvm=1: name a runtime",
        ),
        (
            ["verify", str(student_dir), "--data", str(data), "--max-kl", "onnx=low"],
            "--max-kl onnx=low: give a number",
        ),
    ]
    for args, message in cases:
        code, _, err = run(monkeypatch, capsys, *args)
        assert code == 1 and message in one_red_line(err), (args, err)


def test_eval_split_and_max_new_tokens_come_from_the_recipe(student_dir, shapes_dir, tmp_path, recipe_dict):
    """No --data: the eval split the model folder's recipe names, at its [eval] max_new_tokens; the
    PyTorch folder given alone is a table of one row."""
    from lsd_edge.recipe.toml import dumps_toml
    from lsd_edge.verify.run import VerifySettings, verify

    model = tmp_path / "student"
    shutil.copytree(student_dir, model)
    recipe_dict["data"]["root"] = str(shapes_dir)
    (model / "recipe.toml").write_text(dumps_toml(recipe_dict))
    result = verify([model], VerifySettings(n=3))
    assert result.data == str(shapes_dir / "eval.json") and result.questions == 3
    assert result.max_new_tokens == recipe_dict["eval"]["max_new_tokens"]
    assert [r.key for r in result.rows] == ["pytorch/fp32"] and result.rows[0].agreement == 1.0
    recipe_dict["data"]["root"] = str(tmp_path / "elsewhere")
    (model / "recipe.toml").write_text(dumps_toml(recipe_dict))
    with pytest.raises(VerifyError, match="elsewhere/eval.json: no such eval data file; pass --data"):
        verify([model], VerifySettings(n=3))


def test_two_models_at_once_are_refused(student_dir, teacher_dir, tmp_path, monkeypatch, capsys):
    a, b = fake_export(tmp_path / "a", student_dir), fake_export(tmp_path / "b", teacher_dir)
    code, _, err = run(monkeypatch, capsys, "verify", str(a), str(b), "--data", str(tmp_path / "d.json"))
    assert code == 1 and "the folders come from different models" in one_red_line(err)


def test_first_token_kl():
    a = np.array([2.0, 0.0, -1.0])
    assert first_token_kl([a], [a.copy()]) == pytest.approx(0.0, abs=1e-12)
    p = np.exp(a) / np.exp(a).sum()
    q = np.exp(a[::-1]) / np.exp(a[::-1]).sum()
    assert first_token_kl([a], [a[::-1].copy()]) == pytest.approx(float(np.sum(p * np.log(p / q))))


def shuffle_gguf_embeddings(path):
    """The token embeddings of a GGUF file shuffled in place (rows kept whole), as a broken writer would."""
    import gguf

    reader = gguf.GGUFReader(str(path), "r+")
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    rows = t.data.reshape(t.data.shape[0], -1)
    rows[:] = np.random.default_rng(0).permutation(np.array(rows))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_one_table_over_every_runtime_of_one_model(standins, tmp_path, monkeypatch, capsys):
    """The GGUF tests' BPE student exported both ways (ONNX fp32, GGUF f16): one table of PyTorch,
    ONNX Runtime, Node, the browser page and llama.cpp; then a GGUF copy with shuffled token
    embeddings fails on exact match."""
    if llama_missing() is not None and "--require" not in required("llama.cpp"):
        pytest.skip(llama_missing())
    from lsd_edge.export.gguf.pipeline import export_gguf
    from lsd_edge.export.onnx.pipeline import export

    from ..helpers import bpe_llava

    student = bpe_llava(standins["teacher"], tmp_path / "bpe-student")
    # The ONNX runner renders templates without transformers' {% generation %} tag (it marks what
    # training learns, and renders as its body): the stand-in's template, without the tag, renders alike
    template = student / "chat_template.jinja"
    text = template.read_text()
    template.write_text(text.replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    data, images = standins["data"] / "eval/gqa_testdev_balanced.json", standins["data"]
    key = pytorch_answer_key(student, data, images, tmp_path / "key.json")
    gguf_dir = export_gguf(student, tmp_path / "gguf", {"quant": "f16", "samples": 2}).output
    onnx_dir = export(student, tmp_path / "onnx", {"quantize": "none", "parity_samples": 2}).output
    args = verify_args(onnx_dir, key, images, "--json", str(tmp_path / "v.json"))
    args[2:2] = [str(gguf_dir)]  # verify ONNX GGUF --data ...
    required_here = required("node", "browser", "llama.cpp")
    # transformers.js picks from every output row, the 16 that pad the stand-in's vocabulary to 320
    # included, which the decode loop (PyTorch's, ONNX Runtime's, llama.cpp's here) leaves out: on
    # this random-weight student a pad token wins in 2 of 6 answers (measured), so verify shows it
    loose = ["--max-drop", "node=50", "--max-drop", "browser=50"]
    code, out, err = run(monkeypatch, capsys, *args, *required_here, *loose)
    assert code == 0, err
    rows = {r["key"]: r for r in json.loads((tmp_path / "v.json").read_text())["rows"]}
    assert list(rows) == ["pytorch/fp32", "onnx/fp32", "node/fp32", "browser/fp32", "llama.cpp/f16"]
    assert rows["onnx/fp32"]["agreement"] == 1.0 and rows["onnx/fp32"]["accuracy"] == 1.0
    for key_ in ("node/fp32", "browser/fp32"):
        if rows[key_]["status"] != "skipped":
            assert rows[key_]["agreement"] >= 0.5, rows[key_]
    f16 = rows["llama.cpp/f16"]  # measured: every answer PyTorch's, first-token KL 3.0e-5
    assert f16["status"] == "ok" and f16["agreement"] == 1.0 and f16["accuracy"] == 1.0
    assert 0 <= f16["first_token_kl"] < 1e-3 and 0 <= rows["onnx/fp32"]["first_token_kl"] < 1e-4

    shuffle_gguf_embeddings(gguf_dir / "bpe-student.gguf")
    code, out, err = run(monkeypatch, capsys, *verify_args(gguf_dir, key, images))
    line = red_line_after_progress(err)
    assert code == 1 and "verify failed: llama.cpp/f16: exact match" in line and "PyTorch's 100.0%" in line
