"""ShapesVQA: a synthetic visual question answering set, rendered with PIL, deterministic per seed.

A scene holds 1-4 shapes, each in its own cell of a 2x2 grid (so "top left" always names one cell),
with a kind, a color and a size, near the cell's centre (at most `JITTER` pixels off). From a
scene come a caption (for pre-training) and questions of five types with short exact-match answers:
color, shape, count, position and existence. That is the quadrant layout, the embedded default's; a
`Layout` says how scenes are made, drawn, described and asked about, and `shapes_variants` holds
the others (free positions, negated questions). `generate(out_dir, ...)` writes LLaVA-format JSON:

- `pretrain.json`: one caption conversation per training scene;
- `instruct.json`: `questions_per_image` single-turn questions per training scene (its scene is in
  `pretrain.json`), the first question of every scene first (so `max_samples = n_train` asks one
  question of every image);
- `eval.json`: one question per sample, on scenes never used in training, with a `type` field;
- `images/`: the PNG files the JSON names.

Same seed, same bytes: every random choice comes from one `random.Random(seed)`, and the PNGs are
written without timestamps.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from lsd_edge.errors import DataError

KINDS = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four")
BACKGROUND = (245, 245, 245)
# Largest offset of a shape's centre from its cell's centre, in pixels. A shape centred on its cell
# straddles the same 2x2 patches of a patch-8 vision tower every time; with a 3-pixel jitter the tiny
# default's tower needed several times the pre-training to tell the shapes apart (docs/EMBEDDED_DEFAULT.md).
JITTER = 1
# The generator's version, kept in shapes.json: data, and teachers trained on data, made by another
# version are not taken for this one's. 2: shapes jitter by at most JITTER pixels; instruct records
# carry no scene.
FORMAT = 2
QUESTION_TYPES = ("color", "shape", "count", "position", "existence")
CAPTION_PROMPT = "describe the image ."


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    size: str
    cell: int  # index into POSITIONS
    dx: int  # jitter of the centre inside the cell, in pixels
    dy: int

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def radius(self, image_size: int) -> int:
        cell = image_size // 2
        return max(3, round(cell * (0.22 if self.size == "small" else 0.38)))

    def centre(self, image_size: int) -> tuple[int, int]:
        cell = image_size // 2
        row, col = divmod(self.cell, 2)
        return col * cell + cell // 2 + self.dx, row * cell + cell // 2 + self.dy


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]


def random_scene(rng: random.Random, image_size: int, jitter: int = JITTER) -> Scene:
    """1-4 shapes in distinct cells; each centre moves up to `jitter` pixels from its cell's centre
    (less where the shape would leave its cell)."""
    n = rng.randint(1, 4)
    cells = sorted(rng.sample(range(4), n))
    shapes = []
    for cell in cells:
        size = rng.choice(SIZES)
        r = round((image_size // 2) * (0.22 if size == "small" else 0.38))
        slack = min(jitter, max(0, (image_size // 2) // 2 - r - 1))
        shapes.append(
            Shape(
                kind=rng.choice(KINDS),
                color=rng.choice(list(COLORS)),
                size=size,
                cell=cell,
                dx=rng.randint(-slack, slack),
                dy=rng.randint(-slack, slack),
            )
        )
    return Scene(tuple(shapes))


def render(scene: Scene, image_size: int) -> Image.Image:
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        cx, cy = s.centre(image_size)
        r = s.radius(image_size)
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif s.kind == "square":
            h = round(r * 0.85)
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r - 1), (cx + r, cy + r - 1)], fill=fill)
    return img


def caption(scene: Scene) -> str:
    """Every cell in reading order, then what is in it: "top left : a large red circle , top right :
    nothing , ..." (position words first, so describing a cell means reading that cell)."""
    by_cell = {s.cell: s for s in scene.shapes}
    parts = []
    for cell, pos in enumerate(POSITIONS):
        s = by_cell.get(cell)
        parts.append(f"{pos} : " + (f"a {s.size} {s.color} {s.kind}" if s else "nothing"))
    return " , ".join(parts) + " ."


def _plural(kind: str) -> str:
    return kind + "s"


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """Every question of every type this scene can answer without ambiguity: (type, question, answer)."""
    shapes = scene.shapes
    by_cell = {s.cell: s for s in shapes}
    by_kind = {k: [s for s in shapes if s.kind == k] for k in KINDS}
    by_color = {c: [s for s in shapes if s.color == c] for c in COLORS}
    out: dict[str, list[tuple[str, str]]] = {t: [] for t in QUESTION_TYPES}
    for s in shapes:
        out["color"].append((f"what color is the shape in the {s.position} ?", s.color))
        out["shape"].append((f"what shape is in the {s.position} ?", s.kind))
        # Position, asked as a check of a named shape's place: the true cell or another one.
        other = rng.choice([p for p in POSITIONS if p != s.position])
        for pos in (s.position, other):
            answer = "yes" if pos == s.position else "no"
            if len(by_color[s.color]) == 1:
                out["position"].append((f"is the {s.color} shape in the {pos} ?", answer))
            if len(by_kind[s.kind]) == 1:
                out["position"].append((f"is the {s.kind} in the {pos} ?", answer))
    out["count"].append(("how many shapes are there ?", NUMBERS[len(shapes)]))
    for cell, pos in enumerate(POSITIONS):
        out["existence"].append((f"is there a shape in the {pos} ?", "yes" if cell in by_cell else "no"))
    return [(t, q, a) for t in QUESTION_TYPES for q, a in out[t]]


def pick_questions(scene: Scene, rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    """n questions of distinct types where possible, types in random order (balanced over a data set)."""
    return pick_from(questions(scene, rng), QUESTION_TYPES, rng, n)


def pick_from(
    pool: list[tuple[str, str, str]], question_types: tuple[str, ...], rng: random.Random, n: int
) -> list[tuple[str, str, str]]:
    """`pick_questions` of any layout: n of `pool`'s questions, one of each type first, types in random order."""
    types = list(question_types)
    rng.shuffle(types)
    chosen: list[tuple[str, str, str]] = []
    for t in types:
        options = [x for x in pool if x[0] == t]
        if options:
            chosen.append(rng.choice(options))
    rest = [x for x in pool if x not in chosen]
    rng.shuffle(rest)
    chosen += rest
    return chosen[:n]


@dataclass(frozen=True)
class Layout:
    """How a ShapesVQA variant makes a scene (`scene(rng, image_size)`), draws it, describes it and
    asks about it (`questions(scene, rng)`: every (type, question, answer) the scene answers), and
    what `held_out` compares: an eval scene whose key a training scene has is drawn again."""

    name: str
    types: tuple[str, ...]
    scene: Callable[[random.Random, int], Any]
    render: Callable[[Any, int], Image.Image]
    caption: Callable[[Any], str]
    questions: Callable[[Any, random.Random], list[tuple[str, str, str]]]
    held_out: Callable[[Any], tuple]
    negations: bool = False
    min_image_size: int = 1  # below it the shapes no longer tell apart (the quadrants set none)

    def check(self, image_size: int) -> None:
        if image_size < self.min_image_size:
            raise DataError(
                f"image_size {image_size}: the {self.name} layout needs at least {self.min_image_size} px "
                "to tell the shapes apart; use e.g. 64"
            )


def quadrants(jitter: int = JITTER) -> Layout:
    """The embedded default's layout: 1-4 shapes, one per cell of a 2x2 grid, `jitter` px off centre."""
    return Layout(
        name="quadrants",
        types=QUESTION_TYPES,
        scene=lambda rng, image_size: random_scene(rng, image_size, jitter),
        render=render,
        caption=caption,
        questions=questions,
        # the same shapes in the same cells, jitter aside
        held_out=lambda scene: tuple((s.kind, s.color, s.size, s.cell) for s in scene.shapes),
    )


def _turn(role: str, text: str) -> dict[str, str]:
    return {"from": role, "value": text}


@dataclass
class ShapesSummary:
    out_dir: str
    n_train: int
    n_eval: int
    n_pretrain: int
    n_instruct_turns: int
    image_size: int
    seed: int
    questions_per_image: int
    by_type: dict[str, int]
    jitter: int = JITTER
    format: int = FORMAT
    layout: str = "quadrants"
    negations: bool = False

    def to_json(self) -> str:
        fields = asdict(self)
        # Written only where they differ from the default: the default's shapes.json reads as it
        # did before variants existed.
        for key, default in (("layout", "quadrants"), ("negations", False)):
            if fields[key] == default:
                del fields[key]
        return json.dumps(fields, indent=1) + "\n"


def _train_records(i: int, name: str, scene, rng: random.Random, n_questions: int, layout: Layout):
    """A training scene's caption record, and its `n_questions` question records (in slot order)."""
    meta = {"shapes": [dict(vars(s)) for s in scene.shapes]}  # flat fields: no deep asdict
    caption_record = {
        "id": f"cap-{i:06d}",
        "image": name,
        "conversations": [
            _turn("human", f"<image>\n{CAPTION_PROMPT}"),
            _turn("gpt", layout.caption(scene)),
        ],
        "scene": meta,
    }
    questions_ = [
        {
            "id": f"qa-{i:06d}-{k}",
            "image": name,
            "conversations": [_turn("human", f"<image>\n{q}"), _turn("gpt", a)],
            "type": qtype,
            # no "scene": pretrain.json's record of the same image holds it once
        }
        for k, (qtype, q, a) in enumerate(_pick(layout, scene, rng, n_questions))
    ]
    return caption_record, questions_


def _pick(layout: Layout, scene, rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    return pick_from(layout.questions(scene, rng), layout.types, rng, n)


def _eval_record(i: int, name: str, scene, rng: random.Random, layout: Layout) -> dict:
    qtype, q, a = _pick(layout, scene, rng, 1)[0]
    return {
        "id": f"eval-{i:06d}",
        "image": name,
        "conversations": [_turn("human", f"<image>\n{q}"), _turn("gpt", a)],
        "type": qtype,
        "scene": {"shapes": [dict(vars(s)) for s in scene.shapes]},
    }


def _write_records(path: Path, rows: list[dict]) -> None:
    # One record per line: readable, and written by json's C encoder (an indent makes it fall
    # back to the pure-Python one, several times slower on 100,000 records).
    lines = ",\n".join(json.dumps(r, sort_keys=True) for r in rows)
    path.write_text(f"[\n{lines}\n]\n", encoding="utf-8")


def generate(
    out_dir: str | Path,
    seed: int = 0,
    n_train: int = 2000,
    n_eval: int = 300,
    image_size: int = 48,
    questions_per_image: int = 4,
    progress=None,
    jitter: int = JITTER,
    layout: Layout | None = None,
) -> ShapesSummary:
    """Write ShapesVQA to `out_dir`; `progress(done, total)` is called as images are written. `layout`
    makes the scenes and questions: by default the quadrants with `jitter` (`shapes_variants.layout`
    gives the others)."""
    layout = layout or quadrants(jitter)
    layout.check(image_size)
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pretrain, evaluation = [], []
    # instruct[k] holds the k-th question of every training scene, so the first n_train records
    # ask one question of every image, the first 2 * n_train two, and so on (see max_samples).
    instruct: list[list[dict]] = [[] for _ in range(questions_per_image)]
    seen: set[tuple] = set()
    total = n_train + n_eval
    i = 0
    while i < total:
        scene = layout.scene(rng, image_size)
        split = "train" if i < n_train else "eval"
        # Held out means held out: no eval scene is a training scene (the quadrants: the same shapes
        # in the same cells, jitter aside).
        key = layout.held_out(scene)
        if split == "train":
            seen.add(key)
        elif key in seen:
            continue
        name = f"{split}_{i:06d}.png"
        layout.render(scene, image_size).save(images / name, format="PNG", optimize=False)
        if split == "train":
            caption_record, questions_ = _train_records(i, name, scene, rng, questions_per_image, layout)
            pretrain.append(caption_record)
            for k, record in enumerate(questions_):
                instruct[k].append(record)
        else:
            evaluation.append(_eval_record(i, name, scene, rng, layout))
        i += 1
        if progress is not None:
            progress(i, total)
    instruct_rows = [rec for slot in instruct for rec in slot]
    for fname, rows in (
        ("pretrain.json", pretrain),
        ("instruct.json", instruct_rows),
        ("eval.json", evaluation),
    ):
        _write_records(out / fname, rows)
    summary = ShapesSummary(
        out_dir=str(out),
        n_train=n_train,
        n_eval=n_eval,
        n_pretrain=len(pretrain),
        n_instruct_turns=len(instruct_rows),
        image_size=image_size,
        seed=seed,
        questions_per_image=questions_per_image,
        by_type={t: sum(r["type"] == t for r in evaluation) for t in layout.types},
        jitter=jitter,
        layout=layout.name,
        negations=layout.negations,
    )
    (out / "shapes.json").write_text(summary.to_json(), encoding="utf-8")
    return summary


def vocabulary() -> list[str]:
    """Every word ShapesVQA text can contain, for the embedded default's word-level tokenizer."""
    words = set(CAPTION_PROMPT.split())
    words |= {"a", "in", "the", ",", ".", "?", "what", "color", "is", "shape", "how", "many", "shapes", "are"}
    words |= {"there", "where", "yes", "no", "top", "bottom", "left", "right", ":", "nothing"}
    words |= set(KINDS) | {_plural(k) for k in KINDS} | set(COLORS) | set(SIZES) | set(NUMBERS)
    return sorted(words)
