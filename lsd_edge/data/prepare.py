"""A recipe's data made ready before training: ShapesVQA generated once, every file checked, data sets opened.

`prepare_data` generates ShapesVQA into `data.root` when the recipe asks for it and the root is
empty, and refuses a root made with other settings (its `identity.json` says which) or holding
other files. `check_data_files` fails fast, before hours of training, on a path that is not there.
"""

from __future__ import annotations

from pathlib import Path

from lsd_edge.data.dataset import LlavaDataset, TeacherView
from lsd_edge.data.records import read_records
from lsd_edge.data.shapes import FORMAT, generate
from lsd_edge.data.shapes_variants import layout
from lsd_edge.errors import DataError, LsdEdgeError
from lsd_edge.files import atomic_dir, read_json, write_json
from lsd_edge.identity import IDENTITY_FILE, Manifest
from lsd_edge.progress import Reporter, ticker
from lsd_edge.recipe.schema import Recipe, StageConfig

DATA_SETS = ("pretrain", "instruct", "eval")


def shapes_manifest(recipe: Recipe) -> Manifest:
    """What a generated ShapesVQA root is tied to: the recipe's [data.shapes] and the generator's version."""
    shapes = recipe.data.shapes
    return Manifest(
        "the ShapesVQA data in",
        {"data.shapes": shapes.model_dump(exclude=shapes.later_unset()), "shapes format": FORMAT},
    )


def prepare_data(recipe: Recipe, reporter: Reporter) -> None:
    """Generate ShapesVQA into data.root when the recipe asks for it and the files are missing."""
    shapes = recipe.data.shapes
    if shapes is None:
        return
    root = Path(recipe.data.root)
    manifest = shapes_manifest(recipe)
    if (root / IDENTITY_FILE).is_file() or (root / "shapes.json").is_file():
        manifest.check(root, "delete it or point data.root elsewhere")
        return
    if root.exists() and any(root.iterdir()):
        raise LsdEdgeError(
            f"data.root {root} holds files not made by ShapesVQA; point data.root to a new folder, "
            "or remove [data.shapes] to use the files there"
        )
    reporter.task("ShapesVQA", shapes.n_train + shapes.n_eval)
    with atomic_dir(root) as tmp:
        generate(
            tmp,
            seed=shapes.seed,
            n_train=shapes.n_train,
            n_eval=shapes.n_eval,
            image_size=shapes.image_size,
            questions_per_image=shapes.questions_per_image,
            progress=ticker(reporter),
            jitter=shapes.jitter,
            layout=layout(shapes.layout, shapes.negations, shapes.jitter),
        )
        # The summary names the temporary folder; point it at the final one.
        summary = read_json(tmp / "shapes.json")
        summary["out_dir"] = str(root)
        write_json(tmp / "shapes.json", summary)
        manifest.write(tmp)
    reporter.done()


def corpus_texts(recipe: Recipe) -> list[str]:
    """The text of every turn of every configured data file, in file order, for a tiny model's
    tokenizer (`lsd_edge.models.bpe`, which drops the image placeholders)."""
    texts: list[str] = []
    for name in DATA_SETS:
        ds = getattr(recipe.data, name)
        if ds is None:
            continue
        path, _ = recipe.data.resolve(ds)
        for rec in read_records(path):
            turns = rec.get("conversations")
            for turn in turns if isinstance(turns, list) else []:
                value = turn.get("value") if isinstance(turn, dict) else None
                if isinstance(value, str):  # a malformed turn is the data set's to report
                    texts.append(value)
    return texts


def check_data_files(recipe: Recipe, stages: list[StageConfig]) -> None:
    """Every data file and image folder the run will read exists, before hours of training."""
    used = {st.data for st in stages + list(recipe.teacher.stages)}
    if recipe.data.eval is not None:
        used.add("eval")
    problems = []
    for name in sorted(u for u in used if u):
        ds = recipe.data.dataset(name)
        path, images = recipe.data.resolve(ds)
        if not path.is_file():
            problems.append(f"data.{name}.path: {path} is not a file")
        if images is not None and not images.is_dir():
            problems.append(f"data.{name}.images: {images} is not a folder")
    if problems:
        raise DataError(
            "; ".join(problems) + "; fix the paths (data.root is joined in front) or see the recipe's header"
        )


def open_dataset(
    recipe: Recipe,
    stage: StageConfig,
    processor,
    data: tuple[Path, Path | None] | None = None,
    teacher_view: TeacherView | None = None,
) -> LlavaDataset:
    """The stage's data set; `data` (JSON, image folder) replaces the recipe's file (regenerated data);
    `teacher_view` adds the teacher's view of each sample (a teacher that sees with another grid)."""
    path, images = data or recipe.data.resolve(recipe.data.dataset(stage.data))
    return LlavaDataset(
        path,
        images,
        processor,
        max_length=recipe.data.max_length,
        max_samples=stage.max_samples,
        max_turns=stage.max_turns,
        teacher_view=teacher_view,
    )
