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
from rich import box
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
    memory: Annotated[
        bool,
        typer.Option(
            "--memory/--no-memory",
            help="Estimate each stage's peak memory per process (reads the models' config.json only).",
        ),
    ] = True,
) -> None:
    """Check a recipe and print it resolved (defaults filled in), or every problem in it."""
    from lsd_edge.config import load_recipe

    r = load_recipe(recipe, set_ or [])
    out.print(_tree(str(recipe), r.model_dump(mode="json", exclude_none=True)))
    out.print(
        f"[green]{recipe}: valid[/green] ({len(r.stages)} stages: {' -> '.join(s.name for s in r.stages)})"
    )
    if memory:
        from lsd_edge.memory import estimate_recipe

        try:
            rows = estimate_recipe(r)
        except LsdEdgeError as e:  # the recipe is valid; only its models' configs are out of reach
            out.print(f"[yellow]memory estimate unavailable: {e}[/yellow]")
        else:
            out.print(memory_table(rows))


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def memory_table(rows) -> Table:
    first = rows[0]
    unit, size = ("GiB", 2**30) if max(m.total for m in rows) >= 2**30 else ("MiB", 2**20)
    where = "CUDA, bf16 autocast" if first.device == "cuda" else "CPU, fp32"
    t = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        title=f"estimated peak memory per process, {unit} ({where})",
        caption=f"stud/teach: weights; t.fwd: the teacher's forward. Worst case: every sample "
        f"{first.seq_len} tokens, one image, all other tokens answers. *: activation checkpointing",
    )
    cols = {
        "stud": "student_weights",
        "grads": "gradients",
        "adamw": "optimizer",
        "teach": "teacher_weights",
        "activ": "activations",
        "logit": "logits",
        "t.fwd": "teacher_forward",
    }
    t.add_column("stage")
    t.add_column("batch", justify="right")
    for c in list(cols) + ["total"]:
        t.add_column(c, justify="right")
    for m in rows:
        t.add_row(
            m.stage + ("*" if m.checkpointing else ""),
            str(m.batch_size),
            *(f"{getattr(m, f) / size:.2f}" for f in cols.values()),
            f"[bold]{m.total / size:.2f}",
        )
    return t


@app.command()
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
    from lsd_edge.config import load_recipe
    from lsd_edge.distributed import resolve_device
    from lsd_edge.memory import estimate_recipe, measure_step

    r = load_recipe(recipe, set_ or [])
    device = resolve_device(r.run.device)
    rows = estimate_recipe(r, seq_len=seq_len, device=device.type)
    out.print(memory_table(rows))
    result: dict[str, Any] = {"estimate": [m.as_dict() for m in rows]}
    if measure:
        names = [s.name for s in r.stages]
        if stage is None:
            distilling = [s for s in r.stages if s.distills]
            chosen = (distilling or r.stages)[-1]
        elif stage in names:
            chosen = r.stages[names.index(stage)]
        else:
            raise LsdEdgeError(f"--stage {stage}: the recipe has no such stage; it has {', '.join(names)}")
        est = rows[r.stages.index(chosen)]
        m = measure_step(r, chosen, device=device, seq_len=seq_len, steps=steps, peak_tflops=peak_tflops)
        t = Table(
            title=f"measured: stage {chosen.name}, {m.device}, random weights, synthetic worst-case batches"
        )
        for col in ("peak memory", "estimate", "estimate / measured", "step", "tokens/s", "TFLOPS", "MFU"):
            t.add_column(col, justify="right")
        t.add_row(
            fmt_bytes(m.peak_bytes),
            fmt_bytes(est.total),
            f"{est.total / m.peak_bytes:.2f}",
            f"{m.step_seconds:.3f} s",
            f"{m.tokens_per_s:,.0f}",
            f"{m.tflops:.2f}",
            "n/a" if m.mfu is None else f"{100 * m.mfu:.1f}%",
        )
        out.print(t)
        result["measured"] = m.as_dict()
    if json_out:
        from lsd_edge.checkpoint import write_json

        write_json(json_out, result)
        out.print(f"wrote {json_out}")


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
) -> None:
    """Generate ShapesVQA: rendered shapes with captions and questions (LLaVA-format JSON)."""
    from lsd_edge.data.shapes import generate

    rep = _reporter()
    rep.task("ShapesVQA", n_train + n_eval)
    done = [0]

    def tick(i, total):
        rep.advance(i - done[0])
        done[0] = i

    s = generate(
        out_dir, seed, n_train, n_eval, image_size, questions_per_image, progress=tick, jitter=jitter
    )
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
    if report:  # empty on every process but rank 0 of a multi-process launch
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


@app.command("export")
def export_(
    model_dir: Annotated[
        Path | None,
        typer.Argument(help="A model folder (default: the student of the most recent run under runs/)."),
    ] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Add int8 graphs (*_int8.onnx).")] = False,
    int4: Annotated[bool, typer.Option("--int4", help="Add 4-bit weight-only graphs (*_q4.onnx).")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="Add float16 graphs (*_fp16.onnx).")] = False,
    fp32: Annotated[bool, typer.Option("--fp32", help="Write the fp32 graphs only.")] = False,
    target: Annotated[
        str | None,
        typer.Option(
            "--target", help="cpu (dynamic int8) or cuda (MatMulNBits); default: the recipe's export.target."
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="Export folder (default <run>/onnx, or <MODEL_DIR>-onnx).")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="LLaVA-format eval JSON for the parity gate (default: the recipe's)."),
    ] = None,
    images: Annotated[Path | None, typer.Option("--images", help="Image folder of --data.")] = None,
    samples: Annotated[
        int | None, typer.Option("--samples", min=1, help="Questions for the logit and greedy-token checks.")
    ] = None,
    eval_samples: Annotated[
        int | None, typer.Option("--eval-samples", min=1, help="Questions for the accuracy comparison.")
    ] = None,
    opset: Annotated[int | None, typer.Option("--opset", min=17, max=23, help="ONNX opset.")] = None,
) -> None:
    """Export a student to ONNX (three graphs + a quantized variant), check parity with PyTorch, report sizes and speed."""
    from lsd_edge.export import export

    chosen = [name for name, on in (("int8", int8), ("int4", int4), ("fp16", fp16), ("none", fp32)) if on]
    if len(chosen) > 1:
        raise LsdEdgeError("pick one of --int8, --int4, --fp16, --fp32")
    if target is not None and target not in ("cpu", "cuda"):
        raise LsdEdgeError(f"--target {target}: choose cpu or cuda")
    overrides = {
        "quantize": chosen[0] if chosen else None,
        "target": target,
        "data": data,
        "images": images,
        "parity_samples": samples,
        "eval_samples": eval_samples,
        "opset": opset,
    }
    result = export(model_dir, output, overrides, _reporter())
    print_export_report(result.report)


def print_export_report(report: dict[str, Any]) -> None:
    sizes = report["sizes_mb"]
    variants = report["variants"]
    latest = " (the most recent run's student)" if report["picked_latest_run"] else ""
    out.print(f"model: {report['model_dir']}{latest}")
    t = Table(title=f"lsd-edge export: {report['output']}")
    t.add_column("graph")
    for v in variants:
        t.add_column(f"{v} MB", justify="right")
    for g in ("vision_encoder", "embed_tokens", "decoder_model_merged", "total"):
        cells = [f"{sizes[v][g]:.3f}" for v in variants]
        if len(variants) > 1:
            cells[-1] += f" ({100 * report['size_ratio'][g]:.0f}%)"
        t.add_row(f"[bold]{g}" if g == "total" else g, *cells)
    out.print(t)
    p = report["parity"]

    def acc(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    out.print(
        f"parity on {p['variants']['fp32']['samples']} samples ({p['source']}): fp32 logits max rel diff "
        f"{p['max_rel_logit_diff']:.1e}, greedy agreement {100 * p['greedy_agreement']:.0f}%; accuracy PyTorch "
        f"{acc(p['accuracy_torch'])} vs ONNX {report['default_variant']} {acc(p['accuracy_onnx'])}"
    )
    tm = report["timing_s"]
    line = f"export {tm['export']:.1f}s (trace {tm['trace']:.1f}s, quantize {tm['quantize']:.1f}s)"
    speed = report.get("speed")
    if speed:
        v = report["default_variant"]
        line += (
            f"; decode {speed[f'onnx_{v}']['decode_tokens_per_s']:.0f} tok/s ONNX {v} vs "
            f"{speed['torch']['decode_tokens_per_s']:.0f} tok/s PyTorch ({speed['onnx_vs_torch_decode']:.2f}x) "
            f"on {speed['machine']}"
        )
    out.print(line)
    out.print(f"[green]parity gate passed[/green]; report: {report['output']}/export_report.json")


@app.command("bench")
def bench_(
    teacher: Annotated[
        Path | None, typer.Option("--teacher", help="Teacher model folder (default: the latest run's).")
    ] = None,
    student: Annotated[
        Path | None, typer.Option("--student", help="Student model folder (default: the latest run's).")
    ] = None,
    onnx: Annotated[
        list[Path] | None,
        typer.Option("--onnx", help="ONNX export folder (repeatable; default: the latest run's onnx*/)."),
    ] = None,
    arch: Annotated[
        list[str] | None,
        typer.Option(
            "--arch",
            help="Also measure a real architecture with random weights (repeatable): qwen0.5b, qwen1.8b "
            "(students, with their ONNX int8 export), qwen4b, llava7b (bf16 teachers).",
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    dtype: Annotated[
        str,
        typer.Option("--dtype", help="PyTorch rows: auto (bf16 on cuda, fp32 on cpu), float32, bfloat16."),
    ] = "auto",
    variant: Annotated[
        list[str] | None,
        typer.Option("--variant", help="ONNX variants to measure (repeatable; default: every one exported)."),
    ] = None,
    prompts: Annotated[
        int | None,
        typer.Option(
            "--prompts",
            help="Eval prompts (with an image) per repeat (default: the recipe's [bench], else 8).",
        ),
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-new-tokens",
            help="New tokens per generation, EOS ignored (default: the recipe's [bench], else 128).",
        ),
    ] = None,
    repeats: Annotated[
        int | None,
        typer.Option(
            "--repeats", help="Timed passes over the prompts (default: the recipe's [bench], else 3)."
        ),
    ] = None,
    warmup: Annotated[
        int | None,
        typer.Option("--warmup", help="Untimed generations first (default: the recipe's [bench], else 1)."),
    ] = None,
    eval_samples: Annotated[
        int | None,
        typer.Option("--eval-samples", help="Questions for accuracy (default: the recipe's eval split)."),
    ] = None,
    no_accuracy: Annotated[bool, typer.Option("--no-accuracy", help="Skip the accuracy column.")] = False,
    data: Annotated[
        Path | None, typer.Option("--data", help="LLaVA-format eval JSON (default: the recipe's eval split).")
    ] = None,
    images: Annotated[Path | None, typer.Option("--images", help="Image folder of --data.")] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="Threads per measured process (default: every core).")
    ] = None,
    copy_mb: Annotated[
        int, typer.Option("--copy-mb", help="MiB copied to measure memory bandwidth (roofline).")
    ] = 1024,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Write the results here (default: <run>/bench.json for a run)."),
    ] = None,
    plot_out: Annotated[Path | None, typer.Option("--plot", help="Write a PNG chart here.")] = None,
    markdown_out: Annotated[
        Path | None, typer.Option("--markdown", help="Write the table as Markdown here.")
    ] = None,
) -> None:
    """Teacher vs student vs ONNX student: TTFT, tokens/s, memory, size, accuracy, against the roofline."""
    from lsd_edge.bench import BenchSettings, bench, plot, to_markdown, write_result

    settings = BenchSettings(
        device=device,
        dtype=dtype,
        prompts=prompts,
        max_new_tokens=max_new_tokens,
        repeats=repeats,
        warmup=warmup,
        eval_samples=eval_samples,
        accuracy=not no_accuracy,
        data=data,
        images=images,
        variants=variant or None,
        threads=threads,
        copy_mb=copy_mb,
    )
    result = bench(
        teacher, student, onnx, arch, settings, _reporter(), command="lsd-edge " + " ".join(sys.argv[1:])
    )
    print_bench(result)
    json_out = json_out or (result.run / "bench.json" if result.run is not None else None)
    if json_out:
        out.print(f"wrote {write_result(result, json_out)}")
    if plot_out:
        out.print(f"wrote {plot(result, plot_out)}")
    if markdown_out:
        markdown_out.write_text(to_markdown(result), encoding="utf-8")
        out.print(f"wrote {markdown_out}")


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def print_bench(result) -> None:
    from lsd_edge.bench import fmt_percent

    s = result.settings
    t = Table(
        title=f"lsd-edge bench: {result.source}",
        box=box.SIMPLE_HEAD,
        caption=f"{result.machine['label']}; bandwidth {result.machine['bandwidth_gb_s']:.1f} GB/s; "
        f"{s['prompts']} prompts x {s['repeats']} repeats, {s['max_new_tokens']} new tokens, "
        f"{s['threads']} thread(s) per process",
    )
    heads = ("model", "decode\ntok/s", "prefill\ntok/s", "TTFT ms\np50 / p90", "e2e\ntok/s", "peak\nMB")
    for col in (*heads, "size\nMB", "params", "accuracy", "roof-\nline"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in result.results:
        name = f"[bold]{r.name}[/bold]" if r.role == "teacher" else r.name
        t.add_row(
            f"{name}\n[dim]{r.backend} {r.precision}[/dim]",
            f"{r.decode_tokens_per_s:,.1f}",
            f"{r.prefill_tokens_per_s:,.0f}",
            f"{r.ttft_ms_p50:,.1f} / {r.ttft_ms_p90:,.1f}",
            f"{r.e2e_tokens_per_s:,.1f}",
            f"{r.peak_mem_mb:,.0f}",
            f"{r.size_mb:,.2f}",
            _count(r.params),
            fmt_percent(r.accuracy),
            fmt_percent(r.roofline_fraction),
        )
    # Piped output has no terminal width, and rich would wrap the table into 80 columns.
    (out if out.is_terminal else Console(width=160)).print(t)
    for q in result.ratios:
        delta = "n/a" if q["accuracy_delta"] is None else f"{100 * q['accuracy_delta']:+.1f} points"
        out.print(
            f"{q['name']} vs {q['vs']}: decode [bold]{q['decode_speedup']:.2f}x[/bold], peak memory "
            f"{q['memory_ratio']:.2f}x, size {q['size_ratio']:.3f}x, accuracy {delta}",
            soft_wrap=True,
        )
    for note in result.notes:
        out.print(f"[yellow]{note}[/yellow]")


@app.command("demo")
def demo_(
    teacher: Annotated[
        Path | None,
        typer.Option("--teacher", help="Teacher model folder (default: the latest run's teacher/)."),
    ] = None,
    student: Annotated[
        Path | None,
        typer.Option(
            "--student",
            help="Student model folder or its ONNX export folder (default: the latest run's student/ and onnx/).",
        ),
    ] = None,
    onnx: Annotated[
        Path | None,
        typer.Option(
            "--onnx", help="The student's ONNX export (default: <run>/onnx or <student>-onnx if there)."
        ),
    ] = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to serve on; 127.0.0.1 keeps the page on this machine.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to serve on.")] = 7860,
    share: Annotated[
        bool,
        typer.Option(
            "--share", help="Also open a public *.gradio.live link (anyone with it can use the page)."
        ),
    ] = False,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda.")] = "auto",
    max_new_tokens: Annotated[
        int,
        typer.Option("--max-new-tokens", min=1, max=2048, help="The most new tokens a request may ask for."),
    ] = 64,
    concurrency: Annotated[
        int,
        typer.Option(
            "--concurrency", min=1, max=64, help="Requests answered at once (each runs both models)."
        ),
    ] = 2,
    queue_size: Annotated[
        int, typer.Option("--queue-size", min=1, help="Requests that may wait; more are refused.")
    ] = 64,
) -> None:
    """Open the side-by-side page: teacher and student answer the same image and question, streaming."""
    from demo.app import Limits, build_app, launch
    from demo.loading import load_models, resolve_paths, shapes_examples

    paths = resolve_paths(teacher, student, onnx)
    examples = shapes_examples([paths.run, paths.student, paths.teacher])
    teacher_runner, students = load_models(paths, device, examples, _reporter())
    limits = Limits(
        max_new_tokens=max_new_tokens,
        default_new_tokens=min(24, max_new_tokens),
        concurrency=concurrency,
        queue_size=queue_size,
    )
    page = build_app(teacher_runner, students, examples, limits, paths.notes)
    t = Table(title="lsd-edge demo")
    for col in ("", "backend", "model", "parameters", "peak RSS MiB"):
        t.add_column(col, justify="right" if col in ("parameters", "peak RSS MiB") else "left")
    rows = [("teacher", "PyTorch" if teacher_runner.backend == "torch" else "ONNX", teacher_runner)]
    rows += [("student", b, r) for b, r in students.items()]
    for column, backend, runner in rows:
        i = runner.info()
        params = f"{i['params']:,}" if i.get("params") else "?"
        t.add_row(column, backend, i["path"], params, f"{i['memory']['peak_rss_mib']:.1f}")
    out.print(t)
    for note in paths.notes:
        out.print(f"[yellow]note: {note}[/yellow]")
    if host not in ("127.0.0.1", "localhost", "::1"):
        out.print(f"[yellow]serving on {host}: anyone who can reach this machine can use the page[/yellow]")
    if share:
        out.print(
            "[yellow]--share: a public link through gradio.live; anyone with it can use the page[/yellow]"
        )
    for url in launch(page, host, port, share):
        out.print(f"[green]serving the demo on {url}[/green] (Ctrl+C stops it)")
    page.block_thread()


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
