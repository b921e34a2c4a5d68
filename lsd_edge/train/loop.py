"""The one stage loop: `run_stage(job)` trains one stage (pt, dpt, sft or dft) of teacher or student.

`prepare_stage` builds everything the loop needs (trainable groups, latent projections, optimizer,
schedule, the data stream and loader) and restores a resume state; the loop then takes a step's
micro-batches from the one global sample stream, runs the objective (`lsd_edge.distill.objective`)
on this process's share, sums losses and gradients over processes, steps, logs every step to
log.jsonl, and saves a resume state every `run.checkpoint_every` steps.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lsd_edge.data.dataset import Batch, BatchLoader, LlavaDataset
from lsd_edge.data.records import BadSampleLog
from lsd_edge.data.sampling import IndexStream
from lsd_edge.distill.objective import TERMS, Counts, LatentProjector, loss_terms, weighted_total
from lsd_edge.distill.teacher import Teacher
from lsd_edge.errors import LsdEdgeError, TrainingError
from lsd_edge.models.groups import set_activation_checkpointing, set_trainable
from lsd_edge.progress import Reporter
from lsd_edge.recipe.schema import DISTILL_TERMS, RunConfig, StageConfig
from lsd_edge.train.distributed import SINGLE, Dist
from lsd_edge.train.setup import autocast, make_optimizer, total_steps
from lsd_edge.train.state import TrainingProgress, latest_step_state
from lsd_edge.workspace import Workspace


@dataclass
class StageJob:
    """One stage to run. `key` names it in logs and resume states ("dft", "teacher/pt"); `index`
    seeds its data order and latent projections; `run` and `bad_samples` are the recipe's."""

    key: str
    stage: StageConfig
    index: int
    model: Any
    processor: Any
    teacher: Teacher | None
    dataset: LlavaDataset
    run: RunConfig
    bad_samples: str
    workspace: Workspace
    device: torch.device
    dist: Dist = SINGLE
    checkpointing: bool = False  # activation checkpointing for the whole run (the model's setting)

    @property
    def state_dir(self) -> Path:
        return self.workspace.state(self.key.replace("/", "-"))


@dataclass
class StageResult:
    name: str
    steps: int
    seconds: float
    last_terms: dict[str, float]
    bad_samples: dict[str, Any]
    tokens_per_s: float


@dataclass
class StageSetup:
    """What the loop works with, made by `prepare_stage`."""

    teacher: Teacher | None
    latent: LatentProjector | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list[torch.nn.Parameter]
    steps: int
    stream: IndexStream
    loader: BatchLoader
    bad: BadSampleLog
    vocab_rows: int
    checkpointing: bool
    step: int = 0
    position: int = 0


def prepare_stage(job: StageJob, reporter: Reporter) -> StageSetup:
    """Trainable groups, latent projections, optimizer and schedule, data stream and loader; then the
    stage's newest resume state, if it has one (a state exists only for a stage cut short)."""
    stage, model = job.stage, job.model
    set_trainable(model, stage.trainable)
    model.train()
    checkpointing = job.checkpointing or stage.gradient_checkpointing
    if checkpointing:
        set_activation_checkpointing(model, True)
    teacher = job.teacher if stage.distills else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.run.seed * 7919 + job.index)
        latent = None
        if teacher is not None and stage.loss.weight("latent") > 0:
            latent = LatentProjector(
                stage.loss.latent_pairs, model.config.text_config.hidden_size, teacher.hidden_size
            ).to(job.device)
    steps = total_steps(stage, len(job.dataset))
    optimizer, scheduler, params = make_optimizer(model, latent, stage, steps)
    bad = BadSampleLog()
    setup = StageSetup(
        teacher=teacher,
        latent=latent,
        optimizer=optimizer,
        scheduler=scheduler,
        params=params,
        steps=steps,
        stream=IndexStream(len(job.dataset), job.run.seed * 31 + job.index),
        loader=BatchLoader(job.dataset, job.processor.tokenizer.pad_token_id, job.bad_samples, bad),
        bad=bad,
        vocab_rows=len(job.processor.tokenizer),
        checkpointing=checkpointing,
    )
    progress = TrainingProgress.load(job.state_dir)
    if progress is not None:
        progress.restore(model, latent, optimizer, scheduler, bad, job.dist.main)
        setup.step, setup.position = progress.step, progress.position
        reporter.message(f"[dim]{job.key}: resuming at step {progress.step}/{steps}[/dim]")
    return setup


def truncate_log(log_path: Path, key: str, step: int) -> None:
    """Drop log lines of this stage after `step` (they will be written again on resume)."""
    if not log_path.is_file():
        return
    keep = []
    for line in log_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if rec.get("stage") == key and rec.get("step", 0) > step:
            continue
        keep.append(line)
    tmp = log_path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, log_path)


def step_batches(job: StageJob, s: StageSetup) -> list[Batch | None]:
    """This process's micro-batches of the step whose samples start at stream position `s.position`.

    Micro-batch k of a step holds samples [position + k*B, position + (k+1)*B) of the one global
    stream, whichever process runs it; None marks a slot with nothing to run (all bad, or past the
    end of the step when processes do not divide grad_accum)."""
    per_micro = job.stage.batch_size
    out: list[Batch | None] = []
    for k in job.dist.micro_batches(job.stage.grad_accum):
        b = None if k is None else s.loader.batch(s.stream.take(s.position + k * per_micro, per_micro))
        out.append(None if b is None else b.to(job.device))
    return out


def global_counts(batches: list[Batch], n_img_tokens: int, dist: Dist, device) -> Counts:
    c = Counts.of(batches, n_img_tokens)
    if not dist.active:
        return c
    return Counts(*(int(v) for v in dist.sum_floats([c.response, c.visual, c.images, c.tokens], device)))


def merged_bad(dist: Dist, bad: BadSampleLog) -> BadSampleLog:
    """Bad samples met by all processes (each process sees only its own micro-batches)."""
    return BadSampleLog.merged(dist.gather(bad.as_dict()))


def accumulate(job: StageJob, s: StageSetup, slots: list[Batch | None], counts: Counts, lam: float):
    """Forward and backward of this process's micro-batches of one step; the loss terms' sums."""
    sums = {t: 0.0 for t in TERMS}
    for b in slots:
        if b is None:
            if s.teacher is not None:
                s.teacher.idle(job.device)
            continue
        with autocast(job.device, job.run.precision):
            terms = loss_terms(job.model, s.teacher, b, job.stage, counts, s.vocab_rows, s.latent)
        total = weighted_total(terms, job.stage, lam)
        for name, value in terms.items():
            sums[name] += float(value.detach())
        if total.requires_grad:  # a projector-only stage on a text-only batch has nothing to learn
            total.backward()
    if job.dist.active:
        sums = dict(zip(TERMS, job.dist.sum_floats([sums[t] for t in TERMS], job.device), strict=True))
    return sums


def check_finite(job: StageJob, sums: dict[str, float], step: int) -> None:
    for name in TERMS:
        if not math.isfinite(sums[name]):
            where = job.state_dir if latest_step_state(job.state_dir) else "the previous stage's folder"
            raise TrainingError(
                f"{job.key} step {step + 1}: loss term '{name}' is {sums[name]}; the last good "
                f"checkpoint is kept ({where}); lower stages.lr or check the data"
            )


def run_stage(job: StageJob, reporter: Reporter) -> StageResult:
    stage, dist = job.stage, job.dist
    s = prepare_stage(job, reporter)
    if dist.main:
        truncate_log(job.workspace.log, job.key, s.step)
    weights = {t: stage.loss.weight(t) for t in DISTILL_TERMS}
    n_img_tokens = s.loader.dataset.encoder.n_image_tokens
    reporter.task(job.key, s.steps)
    reporter.advance(s.step)
    started = time.perf_counter()
    tokens_seen = 0
    last: dict[str, float] = {}
    info = ""
    unusable = 0  # samples in a row that were all skipped
    log = job.workspace.log.open("a", encoding="utf-8") if dist.main else None
    try:
        while s.step < s.steps:
            t0 = time.perf_counter()
            slots, error = [], None
            try:
                slots = step_batches(job, s)
            except LsdEdgeError as e:  # a bad sample under bad_samples = 'error'
                error = e
            dist.raise_together(error)
            s.position += stage.grad_accum * stage.batch_size
            counts = global_counts([b for b in slots if b is not None], n_img_tokens, dist, job.device)
            if counts.tokens == 0:  # every sample of the step was skipped: take the next ones
                unusable += stage.grad_accum * stage.batch_size
                if unusable >= len(job.dataset):
                    raise TrainingError(
                        f"{job.key}: no usable sample in {unusable} samples in a row of "
                        f"{job.dataset.path} ({merged_bad(dist, s.bad).summary()}); "
                        "check the data"
                    )
                continue
            unusable = 0
            lam = stage.distill_schedule.factor(s.step, s.steps)
            sums = accumulate(job, s, slots, counts, lam)
            check_finite(job, sums, s.step)
            dist.sum_gradients(s.params)
            if stage.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(s.params, stage.max_grad_norm)
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
            s.scheduler.step()
            s.step += 1
            dt = time.perf_counter() - t0
            tokens_seen += counts.tokens
            tok_s = counts.tokens / max(dt, 1e-9)
            last = {t: sums[t] for t in TERMS if t == "ce" or weights.get(t, 0) > 0 and s.teacher is not None}
            total_loss = stage.loss.ce * sums["ce"] + lam * sum(weights[t] * sums[t] for t in DISTILL_TERMS)
            rec = {
                "stage": job.key,
                "step": s.step,
                "loss": total_loss,
                **last,
                "lambda": lam,
                "lr": s.scheduler.get_last_lr()[0],
                "tokens": counts.tokens,
                "tokens_per_s": tok_s,
            }
            if log is not None:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if s.step == 1 or s.step % job.run.log_every == 0 or s.step == s.steps:
                info = " ".join(f"{k}={v:.3f}" for k, v in last.items()) + f" {tok_s:,.0f} tok/s"
            reporter.advance(1, info)
            if job.run.checkpoint_every and s.step % job.run.checkpoint_every == 0 and s.step < s.steps:
                bad_now = merged_bad(dist, s.bad).as_dict()
                if dist.main:
                    TrainingProgress.capture(
                        s.step, s.position, job.model, s.latent, s.optimizer, s.scheduler, bad_now
                    ).save(job.state_dir)
    finally:
        if log is not None:
            log.close()
        reporter.done()
    if s.checkpointing:
        set_activation_checkpointing(job.model, False)
    job.model.eval()
    seconds = time.perf_counter() - started
    bad_all = merged_bad(dist, s.bad)
    line = bad_all.report()
    if line:
        reporter.message(f"[yellow]{job.key}: {line}[/yellow]")
    return StageResult(job.key, s.steps, seconds, last, bad_all.as_dict(), tokens_seen / max(seconds, 1e-9))
