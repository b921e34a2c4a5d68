"""The page's example images and questions: held-out ShapesVQA scenes from the run's eval split, one of
each question type first, or freshly rendered scenes when the run's data is not here."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lsd_edge.data.questions import first_questions
from lsd_edge.data.shapes import generate
from lsd_edge.errors import LsdEdgeError
from lsd_edge.recipe.load import folder_recipe


@dataclass(frozen=True)
class Example:
    image: Path
    question: str
    answer: str
    kind: str


def read_examples(eval_json: Path, images: Path | None = None, n: int = 6) -> list[Example]:
    """Up to `n` questions from a ShapesVQA-style eval file, one of each question type first. The pool
    is the whole file, so its images are checked for being there, not decoded: start-up stays quick
    on a big eval set."""
    pool = [
        Example(q.image, q.question, q.answer, q.type)
        for q in first_questions(eval_json, images, decode=False)
    ]
    firsts: dict[str, Example] = {}
    for ex in pool:
        firsts.setdefault(ex.kind, ex)
    chosen = list(firsts.values())[:n]
    chosen += [ex for ex in pool if ex not in chosen][: n - len(chosen)]
    return chosen


def shapes_examples(folders: Sequence[Path | None] = (), n: int = 6, image_size: int = 48) -> list[Example]:
    """Examples from the eval split named by the first recipe.toml in `folders` (a run or model
    folder), or, without one, freshly rendered ShapesVQA scenes in a temporary folder."""
    recipe = next((r for f in folders if f is not None and (r := folder_recipe(f)) is not None), None)
    if recipe is not None:
        if recipe.data.eval is not None:
            path, images = recipe.data.resolve(recipe.data.eval)
            try:
                if path.is_file():
                    return read_examples(path, images, n)
            except LsdEdgeError:  # a broken eval file: render new scenes instead
                pass
        if recipe.data.shapes is not None:
            image_size = recipe.data.shapes.image_size
    out = Path(tempfile.mkdtemp(prefix="lsd-edge-demo-"))
    generate(out, seed=0, n_train=1, n_eval=4 * n, image_size=image_size, questions_per_image=1)
    return read_examples(out / "eval.json", out / "images", n)
