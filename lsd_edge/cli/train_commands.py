"""Commands that train or use the teacher: distill, eval, ablate, cache-teacher, regenerate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lsd_edge.cli import render
from lsd_edge.cli.app import SetOpt, app, err, out, reporter, write_json_out
from lsd_edge.data.records import BadSampleLog
from lsd_edge.errors import LsdEdgeError
from lsd_edge.evaluate.greedy import evaluate
from lsd_edge.recipe.load import load_recipe
from lsd_edge.train.ablate import ablate as run_ablate
from lsd_edge.train.offline import cache_teacher as run_cache
from lsd_edge.train.offline import regenerate_data
from lsd_edge.train.pipeline import DistillOptions
from lsd_edge.train.pipeline import distill as run_distill

PANEL = "Training"


@app.command(rich_help_panel=PANEL)
def distill(
    recipe: Annotated[Path, typer.Argument(help="A TOML recipe, e.g. recipes/tiny.toml.")],
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run in the output folder.")
    ] = False,
    restart: Annotated[
        bool,
        typer.Option("--restart", help="Train the student again from scratch (keeps the cached teacher)."),
    ] = False,
) -> None:
    """Run a recipe's stages (e.g. DPT -> SFT -> DFT) and write checkpoints and a report."""
    if resume and restart:
        raise LsdEdgeError("--resume and --restart contradict each other; pick one")
    r = load_recipe(recipe, set_ or [])
    report = run_distill(r, DistillOptions(resume=resume, restart=restart), reporter())
    if report:  # empty on every process but rank 0 of a multi-process launch
        for line in render.distill_report(report):
            out.print(line)


@app.command("eval", rich_help_panel=PANEL)
def eval_(
    model_dir: Annotated[Path, typer.Argument(help="A model folder (HF format).")],
    data: Annotated[
        Path, typer.Option("--data", help="LLaVA-format eval JSON/JSONL with reference answers.")
    ],
    images: Annotated[
        Path | None,
        typer.Option("--images", help="Image folder (default: images/ beside the JSON, else its folder)."),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result as JSON here.")] = None,
    max_samples: Annotated[int | None, typer.Option("--max-samples", min=1)] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 8,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
) -> None:
    """Exact-match accuracy by greedy generation, overall and per question type."""
    res = evaluate(
        model_dir,
        data,
        images,
        max_samples=max_samples,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    out.print(render.eval_result(model_dir, res))
    line = BadSampleLog.merged([res.bad_samples]).report()
    if line:
        err.print(f"[yellow]{line}[/yellow]")
    write_json_out(json_out, res.as_dict())


@app.command(rich_help_panel=PANEL)
def ablate(
    recipe: Annotated[Path, typer.Argument(help="A TOML recipe.")],
    schemes: Annotated[
        str,
        typer.Option(
            "--schemes",
            help="Comma-separated stage chains, e.g. pt-sft,dpt-sft-dft; ':no-TERM' turns a distillation "
            "term off in every stage, e.g. dpt-sft-dft:no-visual_kl:no-relation; ':on-policy' makes DFT "
            "train on the student's own answers (dpt-sft-dft,dpt-sft-dft:on-policy compares the two).",
        ),
    ],
    output: Annotated[
        Path | None, typer.Option("--output", help="Folder for the runs (default <output_dir>/ablate).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the table as JSON here.")] = None,
    set_: SetOpt = None,
) -> None:
    """Run several stage chains from the same initial student, seed and teacher; compare accuracy."""
    r = load_recipe(recipe, set_ or [])
    result = run_ablate(r, [s.strip() for s in schemes.split(",") if s.strip()], output, reporter())
    for line in render.ablation(r.run.name, result):
        out.print(line)
    write_json_out(json_out, result)


@app.command("cache-teacher", rich_help_panel=PANEL)
def cache_teacher(
    recipe: Annotated[Path, typer.Argument(help="A TOML recipe.")],
    stage: Annotated[
        str, typer.Option("--stage", help="The (distilling) stage whose data to cache.")
    ] = "dft",
    top_k: Annotated[
        int | None,
        typer.Option(
            "--top-k", min=1, help="Log-probs kept per position (default: the stage's teacher_cache_top_k)."
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Make it again even if it is up to date.")] = False,
    set_: SetOpt = None,
) -> None:
    """Run the teacher once over a stage's data and store its top-k log-probs and features."""
    r = load_recipe(recipe, set_ or [])
    for line in render.teacher_cache(run_cache(r, stage, top_k, force, reporter()), stage):
        out.print(line)


@app.command(rich_help_panel=PANEL)
def regenerate(
    recipe: Annotated[Path, typer.Argument(help="A TOML recipe.")],
    stage: Annotated[
        str, typer.Option("--stage", help="The stage whose questions the teacher answers.")
    ] = "sft",
    force: Annotated[bool, typer.Option("--force", help="Make it again even if it is up to date.")] = False,
    set_: SetOpt = None,
) -> None:
    """Have the teacher answer a stage's questions and write them as a new LLaVA-format JSON (LLaVADI)."""
    r = load_recipe(recipe, set_ or [])
    for line in render.regenerated(regenerate_data(r, stage, force, reporter()), stage):
        out.print(line)
