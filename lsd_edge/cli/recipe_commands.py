"""Commands on recipes, data and models: validate, memory, data shapes, info."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from lsd_edge.cli import render
from lsd_edge.cli.app import SetOpt, app, data_app, out, reporter, write_json_out
from lsd_edge.data.shapes import generate
from lsd_edge.data.shapes_variants import layout as shapes_layout
from lsd_edge.errors import LsdEdgeError, RecipeError
from lsd_edge.models.info import model_info
from lsd_edge.models.load import resolve_device
from lsd_edge.progress import ticker
from lsd_edge.recipe.load import load_recipe
from lsd_edge.train.backends.select import setup
from lsd_edge.train.measure import measure_step
from lsd_edge.train.memory import estimate_recipe, recipe_shapes
from lsd_edge.train.setup import pick_stage
from lsd_edge.train.sight import tokenizer_problems
from lsd_edge.workspace import Workspace

PANEL = "Recipes, data and models"


@app.command(rich_help_panel=PANEL)
def validate(
    recipe: Annotated[Path, typer.Argument(help="A TOML recipe.")],
    set_: SetOpt = None,
    memory: Annotated[
        bool,
        typer.Option(
            "--memory/--no-memory",
            help="Show the teacher's and student's visual tokens and parameters per group, and estimate each "
            "stage's peak memory per process (reads the models' config.json only).",
        ),
    ] = True,
) -> None:
    """Check a recipe and print it resolved (defaults filled in), or every problem in it."""
    r = load_recipe(recipe, set_ or [])
    problems = tokenizer_problems(r)
    if problems:  # what distill refuses across two tokenizers, before any model loads
        raise RecipeError(str(recipe), problems)
    out.print(render.tree(str(recipe), r.model_dump(mode="json", exclude_none=True)))
    out.print(
        f"[green]{recipe}: valid[/green] ({len(r.stages)} stages: {' -> '.join(s.name for s in r.stages)})"
    )
    if memory:
        try:
            shapes = recipe_shapes(r)
            rows = estimate_recipe(r, shapes=shapes)
        except RecipeError:  # a student vision choice that does not fit the teacher's tower as read
            raise
        except LsdEdgeError as e:  # the recipe is valid; only its models' configs are out of reach
            out.print(f"[yellow]models and memory estimate unavailable: {e}[/yellow]")
        else:
            out.print(render.models_table(*shapes))
            out.print(render.memory_table(rows))


@app.command(rich_help_panel=PANEL)
def memory(
    recipe: Annotated[Path, typer.Argument(help="A TOML recipe.")],
    stage: Annotated[
        str | None, typer.Option("--stage", help="Stage to measure (default: the last distilling one).")
    ] = None,
    measure: Annotated[
        bool,
        typer.Option(
            "--measure", help="Also run steps on random weights at the recipe's sizes and measure them."
        ),
    ] = False,
    steps: Annotated[
        int, typer.Option("--steps", min=2, help="Steps to run; the last is measured (the others warm up).")
    ] = 3,
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", min=8, help="Tokens per sample (default data.max_length).")
    ] = None,
    peak_tflops: Annotated[
        float | None,
        typer.Option(
            "--peak-tflops", help="The GPU's peak bf16 dense TFLOPS for MFU (known GPUs: automatic)."
        ),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON here.")] = None,
    set_: SetOpt = None,
) -> None:
    """Estimate each stage's peak memory; with --measure, measure one stage's step on random weights
    (peak memory, step time, tokens/s, MFU) on the recipe's device."""
    r = load_recipe(recipe, set_ or [])
    device = resolve_device(r.run.device)
    rows = estimate_recipe(r, seq_len=seq_len, device=device.type)
    out.print(render.memory_table(rows))
    result: dict[str, Any] = {"estimate": [m.as_dict() for m in rows]}
    if measure:
        chosen = pick_stage(r, stage)
        est = rows[r.stages.index(chosen)]
        # the launch's backend (`accelerate launch` measures DDP, FSDP2 or ZeRO; else one process)
        backend, device = setup(r.run, Workspace(r.output_dir).trackers)
        m = measure_step(
            r, chosen, device=device, seq_len=seq_len, steps=steps, peak_tflops=peak_tflops, backend=backend
        )
        out.print(render.measured_table(m, est.total, chosen.name))
        result["measured"] = m.as_dict()
    write_json_out(json_out, result)


@data_app.command("shapes")
def data_shapes(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write ShapesVQA into.")],
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same bytes.")] = 0,
    n_train: Annotated[int, typer.Option("--n-train", min=1, help="Training scenes.")] = 2000,
    n_eval: Annotated[int, typer.Option("--n-eval", min=1, help="Held-out eval scenes.")] = 300,
    image_size: Annotated[
        int, typer.Option("--image-size", min=16, max=1024, help="Image side in pixels.")
    ] = 48,
    questions_per_image: Annotated[int, typer.Option("--questions-per-image", min=1, max=10)] = 4,
    jitter: Annotated[
        int, typer.Option(min=0, max=64, help="Largest offset of a shape from its cell's centre, in pixels.")
    ] = 1,
    layout: Annotated[
        Literal["quadrants", "free"],
        typer.Option(
            help="quadrants: 1-4 shapes in a 2x2 grid; free: 1-2 at random places, sizes, rotations."
        ),
    ] = "quadrants",
    negations: Annotated[
        bool, typer.Option("--negations/--no-negations", help="Also ask negated questions.")
    ] = False,
) -> None:
    """Generate ShapesVQA: rendered shapes with captions and questions (LLaVA-format JSON)."""
    rep = reporter()
    rep.task("ShapesVQA", n_train + n_eval)
    s = generate(
        out_dir,
        seed,
        n_train,
        n_eval,
        image_size,
        questions_per_image,
        progress=ticker(rep),
        jitter=jitter,
        layout=shapes_layout(layout, negations, jitter),
    )
    rep.done()
    out.print(
        f"[green]wrote ShapesVQA to {s.out_dir}[/green]: {s.n_pretrain} captions (pretrain.json), "
        f"{s.n_instruct_turns} questions (instruct.json), {s.n_eval} eval questions (eval.json), images/"
    )


@app.command(rich_help_panel=PANEL)
def info(model_dir: Annotated[Path, typer.Argument(help="A model folder (HF format).")]) -> None:
    """Parameters per group, visual tokens and vision tower, size on disk, dtype and vocabulary of a
    model folder."""
    for line in render.model_info_lines(model_dir, model_info(model_dir)):
        out.print(line)
