"""ShapesVQA: deterministic per seed, held-out eval scenes, and labels that are true of the pixels."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest
from PIL import Image

from lsd_edge.data import shapes
from lsd_edge.data.shapes import BACKGROUND, COLORS, NUMBERS, POSITIONS, QUESTION_TYPES


def _digest(folder) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "shapes.json"
    }


def test_same_seed_same_bytes(tmp_path):
    a = shapes.generate(tmp_path / "a", seed=3, n_train=20, n_eval=5, image_size=32)
    b = shapes.generate(tmp_path / "b", seed=3, n_train=20, n_eval=5, image_size=32)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    c = shapes.generate(tmp_path / "c", seed=4, n_train=20, n_eval=5, image_size=32)
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert a.n_pretrain == 20 and a.n_eval == 5 and b.n_instruct_turns == c.n_instruct_turns


def test_files_and_format(shapes_dir):
    pre = json.loads((shapes_dir / "pretrain.json").read_text())
    ins = json.loads((shapes_dir / "instruct.json").read_text())
    ev = json.loads((shapes_dir / "eval.json").read_text())
    assert len(pre) == 32 and len(ins) == 64 and len(ev) == 8
    for rec in pre + ins + ev:
        assert (shapes_dir / "images" / rec["image"]).is_file()
        conv = rec["conversations"]
        assert conv[0]["from"] == "human" and conv[0]["value"].count("<image>") == 1
        assert conv[1]["from"] == "gpt" and conv[1]["value"]
    # the first n_train instruct records ask one question of every image
    assert sorted(r["image"] for r in ins[:32]) == sorted(r["image"] for r in pre)
    assert {r["type"] for r in ev} <= set(QUESTION_TYPES)


def test_eval_scenes_are_held_out(tmp_path):
    shapes.generate(tmp_path, seed=1, n_train=300, n_eval=100, image_size=32)
    pre = json.loads((tmp_path / "pretrain.json").read_text())
    ev = json.loads((tmp_path / "eval.json").read_text())

    def key(rec):
        return tuple((s["kind"], s["color"], s["size"], s["cell"]) for s in rec["scene"]["shapes"])

    train = {key(r) for r in pre}
    assert not any(key(r) in train for r in ev)
    assert not {r["image"] for r in ev} & {r["image"] for r in pre}


# ----------------------------------------------------------------------- labels against the pixels


def _nearest_color(rgb) -> str:
    return min(COLORS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLORS[c], rgb, strict=True)))


def read_scene(img: Image.Image) -> dict[int, tuple[str, str]]:
    """What the pixels show: per occupied cell, (color, kind), with kind read from the fill ratio of
    the shape's bounding box (square ~1.0, circle ~0.79, triangle ~0.5)."""
    a = np.asarray(img).astype(int)
    size = a.shape[0]
    half = size // 2
    found = {}
    for cell in range(4):
        r, c = divmod(cell, 2)
        block = a[r * half : (r + 1) * half, c * half : (c + 1) * half]
        fg = np.abs(block - np.array(BACKGROUND)).sum(-1) > 30
        if fg.sum() < 4:
            continue
        ys, xs = np.nonzero(fg)
        fill = fg.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        kind = "square" if fill > 0.92 else "circle" if fill > 0.65 else "triangle"
        color = _nearest_color(block[fg].mean(0))
        found[cell] = (color, kind)
    return found


def answer_from_pixels(question: str, seen: dict[int, tuple[str, str]]) -> str:
    q = question.replace(" ?", "").replace("<image>\n", "")
    for cell, pos in enumerate(POSITIONS):
        if q == f"what color is the shape in the {pos}":
            return seen[cell][0]
        if q == f"what shape is in the {pos}":
            return seen[cell][1]
        if q == f"is there a shape in the {pos}":
            return "yes" if cell in seen else "no"
    if q == "how many shapes are there":
        return NUMBERS[len(seen)]
    for cell, pos in enumerate(POSITIONS):
        for kind in ("circle", "square", "triangle"):
            if q == f"is the {kind} in the {pos}":
                (where,) = [k for k, v in seen.items() if v[1] == kind]
                return "yes" if where == cell else "no"
        for color in COLORS:
            if q == f"is the {color} shape in the {pos}":
                (where,) = [k for k, v in seen.items() if v[0] == color]
                return "yes" if where == cell else "no"
    raise AssertionError(f"question not understood: {question!r}")


def caption_from_pixels(seen: dict[int, tuple[str, str]], caption: str) -> bool:
    """The caption names the right color and kind (or nothing) for every cell."""
    parts = caption.rstrip(" .").split(" , ")
    for cell, (pos, part) in enumerate(zip(POSITIONS, parts, strict=True)):
        where, what = part.split(" : ")
        if where != pos:
            return False
        if cell not in seen:
            if what != "nothing":
                return False
        elif what.split()[-2:] != list(seen[cell]):
            return False
    return True


@pytest.mark.parametrize("image_size", [32, 48])
def test_labels_are_true_of_the_pixels(tmp_path, image_size):
    shapes.generate(tmp_path, seed=7, n_train=60, n_eval=20, image_size=image_size, questions_per_image=4)
    records = json.loads((tmp_path / "instruct.json").read_text()) + json.loads(
        (tmp_path / "eval.json").read_text()
    )
    types = set()
    for rec in records:
        seen = read_scene(Image.open(tmp_path / "images" / rec["image"]).convert("RGB"))
        q, a = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
        assert answer_from_pixels(q, seen) == a, (rec["id"], q, a, seen)
        types.add(rec["type"])
    assert types == set(QUESTION_TYPES)
    for rec in json.loads((tmp_path / "pretrain.json").read_text()):
        seen = read_scene(Image.open(tmp_path / "images" / rec["image"]).convert("RGB"))
        assert caption_from_pixels(seen, rec["conversations"][1]["value"]), rec


def test_every_question_of_a_scene_is_answerable():
    rng = random.Random(0)
    for _ in range(200):
        scene = shapes.random_scene(rng, 32)
        qs = shapes.questions(scene, rng)
        types = {t for t, _, _ in qs}
        assert {"color", "shape", "count", "existence"} <= types
        kinds = [s.kind for s in scene.shapes]
        colors = [s.color for s in scene.shapes]
        unique = any(kinds.count(k) == 1 for k in kinds) or any(colors.count(c) == 1 for c in colors)
        assert ("position" in types) == unique
        ex = [a for t, _, a in qs if t == "existence"]
        assert ex.count("yes") == len(scene.shapes) and len(ex) == 4


def test_vocabulary_covers_all_text(shapes_dir):
    vocab = set(shapes.vocabulary())
    for name in ("pretrain.json", "instruct.json", "eval.json"):
        for rec in json.loads((shapes_dir / name).read_text()):
            for turn in rec["conversations"]:
                words = turn["value"].replace("<image>", " ").split()
                assert set(words) <= vocab, set(words) - vocab


@pytest.mark.parametrize("jitter", [0, 1, 3])
def test_jitter_bounds_the_offset_from_the_cell_centre(jitter):
    rng = random.Random(5)
    offsets = set()
    for _ in range(300):
        for s in shapes.random_scene(rng, 32, jitter).shapes:
            assert abs(s.dx) <= jitter and abs(s.dy) <= jitter
            offsets |= {s.dx, s.dy}
    assert max(abs(o) for o in offsets) == jitter  # the bound is reached: shapes do move


def test_summary_names_jitter_and_format(tmp_path):
    s = shapes.generate(tmp_path, seed=0, n_train=4, n_eval=2, image_size=32, jitter=0)
    marker = json.loads((tmp_path / "shapes.json").read_text())
    assert marker["jitter"] == s.jitter == 0 and marker["format"] == shapes.FORMAT
    for rec in json.loads((tmp_path / "pretrain.json").read_text()):
        assert all(sh["dx"] == sh["dy"] == 0 for sh in rec["scene"]["shapes"])
