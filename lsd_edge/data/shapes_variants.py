"""ShapesVQA variants the embedded default was not tuned for, and the `Layout` a recipe names.

- The free layout (`layout = "free"`): one or two shapes at random positions, radii and rotations,
  never touching each other or the border, with no grid. The kinds, colors and size words are the
  quadrants' (a small circle's radius is 10-13% of the image side, a large one's 17-21%; a square
  or triangle of the same size covers about as much), so that a rotated square and triangle stay
  apart at 64 px, and at 32 px, where the tiny default's tower reads them. Shapes are named by what is unique about them ("the circle", "the red shape", "the
  large shape"); places are thirds of the image ("at the top left", "on the left"), and side and
  relation questions are asked only where the answer is clear (a shape outside the middle third; two
  shapes a sixth of the image apart).
- Negated questions (`negations = true`, either layout): "does the image not contain a red shape ?",
  "is the circle not red ?", as a sixth question type, "negation".

Yes/no questions are asked of a true and a false case alike, so answers stay balanced. The majority
answer's share per question type over 2,000 eval questions of the free layout with negations (seed 0,
64 px; tests/data/test_shapes_variants.py bounds them): color 24% (of 5 colors), shape 35% (of 3),
count 55% ("one", of zero/one/two), position 52%, existence 51%, negation 54% (yes/no).
"""

from __future__ import annotations

import math
import random
from dataclasses import astuple, dataclass, replace
from itertools import combinations

from PIL import Image, ImageDraw

from lsd_edge.data import shapes as quadrant_layout
from lsd_edge.data.shapes import (
    BACKGROUND,
    COLORS,
    JITTER,
    KINDS,
    NUMBERS,
    QUESTION_TYPES,
    SIZES,
    Layout,
    quadrants,
)
from lsd_edge.errors import DataError

LAYOUTS = ("quadrants", "free")
# Below this side a small rotated triangle is a few pixels and no longer tells from a square.
MIN_FREE_IMAGE_SIZE = 32
# Radius range of each size, as fractions of the image side, for a circle; a square's and a
# triangle's circumscribed radius is EXTENT times that, so that a large shape of any kind covers more
# pixels than a small one of any kind (areas 3.1, 2.6 and 2.2 r^2; the ranges are 1.3x apart).
RADIUS = {"small": (0.10, 0.13), "large": (0.17, 0.21)}
EXTENT = {"circle": 1.0, "square": 1.15, "triangle": 1.3}
PLACEMENT_TRIES = 20
SIDES = ((("left", "right"), "on the"), (("top", "bottom"), "at the"))  # per axis: words, preposition
PLACES = (
    ("top left", "top", "top right"),
    ("left", "centre", "right"),
    ("bottom left", "bottom", "bottom right"),
)
FREE_WORDS = {"at", "and", "centre", "on", "of", "above"}
NEGATION_WORDS = {"does", "image", "not", "contain", "no"}
NEGATION = "negation"


@dataclass(frozen=True)
class FreeShape:
    kind: str
    color: str
    size: str
    x: int  # centre, in pixels
    y: int
    radius: int  # of the circle the shape is inscribed in (its extent), in pixels
    angle: int  # rotation, degrees


@dataclass(frozen=True)
class FreeScene:
    shapes: tuple[FreeShape, ...]  # left to right
    image_size: int


def _third(v: int, image_size: int) -> int:
    return min(2, 3 * v // image_size)


def place(s: FreeShape, image_size: int) -> str:
    """Where a shape is, by the thirds of the image its centre is in: "top left" ... "centre"."""
    return PLACES[_third(s.y, image_size)][_third(s.x, image_size)]


def _draw_shape(rng: random.Random, image_size: int) -> tuple[str, str, str, int, int]:
    """(kind, color, size, radius, angle): the radius the kind's EXTENT times one of its size's."""
    kind, color, size = rng.choice(KINDS), rng.choice(list(COLORS)), rng.choice(SIZES)
    lo, hi = (max(3, round(f * image_size)) for f in RADIUS[size])
    return kind, color, size, round(rng.randint(lo, hi) * EXTENT[kind]), rng.randrange(360)


def free_scene(rng: random.Random, image_size: int) -> FreeScene:
    """1-2 shapes of random kind, color, size, radius and rotation at random places, at least a
    gap apart and off the border."""
    gap = max(3, image_size // 16)  # so that no two shapes' pixels touch, diagonals included
    # Two large shapes fit only in opposite corners, or not at all on a small image: a pair with no
    # room after PLACEMENT_TRIES is drawn again (a single shape always fits, so this ends).
    while True:
        drawn = [_draw_shape(rng, image_size) for _ in range(rng.randint(1, 2))]
        for _ in range(PLACEMENT_TRIES):
            centres = [
                (rng.randint(r + 1, image_size - 2 - r), rng.randint(r + 1, image_size - 2 - r))
                for *_, r, _ in drawn
            ]
            if len(drawn) == 1 or math.dist(*centres) >= drawn[0][3] + drawn[1][3] + gap:
                shapes = [
                    FreeShape(k, c, sz, x, y, r, a)
                    for (k, c, sz, r, a), (x, y) in zip(drawn, centres, strict=True)
                ]
                return FreeScene(tuple(sorted(shapes, key=lambda s: (s.x, s.y))), image_size)


def free_render(scene: FreeScene, image_size: int) -> Image.Image:
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse([s.x - s.radius, s.y - s.radius, s.x + s.radius, s.y + s.radius], fill=fill)
        else:
            sides = 4 if s.kind == "square" else 3
            draw.regular_polygon((s.x, s.y, s.radius), sides, rotation=s.angle, fill=fill)
    return img


def free_caption(scene: FreeScene) -> str:
    """Every shape left to right, with its place: "a large red circle at the top left and a small
    blue square at the centre ."."""
    parts = [f"a {s.size} {s.color} {s.kind} at the {place(s, scene.image_size)}" for s in scene.shapes]
    return " and ".join(parts) + " ."


def references(shapes: tuple[FreeShape, ...]) -> list[tuple[str, str, int]]:
    """(what names it, the phrase, shape index) for each way of naming a shape that fits it alone."""
    out = []
    for i, s in enumerate(shapes):
        for basis, phrase in (("kind", s.kind), ("color", f"{s.color} shape"), ("size", f"{s.size} shape")):
            if sum(getattr(o, basis) == getattr(s, basis) for o in shapes) == 1:
                out.append((basis, phrase, i))
    return out


def _sides(ref: str, s: FreeShape, image_size: int, rng: random.Random) -> list[tuple[str, str]]:
    out = []
    for axis, ((low, high), prep) in enumerate(SIDES):
        third = _third((s.x, s.y)[axis], image_size)
        if third == 1:  # the middle third: neither side
            continue
        asked = rng.choice((low, high))
        out.append(
            (f"is the {ref} {prep} {asked} ?", "yes" if asked == (low if third == 0 else high) else "no")
        )
    return out


def _relations(
    scene: FreeScene, refs: list[tuple[str, str, int]], rng: random.Random
) -> list[tuple[str, str]]:
    out = []
    for (_, ra, a), (_, rb, b) in combinations(refs, 2):
        if a == b:
            continue
        for axis, word in ((0, "left of"), (1, "above")):
            pa, pb = ((s.x, s.y)[axis] for s in (scene.shapes[a], scene.shapes[b]))
            if abs(pa - pb) < scene.image_size // 6:
                continue
            if rng.random() < 0.5:
                out.append((f"is the {ra} {word} the {rb} ?", "yes" if pa < pb else "no"))
            else:
                out.append((f"is the {rb} {word} the {ra} ?", "yes" if pb < pa else "no"))
    return out


def _counts(shapes: tuple[FreeShape, ...], rng: random.Random) -> list[tuple[str, str]]:
    present = [k for k in KINDS if any(s.kind == k for s in shapes)]
    absent = [k for k in KINDS if k not in present]  # never empty: 3 kinds, at most 2 shapes
    out = [("how many shapes are there ?", NUMBERS[len(shapes)])]
    for k in present + [rng.choice(absent)]:
        out.append((f"how many {k}s are there ?", NUMBERS[sum(s.kind == k for s in shapes)]))
    return out


def _existence(shapes: tuple[FreeShape, ...], rng: random.Random) -> list[tuple[str, str]]:
    """A true and a false one of each form; the false pair shares one attribute with a shape."""
    s = rng.choice(shapes)
    pairs = {(o.color, o.kind) for o in shapes}
    other_color = rng.choice([c for c in COLORS if all(o.color != c for o in shapes)])
    other_kind = rng.choice([k for k in KINDS if all(o.kind != k for o in shapes)])
    if rng.random() < 0.5:
        wrong = (rng.choice([c for c in COLORS if (c, s.kind) not in pairs]), s.kind)
    else:
        wrong = (s.color, rng.choice([k for k in KINDS if (s.color, k) not in pairs]))
    return [
        (f"is there a {s.color} shape ?", "yes"),
        (f"is there a {other_color} shape ?", "no"),
        (f"is there a {s.kind} ?", "yes"),
        (f"is there a {other_kind} ?", "no"),
        (f"is there a {s.color} {s.kind} ?", "yes"),
        (f"is there a {wrong[0]} {wrong[1]} ?", "no"),
    ]


def free_questions(scene: FreeScene, rng: random.Random) -> list[tuple[str, str, str]]:
    """Every question of every type the scene answers without ambiguity: (type, question, answer)."""
    refs = references(scene.shapes)
    out: dict[str, list[tuple[str, str]]] = {t: [] for t in QUESTION_TYPES}
    for basis, ref, i in refs:
        s = scene.shapes[i]
        if basis != "color":
            out["color"].append((f"what color is the {ref} ?", s.color))
        if basis != "kind":
            out["shape"].append((f"what shape is the {ref} ?", s.kind))
        out["position"] += _sides(ref, s, scene.image_size, rng)
    out["position"] += _relations(scene, refs, rng)
    out["count"] += _counts(scene.shapes, rng)
    out["existence"] += _existence(scene.shapes, rng)
    return [(t, q, a) for t in QUESTION_TYPES for q, a in out[t]]


def negated_questions(
    shapes, named: list[tuple[str, object]], rng: random.Random
) -> list[tuple[str, str, str]]:
    """Negated questions of shapes with a kind and a color, of either layout; `named` gives (phrase,
    shape) pairs to ask "is the <phrase> not <color> ?" of. A true and a false case of each."""
    s = rng.choice(shapes)
    other_color = rng.choice([c for c in COLORS if all(o.color != c for o in shapes)])
    out = [
        (f"does the image not contain a {s.color} shape ?", "no"),
        (f"does the image not contain a {other_color} shape ?", "yes"),
    ]
    absent = [k for k in KINDS if all(o.kind != k for o in shapes)]
    if absent:  # four quadrant shapes may show every kind
        out += [
            (f"does the image not contain a {s.kind} ?", "no"),
            (f"does the image not contain a {rng.choice(absent)} ?", "yes"),
        ]
    for phrase, shape in named:
        asked = rng.choice((shape.color, rng.choice([c for c in COLORS if c != shape.color])))
        out.append((f"is the {phrase} not {asked} ?", "no" if asked == shape.color else "yes"))
    return [(NEGATION, q, a) for q, a in out]


def _with_negations(base: Layout, named) -> Layout:
    def asked(scene, rng: random.Random) -> list[tuple[str, str, str]]:
        return base.questions(scene, rng) + negated_questions(scene.shapes, named(scene), rng)

    return replace(base, types=base.types + (NEGATION,), questions=asked, negations=True)


FREE = Layout(
    name="free",
    types=QUESTION_TYPES,
    scene=free_scene,
    render=free_render,
    caption=free_caption,
    questions=free_questions,
    held_out=lambda scene: tuple(astuple(s) for s in scene.shapes),  # positions are continuous
    min_image_size=MIN_FREE_IMAGE_SIZE,
)


def _quadrant_names(scene) -> list[tuple[str, object]]:
    return [(f"shape in the {s.position}", s) for s in scene.shapes]


def _free_names(scene: FreeScene) -> list[tuple[str, object]]:
    # "is the red shape not red ?" asks nothing: shapes named by their color are left out
    return [(p, scene.shapes[i]) for basis, p, i in references(scene.shapes) if basis != "color"]


def layout(name: str = "quadrants", negations: bool = False, jitter: int = JITTER) -> Layout:
    """The layout a recipe's `[data.shapes]` names (`jitter` is the quadrants' alone)."""
    if name == "quadrants":
        base, named = quadrants(jitter), _quadrant_names
    elif name == "free":
        base, named = FREE, _free_names
    else:
        raise DataError(f"layout '{name}': no such ShapesVQA layout; use one of {', '.join(LAYOUTS)}")
    return _with_negations(base, named) if negations else base


def vocabulary(name: str = "quadrants", negations: bool = False) -> list[str]:
    """Every word a layout's text can contain (the quadrants' words and the variant's own)."""
    words = set(quadrant_layout.vocabulary())
    words |= FREE_WORDS if name == "free" else set()
    words |= NEGATION_WORDS if negations else set()
    return sorted(words)
