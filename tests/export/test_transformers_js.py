"""The export folder as transformers.js (Node, onnxruntime-node) loads it, unchanged: its greedy
answers equal lsd-edge's own ONNX runner's, token for token, in fp32, int8 and q4.

Needs Node and the pinned npm packages (`cd web && ONNXRUNTIME_NODE_INSTALL=skip npm install
--ignore-scripts`); skipped without them, and failed instead under LSD_EDGE_REQUIRE_NODE=1 (CI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from lsd_edge.export.onnx.pipeline import export
from lsd_edge.infer import load_runner
from lsd_edge.verify.node import WEB, node_answers, node_missing

from ..helpers import LIVELY_VARIANT_BOUNDS, lively_student, onnx_settings

N_QUESTIONS = 20


def node_or_skip() -> str:
    missing = node_missing()
    if missing:
        if os.environ.get("LSD_EDGE_REQUIRE_NODE") == "1":
            pytest.fail(f"LSD_EDGE_REQUIRE_NODE=1 but {missing}")
        pytest.skip(missing)
    return shutil.which("node")


def js_answers(folder, variant: str, items: list[dict], max_new_tokens: int) -> list[dict]:
    """web/answers.mjs over `items` ({image, question}) with the export's `variant`
    (`lsd_edge.verify.node`, the harness `lsd-edge verify` runs)."""
    node_or_skip()
    return node_answers(folder, variant, items, max_new_tokens, timeout_s=300)


def same_tokens(js_ids: list[int], want, stop_ids) -> bool:
    """transformers.js returns the stop token it ended on; lsd-edge's Generation leaves it out."""
    if want.stopped == "stop":
        return js_ids[:-1] == want.token_ids and js_ids[-1] in stop_ids
    return js_ids == want.token_ids


@pytest.fixture(scope="module")
def web_exports(tmp_path_factory):
    """A lively random-weight student (answers differ from question to question) exported with int8
    and with int4 beside the fp32 graphs, and 24 eval questions."""
    from lsd_edge.data.shapes import generate

    node_or_skip()
    tmp = tmp_path_factory.mktemp("web-exports")
    generate(tmp / "shapes", seed=1, n_train=8, n_eval=N_QUESTIONS + 4, image_size=16, questions_per_image=1)
    student = lively_student(tmp / "student")
    folders = {}
    for quantize in ("int8", "int4"):
        settings = onnx_settings(tmp / "shapes", quantize=quantize, parity_samples=2, **LIVELY_VARIANT_BOUNDS)
        folders[quantize] = export(student, tmp / f"onnx-{quantize}", settings).output
    records = json.loads((tmp / "shapes" / "eval.json").read_text())[:N_QUESTIONS]
    items = [
        {
            "image": str(tmp / "shapes" / "images" / r["image"]),
            "question": r["conversations"][0]["value"].replace("<image>", "").strip(),
        }
        for r in records
    ]
    return folders, items


@pytest.mark.slow
@pytest.mark.parametrize("variant,folder", [("fp32", "int8"), ("int8", "int8"), ("int4", "int4")])
def test_transformers_js_answers_equal_the_runner_s(web_exports, tmp_path, variant, folder):
    folders, items = web_exports
    got = js_answers(folders[folder], variant, items, 8)
    # the graphs transformers.js runs: the runner's int8 GEMM prefill of a 4-bit export is its own
    runner = load_runner(folders[folder], variant=variant, prefill="exported")
    assert len(got) == len(items) >= 20
    distinct = set()
    for item, js in zip(items, got, strict=True):
        want = runner.generate(item["image"], item["question"], 8)
        assert same_tokens(js["ids"], want, runner.stop_ids), (item, js["ids"], want.token_ids)
        assert js["text"].strip() == want.text.strip(), item
        distinct.add(tuple(want.token_ids))
    assert len(distinct) > len(items) // 2, "the answers differ from question to question"


def test_a_plain_from_pretrained_loads_the_exported_variant(web_exports, tmp_path):
    """No dtype given: transformers.js loads the variant the export was asked for (config.json's
    transformers.js_config), as an app that knows nothing of lsd-edge would. The fp32 graphs are
    removed from a copy, so loading them instead would fail."""
    folders, items = web_exports
    folder = tmp_path / "q4-only"
    shutil.copytree(folders["int4"], folder)
    for f in (folder / "onnx").glob("*.onnx"):
        if not f.stem.endswith("_q4"):
            f.unlink()
    (tmp_path / "q.json").write_text(json.dumps(items[:1]))
    entry = (
        WEB / "node_modules" / "@huggingface" / "transformers" / "dist" / "transformers.node.mjs"
    ).as_uri()
    script = tmp_path / "plain.mjs"
    script.write_text(
        f"import {{ AutoProcessor, LlavaForConditionalGeneration, RawImage, env }} from {json.dumps(entry)};\n"
        "env.allowRemoteModels = false; env.localModelPath = '/';\n"
        f"const dir = {json.dumps(str(folder))};\n"
        f"const {{ image, question }} = {json.dumps(items[0])};\n"
        "const processor = await AutoProcessor.from_pretrained(dir);\n"
        "const model = await LlavaForConditionalGeneration.from_pretrained(dir);\n"
        "const messages = [{ role: 'user', content: [{ type: 'image' }, { type: 'text', text: question }] }];\n"
        "const text = processor.tokenizer.apply_chat_template(messages, { add_generation_prompt: true, tokenize: false });\n"
        "const inputs = await processor(await RawImage.read(image), text);\n"
        "const out = await model.generate({ ...inputs, max_new_tokens: 8, do_sample: false });\n"
        "console.log(JSON.stringify(Array.from(out.slice(null, [inputs.input_ids.dims.at(-1), null]).data, Number)));\n"
    )
    p = subprocess.run([node_or_skip(), str(script)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    runner = load_runner(folders["int4"], variant="int4", prefill="exported")
    want = runner.generate(items[0]["image"], items[0]["question"], 8)
    assert same_tokens(json.loads(p.stdout.strip().splitlines()[-1]), want, runner.stop_ids)
