"""ShapesVQA variants: the default unchanged to the byte, the free layout and negated questions drawn,
described and asked truly, deterministic per seed, balanced, and named by the recipe."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lsd_edge.data import shapes, shapes_variants
from lsd_edge.data.prepare import corpus_texts, prepare_data, shapes_manifest
from lsd_edge.data.questions import first_questions
from lsd_edge.data.records import parse_record
from lsd_edge.data.shapes import BACKGROUND, COLORS, KINDS, NUMBERS
from lsd_edge.errors import DataError, LsdEdgeError, RecipeError
from lsd_edge.progress import QuietReporter
from lsd_edge.recipe.data import ShapesConfig
from lsd_edge.recipe.load import load_recipe, parse_recipe

from ..helpers import REPO, one_red_line, run

FREE = ["--set", "data.shapes.layout=free", "--set", "data.shapes.image_size=64"]


def folder_hash(folder: Path) -> str:
    """Every file's name and contents; a PNG by its pixels (an encoder's other bytes for the same
    pixels are not a change), shapes.json without the folder it names."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        data = np.asarray(Image.open(p).convert("RGB")).tobytes() if p.suffix == ".png" else p.read_bytes()
        if p.name == "shapes.json":
            summary = json.loads(data)
            summary["out_dir"] = ""
            data = json.dumps(summary, sort_keys=True).encode()
        h.update(p.relative_to(folder).as_posix().encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


# Computed with main's generator (32ac079), before layouts existed.
BEFORE = [
    (
        dict(seed=3, n_train=20, n_eval=5, image_size=32, questions_per_image=4),
        "d0c39a8edcdd8cfc0770d0a14ab28534ec1fa7b72300f707e1edd9c38b5d549a",
    ),
    (
        dict(seed=1, n_train=12, n_eval=6, image_size=48, questions_per_image=3, jitter=3),
        "3b15eab653b44b29fc01a976a4f75e6170254aedd65ffbf24298a907497e1b03",
    ),
]


@pytest.mark.parametrize("settings,digest", BEFORE)
def test_the_default_is_what_it_was(tmp_path, settings, digest):
    shapes.generate(tmp_path / "a", **settings)
    assert folder_hash(tmp_path / "a") == digest
    shapes.generate(
        tmp_path / "b",
        **settings,
        layout=shapes_variants.layout("quadrants", False, settings.get("jitter", 1)),
    )
    assert folder_hash(tmp_path / "b") == digest
    assert not {"layout", "negations"} & set(json.loads((tmp_path / "a" / "shapes.json").read_text()))


def test_a_data_root_made_before_variants_is_still_taken():
    r = load_recipe(REPO / "recipes" / "tiny.toml")
    # the identity main wrote for recipes/tiny.toml's ShapesVQA
    assert shapes_manifest(r).digest == "8fce03ee87fcd851"
    free = load_recipe(REPO / "recipes" / "tiny.toml", FREE[1::2])
    tied = shapes_manifest(free).normalized["data.shapes"]
    assert tied["layout"] == "free" and "negations" not in tied


# ----------------------------------------------------------------------------- the scenes as drawn


def _components(fg: np.ndarray) -> list[np.ndarray]:
    """Pixel groups that touch (diagonals included): one per shape."""
    seen = np.zeros_like(fg)
    out = []
    for y0, x0 in zip(*np.nonzero(fg), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, pixels = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for yy in (y - 1, y, y + 1):
                for xx in (x - 1, x, x + 1):
                    inside = 0 <= yy < fg.shape[0] and 0 <= xx < fg.shape[1]
                    if inside and fg[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        stack.append((yy, xx))
        out.append(np.array(pixels))
    return out


def read_free_scene(img: Image.Image) -> list[tuple[str, str, float, float]]:
    """What the pixels show: (kind, color, x, y) per shape, the kind from how much of the circle
    around it a shape fills (circle ~0.9, square ~0.6, triangle ~0.4), whatever its rotation."""
    a = np.asarray(img).astype(int)
    fg = np.abs(a - np.array(BACKGROUND)).sum(-1) > 30
    found = []
    for pixels in _components(fg):
        cy, cx = pixels.mean(0)
        reach = np.sqrt(((pixels - [cy, cx]) ** 2).sum(1)).max() + 0.5
        fill = len(pixels) / (math.pi * reach**2)
        kind = "circle" if fill > 0.78 else "square" if fill > 0.49 else "triangle"
        rgb = a[pixels[:, 0], pixels[:, 1]].mean(0)
        color = min(COLORS, key=lambda c: sum((p - q) ** 2 for p, q in zip(COLORS[c], rgb, strict=True)))
        found.append((kind, color, cx, cy))
    return found


@pytest.fixture(scope="module")
def free_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("free")
    layout = shapes_variants.layout("free", negations=True)
    shapes.generate(out, seed=5, n_train=80, n_eval=120, image_size=64, questions_per_image=4, layout=layout)
    return out


def _records(folder: Path, name: str) -> list[dict]:
    return json.loads((folder / name).read_text())


@pytest.mark.parametrize("image_size", [32, 64])
def test_free_shapes_are_told_apart_from_the_pixels(image_size):
    """Every shape is where the scene says, of its kind and color, rotated or not."""
    import random

    rng = random.Random(image_size)
    for _ in range(300):
        scene = shapes_variants.free_scene(rng, image_size)
        seen = read_free_scene(shapes_variants.free_render(scene, image_size))
        assert len(seen) == len(scene.shapes), scene
        for s in scene.shapes:
            kind, color, x, y = min(seen, key=lambda t: (t[2] - s.x) ** 2 + (t[3] - s.y) ** 2)
            assert (kind, color) == (s.kind, s.color) and abs(x - s.x) < 2 and abs(y - s.y) < 2, (s, seen)
            assert s.radius + 1 <= min(s.x, s.y, image_size - 1 - s.x, image_size - 1 - s.y)


def test_free_records_parse_and_show_their_scene(free_dir):
    pre, ins, ev = (_records(free_dir, f) for f in ("pretrain.json", "instruct.json", "eval.json"))
    assert len(pre) == 80 and len(ins) == 320 and len(ev) == 120
    for rec in pre + ins + ev:
        messages, files = parse_record(rec)
        assert [m["role"] for m in messages] == ["user", "assistant"] and len(files) == 1
        img = Image.open(free_dir / "images" / files[0])
        assert img.size == (64, 64)
    scenes = {r["image"]: r["scene"]["shapes"] for r in pre + ev}
    for name, meta in list(scenes.items())[:40]:
        seen = read_free_scene(Image.open(free_dir / "images" / name).convert("RGB"))
        assert sorted((k, c) for k, c, _, _ in seen) == sorted((s["kind"], s["color"]) for s in meta)
        assert all(1 <= len(meta) <= 2 and s["angle"] in range(360) for s in meta)
    assert len(first_questions(free_dir / "eval.json")) == 120
    summary = json.loads((free_dir / "shapes.json").read_text())
    assert summary["layout"] == "free" and summary["negations"] is True
    assert sum(summary["by_type"].values()) == 120 and set(summary["by_type"]) == set(
        shapes.QUESTION_TYPES + ("negation",)
    )


# ------------------------------------------------------------------ answers against the scene kept


def _place(v: float, size: int) -> int:
    return 0 if v < size / 3 else 2 if v >= 2 * size / 3 else 1


def _named(ref: str, scene: list[dict]) -> dict:
    """The one shape a phrase names: "circle", "red shape", "large shape"."""
    word = ref.removesuffix(" shape")
    (s,) = [s for s in scene if word in (s["kind"], s["color"], s["size"])]
    return s


def answer(question: str, scene: list[dict], size: int) -> str:
    """The answer to a free-layout question, read from the scene the generator kept."""
    q = question.removeprefix("<image>\n").removesuffix(" ?")
    yes = {True: "yes", False: "no"}
    kinds, colors = [s["kind"] for s in scene], [s["color"] for s in scene]
    rules = [
        (r"what color is the (.+)", lambda m: _named(m[1], scene)["color"]),
        (r"what shape is the (.+)", lambda m: _named(m[1], scene)["kind"]),
        (r"how many shapes are there", lambda m: NUMBERS[len(scene)]),
        (r"how many (\w+)s are there", lambda m: NUMBERS[kinds.count(m[1])]),
        (r"does the image not contain a (\w+) shape", lambda m: yes[m[1] not in colors]),
        (r"does the image not contain a (\w+)", lambda m: yes[m[1] not in kinds]),
        (r"is there a (\w+) shape", lambda m: yes[m[1] in colors]),
        (r"is there a (\w+) (\w+)", lambda m: yes[(m[1], m[2]) in zip(colors, kinds, strict=True)]),
        (r"is there a (\w+)", lambda m: yes[m[1] in kinds]),
        (r"is the (.+) not (\w+)", lambda m: yes[_named(m[1], scene)["color"] != m[2]]),
        (r"is the (.+) left of the (.+)", lambda m: yes[_named(m[1], scene)["x"] < _named(m[2], scene)["x"]]),
        (r"is the (.+) above the (.+)", lambda m: yes[_named(m[1], scene)["y"] < _named(m[2], scene)["y"]]),
        (r"is the (.+) on the (left|right)", lambda m: _side(_named(m[1], scene)["x"], m[2], size)),
        (r"is the (.+) at the (top|bottom)", lambda m: _side(_named(m[1], scene)["y"], m[2], size)),
    ]
    for pattern, rule in rules:
        if m := re.fullmatch(pattern, q):
            return rule(m)
    raise AssertionError(f"question not understood: {question!r}")


def _side(v: int, asked: str, size: int) -> str:
    place = _place(v, size)
    assert place != 1, "a side asked of a shape in the middle third"
    return "yes" if (place == 0) == (asked in ("left", "top")) else "no"


def test_free_answers_are_true_of_the_scene(free_dir):
    pre, ins, ev = (_records(free_dir, f) for f in ("pretrain.json", "instruct.json", "eval.json"))
    scenes = {r["image"]: r["scene"]["shapes"] for r in pre + ev}
    types = set()
    for rec in ins + ev:
        q, a = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
        assert answer(q, scenes[rec["image"]], 64) == a, (rec["id"], q, a, scenes[rec["image"]])
        types.add(rec["type"])
    assert types == set(shapes.QUESTION_TYPES) | {"negation"}


def test_free_captions_describe_the_scene(free_dir):
    names = {
        (r, c): f"{('top', '', 'bottom')[r]} {('left', '', 'right')[c]}".strip()
        for r in range(3)
        for c in range(3)
    }
    names[1, 1] = "centre"
    for rec in _records(free_dir, "pretrain.json"):
        scene = sorted(rec["scene"]["shapes"], key=lambda s: (s["x"], s["y"]))
        want = " and ".join(
            f"a {s['size']} {s['color']} {s['kind']} at the {names[_place(s['y'], 64), _place(s['x'], 64)]}"
            for s in scene
        )
        assert rec["conversations"][1]["value"] == want + " ."


def test_negations_on_the_quadrants_are_true_of_the_scene(tmp_path):
    layout = shapes_variants.layout("quadrants", negations=True)
    shapes.generate(tmp_path, seed=2, n_train=60, n_eval=10, image_size=32, layout=layout)
    scenes = {r["image"]: r["scene"]["shapes"] for r in _records(tmp_path, "pretrain.json")}
    asked = 0
    for rec in _records(tmp_path, "instruct.json"):
        if rec["type"] != "negation":
            continue
        scene, q = scenes[rec["image"]], rec["conversations"][0]["value"].removeprefix("<image>\n")
        if m := re.fullmatch(r"is the shape in the (.+) not (\w+) \?", q):
            (s,) = [s for s in scene if shapes.POSITIONS[s["cell"]] == m[1]]
            scene, q = [s], f"is the {s['kind']} not {m[2]} ?"  # the same question, by the shape's kind
        assert answer(q, scene, 32) == rec["conversations"][1]["value"], (q, scene)
        asked += 1
    assert asked > 30


# ------------------------------------------------------------------------- determinism and balance


def test_the_variant_is_deterministic_per_seed(tmp_path):
    layout = shapes_variants.layout("free", negations=True)
    for name, seed in (("a", 4), ("b", 4), ("c", 5)):
        shapes.generate(tmp_path / name, seed=seed, n_train=15, n_eval=5, image_size=64, layout=layout)
    assert folder_hash(tmp_path / "a") == folder_hash(tmp_path / "b") != folder_hash(tmp_path / "c")
    # and the same pictures as PNG bytes, not only as pixels
    assert all(
        p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes()
        for p in (tmp_path / "a" / "images").iterdir()
    )


def test_no_answer_is_a_safe_guess(tmp_path):
    """The majority answer's share per type (the module docstring's figures): far from 100%."""
    layout = shapes_variants.layout("free", negations=True)
    shapes.generate(tmp_path, seed=0, n_train=1, n_eval=2000, image_size=64, layout=layout)
    answers: dict[str, Counter] = defaultdict(Counter)
    for rec in _records(tmp_path, "eval.json"):
        answers[rec["type"]][rec["conversations"][1]["value"]] += 1
    majority = {t: max(c.values()) / sum(c.values()) for t, c in answers.items()}
    # yes/no near half, one of 5 colors or 3 kinds near a fifth or a third
    bounds = {"color": 0.3, "shape": 0.4, "count": 0.6, "position": 0.58, "existence": 0.58, "negation": 0.58}
    assert all(majority[t] <= b for t, b in bounds.items()), majority
    assert min(sum(c.values()) for c in answers.values()) > 250  # every type is asked, about as often


def test_the_vocabulary_covers_every_variant(free_dir, tmp_path):
    shapes.generate(
        tmp_path,
        seed=1,
        n_train=40,
        n_eval=10,
        image_size=32,
        layout=shapes_variants.layout("quadrants", True),
    )
    for folder, vocab in (
        (free_dir, shapes_variants.vocabulary("free", negations=True)),
        (tmp_path, shapes_variants.vocabulary("quadrants", negations=True)),
    ):
        for name in ("pretrain.json", "instruct.json", "eval.json"):
            for rec in _records(folder, name):
                for turn in rec["conversations"]:
                    words = set(turn["value"].replace("<image>", " ").split())
                    assert words <= set(vocab), words - set(vocab)
    assert shapes_variants.vocabulary() == shapes.vocabulary()
    assert set(KINDS) <= set(shapes_variants.vocabulary("free"))


# ---------------------------------------------------------------------------------- the recipe's word


def test_the_recipe_points_at_the_variant_with_set_only(recipe_dict, tmp_path):
    sets = ["data.shapes.layout=free", "data.shapes.image_size=64", "data.shapes.negations=true"]
    sets += ["data.shapes.n_train=6", "data.shapes.n_eval=3", f"data.root={tmp_path / 'free'}"]
    r = parse_recipe(recipe_dict, overrides=sets)
    prepare_data(r, QuietReporter())
    summary = json.loads((tmp_path / "free" / "shapes.json").read_text())
    assert summary["layout"] == "free" and summary["image_size"] == 64
    # the tokenizer of a tiny model is trained on the data's text: the new words reach it
    words = {w for t in corpus_texts(r) for w in t.replace("<image>", " ").split()}
    assert {"not", "contain", "does"} <= words <= set(shapes_variants.vocabulary("free", True))
    other = parse_recipe(recipe_dict, overrides=[*sets, "data.shapes.negations=false"])
    with pytest.raises(LsdEdgeError, match=r"data.shapes.negations changed \(True -> default\)"):
        prepare_data(other, QuietReporter())


@pytest.mark.parametrize(
    "override,problem",
    [
        ("data.shapes.layout=grid", "data.shapes.layout: Input should be 'quadrants' or 'free'"),
        ("data.shapes.negations=maybe", "data.shapes.negations: Input should be a valid boolean"),
        ("data.shapes.image_size=16", "data.shapes: image_size 16: the free layout needs at least 32 px"),
    ],
)
def test_a_bad_variant_is_one_clear_problem(recipe_dict, override, problem):
    sets = ["data.shapes.layout=free", override] if "image_size" in override else [override]
    with pytest.raises(RecipeError) as err:
        parse_recipe(recipe_dict, overrides=sets)
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith(problem), err.value.problems
    assert ShapesConfig.MIN_FREE_IMAGE_SIZE == shapes_variants.MIN_FREE_IMAGE_SIZE


def test_a_layout_the_generator_does_not_know_is_refused(tmp_path):
    with pytest.raises(
        DataError, match="layout 'grid': no such ShapesVQA layout; use one of quadrants, free"
    ):
        shapes_variants.layout("grid")
    with pytest.raises(DataError, match="image_size 16: the free layout needs at least 32 px"):
        shapes.generate(tmp_path / "s", image_size=16, layout=shapes_variants.layout("free"))
    assert not (tmp_path / "s").exists()


def test_data_shapes_writes_the_variant(tmp_path, monkeypatch, capsys):
    args = ["data", "shapes", "--out", str(tmp_path / "s"), "--n-train", "6", "--n-eval", "3"]
    code, out, _ = run(monkeypatch, capsys, *args, "--image-size", "64", "--layout", "free", "--negations")
    assert code == 0 and "wrote ShapesVQA" in out
    summary = json.loads((tmp_path / "s" / "shapes.json").read_text())
    assert summary["layout"] == "free" and summary["negations"] is True
    code, _, err = run(
        monkeypatch, capsys, *args[:3], str(tmp_path / "t"), "--layout", "free", "--image-size", "16"
    )
    assert code == 1 and "the free layout needs at least 32 px" in one_red_line(err)
    monkeypatch.setenv("COLUMNS", "200")  # the usage error's box on one line
    code, _, err = run(monkeypatch, capsys, *args, "--layout", "grid")
    assert code == 2 and "'grid' is not one of 'quadrants', 'free'" in err
