"""The `lsd-edge` command: thin Typer commands that parse, call one library function, and print.

This is the only place that catches `LsdEdgeError`: it becomes one red line and exit status 1
(`--debug` or LSD_EDGE_DEBUG=1 shows the traceback instead).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from lsd_edge import __version__
from lsd_edge.errors import LsdEdgeError, RecipeError

app = typer.Typer(
    name="lsd-edge",
    help="Distill a big LLaVA-style vision-language model into a small one, export it to ONNX, bench and demo it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Make or inspect data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

out = Console()
err = Console(stderr=True)

SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a recipe key, e.g. --set stages[0].lr=1e-4 (repeatable).", show_default=False
    ),
]


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # transformers is a dependency; never fail a command over logging
        pass


def _version(value: bool) -> None:
    if value:
        out.print(f"lsd-edge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (also LSD_EDGE_DEBUG=1).")] = False,
) -> None:
    if debug:
        os.environ["LSD_EDGE_DEBUG"] = "1"
    _quiet_libraries()


def _reporter():
    from lsd_edge.progress import RichReporter

    return RichReporter(err)


def _write_json(path: Path | None, data: Any) -> None:
    """The `--json OUT` of a command: the result as JSON, when asked for."""
    if path:
        from lsd_edge.checkpoint import write_json

        write_json(path, data)
        out.print(f"wrote {path}")


def _tree(label: str, data: Any, tree: Tree | None = None) -> Tree:
    tree = tree or Tree(f"[bold]{label}")
    if isinstance(data, dict):
        for k, v in data.items():
            if isinstance(v, (dict, list)) and v and (isinstance(v, dict) or isinstance(v[0], dict)):
                _tree(k, v, tree.add(f"[cyan]{k}"))
            else:
                tree.add(f"[cyan]{k}[/cyan] = {json.dumps(v)}")
    elif isinstance(data, list):
        for i, v in enumerate(data):
            name = v.get("name", i) if isinstance(v, dict) else i
            _tree(str(i), v, tree.add(f"[cyan][{i}][/cyan] {name}"))
    return tree


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="A TOML recipe.")],
    set_: SetOpt = None,
) -> None:
    """Check a recipe and print it resolved (defaults filled in), or every problem in it."""
    from lsd_edge.config import load_recipe

    r = load_recipe(recipe, set_ or [])
    out.print(_tree(str(recipe), r.model_dump(mode="json", exclude_none=True)))
    out.print(
        f"[green]{recipe}: valid[/green] ({len(r.stages)} stages: {' -> '.join(s.name for s in r.stages)})"
    )


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
) -> None:
    """Generate ShapesVQA: rendered shapes with captions and questions (LLaVA-format JSON)."""
    from lsd_edge.data.shapes import generate

    rep = _reporter()
    rep.task("ShapesVQA", n_train + n_eval)
    done = [0]

    def tick(i, total):
        rep.advance(i - done[0])
        done[0] = i

    s = generate(out_dir, seed, n_train, n_eval, image_size, questions_per_image, progress=tick)
    rep.done()
    out.print(
        f"[green]wrote ShapesVQA to {s.out_dir}[/green]: {s.n_pretrain} captions (pretrain.json), "
        f"{s.n_instruct_turns} questions (instruct.json), {s.n_eval} eval questions (eval.json), images/"
    )


@app.command()
def info(model_dir: Annotated[Path, typer.Argument(help="A model folder (HF format).")]) -> None:
    """Parameters per group, size on disk, dtype and vocabulary of a model folder."""
    from lsd_edge.models import model_info

    i = model_info(model_dir)
    t = Table(title=str(model_dir))
    t.add_column("group")
    t.add_column("parameters", justify="right")
    for g, n in i.params.items():
        t.add_row(g, f"{n:,}")
    out.print(t)
    out.print(
        f"size on disk {i.size_mb:.2f} MB, dtype {i.dtype}, LLM {i.llm}, vision {i.vision}, "
        f"vocab rows {i.vocab_size} (tokenizer {i.tokenizer_size}), {i.image_tokens} visual tokens per image"
    )


@app.command()
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
    from lsd_edge.config import load_recipe
    from lsd_edge.train import DistillOptions
    from lsd_edge.train import distill as run_distill

    if resume and restart:
        raise LsdEdgeError("--resume and --restart contradict each other; pick one")
    r = load_recipe(recipe, set_ or [])
    report = run_distill(r, DistillOptions(resume=resume, restart=restart), _reporter())
    print_report(report)


def print_report(report: dict[str, Any]) -> None:
    t = Table(title=f"lsd-edge distill: {report['recipe']}")
    for col in ("model", "accuracy", "parameters", "size MB"):
        t.add_column(col, justify="left" if col == "model" else "right")

    def acc(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    t.add_row(
        "teacher",
        acc(report["teacher"]["accuracy"]),
        f"{report['teacher']['params']:,}",
        f"{report['teacher']['size_mb']:.2f}",
    )
    for s in report["stages"]:
        t.add_row(f"  after {s['name']} ({s['kind']})", acc(s["accuracy"]), "", "")
    t.add_row(
        "[bold]student",
        acc(report["student"]["accuracy"]),
        f"{report['student']['params']:,}",
        f"{report['student']['size_mb']:.2f}",
    )
    out.print(t)
    ratio = report["student"]["params"] / max(1, report["teacher"]["params"])
    out.print(
        f"student: {report['student']['path']} ({ratio:.2f}x the teacher's parameters); "
        f"report: {report['output_dir']}/report.json; {report['seconds']:.0f}s on {report['device']}"
    )


@app.command("eval")
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
    from lsd_edge.evaluate import evaluate
    from lsd_edge.models import load_llava

    model, processor = load_llava(str(model_dir), what="model")
    res = evaluate(
        model,
        processor,
        data,
        images,
        max_samples=max_samples,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    t = Table(title=f"exact match: {model_dir}")
    t.add_column("type")
    t.add_column("n", justify="right")
    t.add_column("accuracy", justify="right")
    for k, v in res.by_type.items():
        t.add_row(k, str(v["n"]), f"{100 * v['accuracy']:.1f}%")
    t.add_row("[bold]all", str(res.n), f"[bold]{100 * res.accuracy:.1f}%")
    out.print(t)
    if res.bad_samples.get("total"):
        err.print(
            f"[yellow]skipped {res.bad_samples['total']} bad sample(s): {res.bad_samples['by_reason']}[/yellow]"
        )
    _write_json(json_out, res.as_dict())


@app.command()
def ablate(
    recipe: Annotated[Path, typer.Argument(help="A TOML recipe.")],
    schemes: Annotated[
        str, typer.Option("--schemes", help="Comma-separated stage chains, e.g. pt-sft,dpt-sft-dft.")
    ],
    output: Annotated[
        Path | None, typer.Option("--output", help="Folder for the runs (default <output_dir>/ablate).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the table as JSON here.")] = None,
    set_: SetOpt = None,
) -> None:
    """Run several stage chains from the same initial student, seed and teacher; compare accuracy."""
    from lsd_edge.ablate import ablate as run_ablate
    from lsd_edge.config import load_recipe

    r = load_recipe(recipe, set_ or [])
    result = run_ablate(r, [s.strip() for s in schemes.split(",") if s.strip()], output, _reporter())
    t = Table(title=f"ablation: {r.run.name}")
    t.add_column("scheme")
    t.add_column("accuracy", justify="right")
    t.add_column("steps", justify="right")
    for name, row in result["schemes"].items():
        t.add_row(name, f"{100 * row['accuracy']:.1f}%", str(row["steps"]))
    t.add_row("teacher", f"{100 * result['teacher']['accuracy']:.1f}%", "")
    out.print(t)
    out.print(f"chart: {result['chart']}")
    _write_json(json_out, result)


@app.command("bench-loss")
def bench_loss(
    vocab: Annotated[int, typer.Option("--vocab", min=1, help="Vocabulary rows.")] = 151936,
    tokens: Annotated[int, typer.Option("--tokens", min=1, help="Positions (B x T) in the batch.")] = 4096,
    student_hidden: Annotated[int, typer.Option("--student-hidden", min=1)] = 896,
    teacher_hidden: Annotated[int, typer.Option("--teacher-hidden", min=1)] = 2048,
    chunk: Annotated[int, typer.Option("--chunk", min=1, help="Positions per chunk.")] = 256,
    kind: Annotated[str, typer.Option("--kind", help="forward, reverse, jsd or skew.")] = "forward",
    temperature: Annotated[float, typer.Option("--temperature", min=0.01)] = 1.0,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed runs of each path.")] = 3,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result as JSON here.")] = None,
) -> None:
    """Plain vs chunked response KL (forward + backward): peak memory, time, and their difference."""
    from lsd_edge.bench_loss import bench_loss as run_bench

    res = run_bench(
        vocab,
        tokens,
        student_hidden,
        teacher_hidden,
        chunk,
        kind,
        temperature,
        repeats,
        device,
        0,
        _reporter(),
    )
    t = Table(title=f"KL loss, {tokens:,} positions x {vocab:,} rows, on {res.device}")
    t.add_column("path")
    t.add_column("peak MB", justify="right")
    t.add_column("ms", justify="right")
    t.add_row("plain", f"{res.plain['peak_mb']:,.0f}", f"{res.plain['ms']:,.0f}")
    t.add_row(f"chunked ({chunk})", f"{res.chunked['peak_mb']:,.0f}", f"{res.chunked['ms']:,.0f}")
    out.print(t)
    out.print(
        f"chunked / plain: memory {res.chunked['peak_mb'] / max(res.plain['peak_mb'], 1e-9):.1%}, "
        f"time {res.chunked['ms'] / max(res.plain['ms'], 1e-9):.2f}x; max relative difference "
        f"{res.max_rel_diff:.1e} (loss and gradients)"
    )
    _write_json(json_out, res.as_dict())


@app.command("cache-teacher")
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
    from lsd_edge.config import load_recipe
    from lsd_edge.train import cache_teacher as run_cache

    r = load_recipe(recipe, set_ or [])
    m = run_cache(r, stage, top_k, force, _reporter())
    pos = m["positions"]
    verb = "made" if m["built"] else "up to date"
    out.print(
        f"[green]teacher cache {verb}[/green]: {m['folder']} — {m['samples']:,} samples, "
        f"{pos['response']:,} response + {pos['visual']:,} visual positions, {m['images']:,} images, "
        f"top-{m['top_k']} ({', '.join(m['parts'])})"
    )
    out.print(
        f"{m['bytes'] / 2**20:,.1f} MB on disk, {m['bytes_per_position']:,.0f} bytes per cached position "
        f"({m['topk_bytes_per_position']} for the top-k and tail), made in {m['seconds']:.1f}s"
    )
    if not m["used_by_stage"]:
        out.print(f"[yellow]stage {stage} does not use it yet: set teacher_cache = 'auto' on it[/yellow]")


@app.command()
def regenerate(
    recipe: Annotated[Path, typer.Argument(help="A TOML recipe.")],
    stage: Annotated[
        str, typer.Option("--stage", help="The stage whose questions the teacher answers.")
    ] = "sft",
    force: Annotated[bool, typer.Option("--force", help="Make it again even if it is up to date.")] = False,
    set_: SetOpt = None,
) -> None:
    """Have the teacher answer a stage's questions and write them as a new LLaVA-format JSON (LLaVADI)."""
    from lsd_edge.config import load_recipe
    from lsd_edge.train import regenerate_data

    r = load_recipe(recipe, set_ or [])
    m = regenerate_data(r, stage, force, _reporter())
    verb = "wrote" if m["built"] else "up to date:"
    out.print(
        f"[green]{verb} {m['path']}[/green]: {m['answers']:,} answers to {m['records']:,} records, "
        f"{m['changed']:,} differ from the reference, {m['kept_reference']:,} empty kept the reference"
    )
    if not m["used_by_stage"]:
        out.print(f"[yellow]stage {stage} does not use it yet: set regenerate = true on it[/yellow]")


def main() -> None:
    try:
        app()
    except LsdEdgeError as e:
        if os.environ.get("LSD_EDGE_DEBUG") == "1":
            raise
        lines = e.lines() if isinstance(e, RecipeError) else [str(e)]
        err.print(f"[bold red]error:[/bold red] {lines[0]}", highlight=False, soft_wrap=True)
        for line in lines[1:]:
            err.print(f"[red]{line}[/red]", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print(
            "[bold red]interrupted[/bold red]: what was finished is kept; `lsd-edge distill --resume` continues a run"
        )
        sys.exit(130)


if __name__ == "__main__":
    main()
