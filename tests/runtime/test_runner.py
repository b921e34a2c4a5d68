"""The PyTorch runner: same answers as the evaluator, streaming, stop tokens, bad paths."""

from __future__ import annotations

import pytest
from PIL import Image

from lsd_edge.data.questions import load_eval_items
from lsd_edge.errors import RuntimeModelError
from lsd_edge.infer import Runner, load_runner
from lsd_edge.runtime.torch_runner import TorchRunner, greedy_answers


def test_torch_runner_matches_batched_greedy(teacher_dir, shapes_dir):
    runner = load_runner(teacher_dir)
    assert isinstance(runner, TorchRunner) and isinstance(runner, Runner)
    items = load_eval_items(shapes_dir / "eval.json", shapes_dir / "images", runner.processor)
    batched = greedy_answers(runner.model, runner.processor, items, max_new_tokens=4)
    import json

    recs = json.loads((shapes_dir / "eval.json").read_text())
    for rec, want in zip(recs, batched, strict=True):
        q = rec["conversations"][0]["value"].replace("<image>", "").strip()
        image = Image.open(shapes_dir / "images" / rec["image"]).convert("RGB")
        got = runner.generate(image, q, 4)
        assert got.text.strip() == want.strip()
        assert runner.prompt_ids(q, True) == items[recs.index(rec)].prompt_ids


def test_streaming_and_ignore_eos(teacher_dir, shapes_dir):
    runner = TorchRunner(teacher_dir)
    image = Image.open(next((shapes_dir / "images").glob("eval_*.png")))
    pieces = []
    g = runner.generate(image, "how many shapes are there ?", 6, ignore_eos=True, on_text=pieces.append)
    assert g.new_tokens == 6 and g.stopped == "length" and "".join(pieces) == g.text
    assert g.ttft_s > 0 and g.total_s >= g.ttft_s and g.prompt_tokens > 4
    info = runner.info()
    assert info["backend"] == "torch" and info["params"] > 0 and info["size_mb"] > 0


def test_text_only_prompt(teacher_dir):
    runner = TorchRunner(teacher_dir)
    g = runner.generate(None, "how many shapes are there ?", 3)
    with_image = runner.generate(Image.new("RGB", (16, 16)), "how many shapes are there ?", 1)
    # the same prompt less the image's visual tokens and the newline after them
    assert g.prompt_tokens == with_image.prompt_tokens - runner.encoder.n_image_tokens - 1


def test_missing_model_folder(tmp_path):
    with pytest.raises(RuntimeModelError, match="no such model folder"):
        load_runner(tmp_path / "nope")


def test_an_image_is_a_pil_image_a_path_or_bytes(tmp_path):
    import io

    from PIL import Image

    from lsd_edge.errors import RuntimeModelError
    from lsd_edge.runtime.runner import as_image

    im = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    im.save(tmp_path / "a.png")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    from_path, from_bytes = as_image(tmp_path / "a.png"), as_image(buf.getvalue())
    assert as_image(str(tmp_path / "a.png")).tobytes() == from_path.tobytes() == from_bytes.tobytes()
    assert from_path.mode == "RGB" and from_path.getpixel((0, 0)) == (255, 255, 255)  # alpha over white
    assert as_image(im) is im and as_image(None) is None
    for bad, why in [
        (tmp_path / "nope.png", "image: missing image"),
        (b"not an image", "image: corrupt image: 12 bytes that are not an image"),
        (3, "image: give a path, bytes or a PIL image, not int"),
    ]:
        with pytest.raises(RuntimeModelError, match=why):
            as_image(bad)
