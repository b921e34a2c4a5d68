"""`distill(recipe)`: the whole run, METHOD.md's stages chained from one recipe.

It prepares the data, gets the teacher (training and caching it first for the embedded default),
builds the student, checks the tokenizers, then runs the recipe's stages in order, each from the
previous stage's weights (`lsd_edge.train.loop.run_stage`). After every stage the eval split is
scored and a checkpoint folder is written with an identity tying it to the recipe's settings up to
that stage, so `--resume` skips finished stages and refuses ones made with other settings. The run
ends with `student/`, `report.json` and `loss_curve.png` (`lsd_edge.train.report`).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lsd_edge.data.prepare import check_data_files, prepare_data
from lsd_edge.errors import LsdEdgeError
from lsd_edge.files import atomic_dir, read_json, write_json
from lsd_edge.identity import IDENTITY_FILE, Manifest, settings
from lsd_edge.models.card import CARD_FACTS, write_card
from lsd_edge.models.load import load_llava
from lsd_edge.progress import QuietReporter, Reporter
from lsd_edge.recipe.schema import Recipe, StageConfig
from lsd_edge.train import track
from lsd_edge.train.backends.select import setup
from lsd_edge.train.context import RunContext
from lsd_edge.train.distributed import threads_per_process
from lsd_edge.train.loop import run_stage
from lsd_edge.train.offline import StageInputs, check_cache_paths
from lsd_edge.train.report import build_report, card_facts, offline_facts, plot_losses
from lsd_edge.train.sight import check_tokenizers_early
from lsd_edge.train.student import build_student, trainable_student
from lsd_edge.train.teacher import TeacherSlot
from lsd_edge.workspace import Workspace, default_export_dir, is_complete

RESTART = "pass --restart to train the student again, or set run.output_dir to another folder"


@dataclass
class DistillOptions:
    resume: bool = False
    restart: bool = False
    teacher_dir: Path | None = None  # a shared teacher (ablation); default <output>/teacher
    stages: list[StageConfig] | None = None  # override the recipe's stages (ablation)
    evaluate_stages: bool = True


def stage_manifests(recipe: Recipe, stages: list[StageConfig], teacher: str) -> list[Manifest]:
    """Each stage's identity: its settings, every stage before it, the student, the teacher, the data."""
    base = {"student": settings(recipe.student), "teacher": teacher, "data": settings(recipe.data)}
    out = []
    for i, st in enumerate(stages):
        tied = {**base, "stages": [settings(s) for s in stages[: i + 1]], "run.seed": recipe.run.seed}
        out.append(Manifest(f"stage '{st.name}' in", tied))
    return out


def existing_work(ws: Workspace, stage_names: list[str]) -> list[str]:
    found = [n for n in stage_names if ws.stage(n).exists()]
    if ws.states.exists():
        found.append("state")
    if ws.student.exists():
        found.append("student")
    return found


def check_output(ws: Workspace, stage_names: list[str], options: DistillOptions, reporter: Reporter) -> None:
    """Refuse to mix a new run into an old one unless asked: --resume continues, --restart clears
    the student's work (the cached teacher is kept)."""
    existing = existing_work(ws, stage_names)
    if options.restart:
        for p in [ws.stage(n) for n in stage_names] + [
            ws.student,
            ws.states,
            ws.log,
            ws.report,
            ws.loss_curve,
        ]:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        if existing:
            reporter.message(
                f"[yellow]--restart: removed the student stages in {ws.root} (teacher kept)[/yellow]"
            )
        return
    if existing and not options.resume:
        raise LsdEdgeError(
            f"{ws.root} already holds a run ({', '.join(existing)}); pass --resume to continue it or "
            "--restart to train the student again (the cached teacher is kept)"
        )


def start(recipe: Recipe, reporter: Reporter) -> RunContext:
    """Processes, device, threads, seed and trackers of a run."""
    ws = Workspace(recipe.output_dir)
    backend, device = setup(recipe.run, ws.trackers)
    dist = backend.dist
    if recipe.run.num_threads or dist.local_world > 1:
        torch.set_num_threads(threads_per_process(recipe.run.num_threads, dist.local_world))
    torch.manual_seed(recipe.run.seed)
    if not dist.main:  # one process reports and writes; the others train beside it
        reporter = QuietReporter()
    track.start(backend.accelerator, recipe)
    return RunContext(recipe, ws, device, reporter, backend)


def distill(
    recipe: Recipe, options: DistillOptions | None = None, reporter: Reporter | None = None
) -> dict[str, Any]:
    """Run a recipe end to end; returns the report (also written to <output>/report.json).

    Launched on several processes (`accelerate launch -m lsd_edge distill`), every process trains
    its share of each step and rank 0 writes; the other processes return an empty report."""
    options = options or DistillOptions()
    ctx = start(recipe, reporter or QuietReporter())
    ws, stages = ctx.workspace, options.stages if options.stages is not None else list(recipe.stages)

    def set_up_output() -> None:
        check_output(ws, [s.name for s in stages], options, ctx.reporter)
        ws.root.mkdir(parents=True, exist_ok=True)
        ws.recipe_file.write_text(recipe.to_toml(), encoding="utf-8")
        prepare_data(recipe, ctx.reporter)

    started = time.perf_counter()
    ctx.dist.on_main(set_up_output)
    check_data_files(recipe, stages)
    check_cache_paths(stages)
    check_tokenizers_early(recipe, stages)
    teacher = TeacherSlot(ctx, options.teacher_dir)
    teacher.load()
    model, processor = build_student(recipe, teacher.model, teacher.processor, ctx.device)
    inputs = StageInputs(ctx, teacher, processor)
    for st in stages:  # across tokenizers: refuse a stage that cannot work before any stage trains
        if st.distills:
            inputs.vocab(st)
    model, stage_reports = run_stages(ctx, inputs, stages, model, processor, options.evaluate_stages)
    report: dict[str, Any] = {}
    if ctx.dist.main:  # the other processes return an empty report
        report = finish(ctx, teacher, stages[-1], model, stage_reports, time.perf_counter() - started)
    track.finish(ctx.backend.accelerator)
    ctx.dist.barrier()
    return report


def run_stages(ctx: RunContext, inputs: StageInputs, stages, model, processor, evaluate_all: bool):
    """Each stage in order, from the previous one's weights; a finished stage is loaded, not redone."""
    manifests = stage_manifests(ctx.recipe, stages, inputs.teacher.identity())
    reports = []
    for i, (stage, manifest) in enumerate(zip(stages, manifests, strict=True)):
        folder = ctx.workspace.stage(stage.name)
        if is_complete(folder):
            manifest.check(folder, RESTART)
            ctx.reporter.message(f"stage {stage.name}: done before, loading {folder}")
            model, _ = load_llava(str(folder), what=f"stage {stage.name}", device=str(ctx.device))
            model = trainable_student(model, ctx.recipe, ctx.device)
            reports.append(read_json(folder / "metrics.json"))
            continue
        teacher = inputs.teacher_for(stage)
        dataset = inputs.dataset(stage, processor)
        job = ctx.job(
            stage.name,
            stage,
            i,
            model,
            processor,
            teacher,
            dataset,
            ctx.recipe.student.gradient_checkpointing,
        )
        res = run_stage(job, ctx.reporter)
        model = res.model
        metrics: dict[str, Any] = {
            "stage": stage.name,
            "kind": stage.kind,
            "steps": res.steps,
            "seconds": round(res.seconds, 2),
            "tokens_per_s": round(res.tokens_per_s, 1),
            "last_losses": res.last_terms,
            "bad_samples": res.bad_samples,
            **offline_facts(stage, teacher, dataset.path),
        }
        if evaluate_all or i == len(stages) - 1:
            metrics["eval"] = ctx.evaluate(model, processor, stage.name)
        ctx.save(folder, model, processor, metrics, {IDENTITY_FILE: manifest.record()}, job.state_dir)
        reports.append(metrics)
    return model, reports


def finish(ctx: RunContext, teacher: TeacherSlot, last: StageConfig, model, stage_reports, seconds: float):
    """Copy the last stage to student/, drop step states, write the report and the loss curve."""
    ws = ctx.workspace
    if ws.student.exists():
        shutil.rmtree(ws.student)
    with atomic_dir(ws.student) as tmp:
        for f in ws.stage(last.name).iterdir():
            shutil.copy2(f, tmp / f.name)
    shutil.rmtree(ws.states, ignore_errors=True)
    report = build_report(
        name=ctx.recipe.run.name,
        root=ws.root,
        teacher_info=teacher.info,
        teacher_metrics=teacher.metrics,
        teacher_dir=teacher.folder if teacher.trained else None,
        student=model,
        student_dir=ws.student,
        stage_reports=stage_reports,
        seconds=seconds,
        device=str(ctx.device),
    )
    write_json(ws.report, report)
    facts = card_facts(ctx.recipe, report, ws.student, default_export_dir(ws.student))
    write_card(ws.student, facts)
    write_json(ws.student / CARD_FACTS, asdict(facts))  # what the export's card starts from
    try:
        plot_losses(ws.log, ws.loss_curve)
    except Exception as e:  # a plot is a nicety; never lose a finished run over it
        ctx.reporter.message(f"[yellow]loss curve not drawn: {e}[/yellow]")
    return report
