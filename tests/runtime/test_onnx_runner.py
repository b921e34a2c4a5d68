"""The ONNX Runtime runner: same prompts, pixels and answers as the PyTorch runner, without torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lsd_edge.errors import RuntimeModelError
from lsd_edge.infer import Runner, load_runner
from lsd_edge.runtime.onnx.runner import OnnxRunner
from lsd_edge.runtime.textgen import SamplingParams
from lsd_edge.runtime.torch_runner import TorchRunner

from ..helpers import REPO

QUESTIONS = ("what color is the circle ?", "how many shapes are there ?", "is there a red square ?")


# The lively student (conftest): its answers differ from question to question, so equal answers
# mean the runner saw the same prompt and image, not that every prompt gives the same text.
@pytest.fixture(scope="module")
def torch_runner(lively_dir):
    return TorchRunner(lively_dir)


@pytest.fixture(scope="module")
def runner(lively_onnx_dir):
    return OnnxRunner(lively_onnx_dir, variant="fp32")


def _eval_pairs(shapes_dir):
    recs = json.loads((shapes_dir / "eval.json").read_text())
    for rec in recs:
        q = rec["conversations"][0]["value"].replace("<image>", "").strip()
        yield Image.open(shapes_dir / "images" / rec["image"]).convert("RGB"), q


def test_prompt_ids_and_stop_tokens_equal_torch(runner, torch_runner, shapes_dir):
    for q in QUESTIONS + ("an unknown word , and punctuation !",):
        for with_image in (True, False):
            assert runner.prompt_ids(q, with_image) == torch_runner.prompt_ids(q, with_image)
    assert runner.stop_ids == torch_runner.stop_ids
    assert runner.vocab_rows == torch_runner.vocab_rows


def test_pixel_values_equal_torch_exactly(runner, torch_runner, shapes_dir):
    rng = np.random.default_rng(0)
    images = [im for im, _ in _eval_pairs(shapes_dir)][:3]
    images.append(Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)))  # resized, not square
    images.append(
        Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), "RGBA")
    )  # alpha over white
    images.append(Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L"))
    for im in images:
        want = torch_runner.processor.image_processor(images=[im], return_tensors="pt")[
            "pixel_values"
        ].numpy()
        got = runner.pixel_values(im)
        assert got.dtype == np.float32 and np.array_equal(got, want)


def test_answers_equal_torch_runner(runner, torch_runner, shapes_dir):
    texts = set()
    for image, q in _eval_pairs(shapes_dir):
        want = torch_runner.generate(image, q, 6)
        got = runner.generate(image, q, 6)
        assert got.token_ids == want.token_ids and got.text == want.text and got.stopped == want.stopped
        texts.add(got.text)
    assert len(texts) > 1, "answers that never vary cannot show a wrong image or question"
    got = runner.generate(None, QUESTIONS[0], 3)  # text only: no vision encoder call
    assert got.token_ids == torch_runner.generate(None, QUESTIONS[0], 3).token_ids


def test_both_runners_take_an_image_as_a_path_or_bytes(runner, torch_runner, shapes_dir):
    rec = json.loads((shapes_dir / "eval.json").read_text())[0]
    path = shapes_dir / "images" / rec["image"]
    q = rec["conversations"][0]["value"].replace("<image>", "").strip()
    want = runner.generate(Image.open(path), q, 4).token_ids
    for r in (runner, torch_runner):
        assert r.generate(str(path), q, 4).token_ids == want
        assert r.generate(path.read_bytes(), q, 4).token_ids == want
        with pytest.raises(RuntimeModelError, match="image: give a path, bytes or a PIL image, not list"):
            r.generate([path], q, 4)


def test_streaming_sampling_and_ignore_eos(runner, shapes_dir):
    image, q = next(_eval_pairs(shapes_dir))
    pieces = []
    g = runner.generate(image, q, 7, ignore_eos=True, on_text=pieces.append)
    assert g.new_tokens == 7 and g.stopped == "length" and "".join(pieces) == g.text
    assert g.ttft_s > 0 and g.total_s >= g.ttft_s and g.prompt_tokens == len(runner.prompt_ids(q, True))
    s = SamplingParams(do_sample=True, temperature=1.5, top_k=10, top_p=0.9, seed=3)
    a = runner.generate(image, q, 8, sampling=s, ignore_eos=True)
    b = runner.generate(image, q, 8, sampling=s, ignore_eos=True)
    assert a.token_ids == b.token_ids and all(t < runner.vocab_rows for t in a.token_ids)


def test_io_binding_path_matches(lively_onnx_dir, runner, shapes_dir):
    bound = OnnxRunner(lively_onnx_dir, variant="fp32", io_binding=True)
    answers = set()
    for image, q in list(_eval_pairs(shapes_dir))[:3]:
        want = runner.generate(image, q, 5, ignore_eos=True).token_ids
        assert bound.generate(image, q, 5, ignore_eos=True).token_ids == want
        answers.add(tuple(want))
    assert len(answers) > 1


def test_variants_and_info(onnx_dir):
    r = load_runner(onnx_dir)
    assert isinstance(r, OnnxRunner) and isinstance(r, Runner)
    assert r.variant == "int8"  # what the export was asked for
    info = r.info()
    assert info["backend"] == "onnx" and info["variant"] == "int8" and 0 < info["size_mb"]
    assert info["size_mb"] < OnnxRunner(onnx_dir, variant="fp32").info()["size_mb"]
    with pytest.raises(RuntimeModelError, match="missing int4 graph; this folder has fp32, int8"):
        OnnxRunner(onnx_dir, variant="int4")
    with pytest.raises(RuntimeModelError, match="variant 'int3'"):
        OnnxRunner(onnx_dir, variant="int3")


def test_cuda_without_cuda_provider(onnx_dir):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(RuntimeModelError, match="onnxruntime-gpu"):
        OnnxRunner(onnx_dir, device="cuda")


def _copy(onnx_dir, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(onnx_dir, out)
    return out


@pytest.mark.parametrize(
    "damage,needle",
    [
        (
            lambda d: (d / "onnx" / "decoder_model_merged_int8.onnx").unlink(),
            "decoder_model_merged_int8.onnx: missing int8",
        ),
        (lambda d: (d / "onnx" / "vision_encoder_int8.onnx").write_bytes(b"not a protobuf"), "cannot load"),
        (
            lambda d: (d / "onnx" / "decoder_model_merged_int8.onnx").write_bytes(
                (d / "onnx" / "decoder_model_merged_int8.onnx").read_bytes()[:5000]
            ),
            "corrupt or incomplete",
        ),
        (lambda d: (d / "tokenizer.json").unlink(), "missing tokenizer"),
        (lambda d: (d / "config.json").write_text("{nope"), "config.json: not valid JSON"),
    ],
)
def test_missing_or_corrupt_file_is_one_line(tmp_path, onnx_dir, damage, needle):
    folder = _copy(onnx_dir, tmp_path)
    damage(folder)
    with pytest.raises(RuntimeModelError) as e:
        load_runner(folder)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_no_folder(tmp_path):
    with pytest.raises(RuntimeModelError, match="no such model folder"):
        load_runner(tmp_path / "nope")


BLOCKED = """
import json, sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from PIL import Image
from lsd_edge.infer import load_runner
runner = load_runner(sys.argv[1])
g = runner.generate(Image.open(sys.argv[2]), sys.argv[3], 5, ignore_eos=True)
print(json.dumps({"ids": g.token_ids, "text": g.text, "torch": [m for m in sys.modules if m.startswith("torch")]}))
"""


def test_runner_works_where_torch_cannot_be_imported(lively_onnx_dir, shapes_dir):
    image = sorted((shapes_dir / "images").glob("eval_*.png"))[0]
    q = QUESTIONS[1]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED, str(lively_onnx_dir), str(image), q],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["torch"] == ["torch"]  # only the blocking entry itself
    want = load_runner(lively_onnx_dir).generate(Image.open(image), q, 5, ignore_eos=True)
    assert got["ids"] == want.token_ids and got["text"] == want.text
