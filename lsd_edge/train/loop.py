"""The one stage loop: `run_stage(job)` trains one stage (pt, dpt, sft or dft) of teacher or student.

`prepare_stage` builds everything the loop needs (trainable groups, latent projections, optimizer,
schedule, prepared by the run's training backend (`lsd_edge.train.backends`), the data stream and
its worker loader) and restores a resume state; the loop then takes a step's micro-batches from the
one global sample stream and, for each, runs the backend's prepared module (its forward is the
objective, `lsd_edge.distill.objective`) and the backend's backward; the backend clips and steps,
and the loop logs every step to log.jsonl and the trackers and saves a resume state every
`run.checkpoint_every` steps. The loop never asks which engine trains: that is the backend's.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lsd_edge.data.batch import Batch
from lsd_edge.data.dataset import LlavaDataset
from lsd_edge.data.loading import SlotReader, SlotSampler
from lsd_edge.data.records import BadSampleLog
from lsd_edge.data.sampling import IndexStream
from lsd_edge.distill.objective import TERMS, Counts
from lsd_edge.distill.onpolicy import Rollout
from lsd_edge.distill.teacher import OnlineTeacher, Teacher
from lsd_edge.errors import LsdEdgeError, TrainingError
from lsd_edge.models.groups import set_activation_checkpointing
from lsd_edge.models.info import ModelShape
from lsd_edge.progress import Reporter
from lsd_edge.recipe.schema import DISTILL_TERMS, RunConfig, StageConfig
from lsd_edge.train import track
from lsd_edge.train.backends.base import Backend, Prepared, pad_batch
from lsd_edge.train.distributed import Dist
from lsd_edge.train.setup import total_steps
from lsd_edge.train.state import TrainingProgress, has_state
from lsd_edge.train.step import Stepper, prepare_student
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
    backend: Backend = field(default_factory=Backend)  # the run's engine (one process by default)
    checkpointing: bool = False  # activation checkpointing for the whole run (the model's setting)
    num_workers: int = 0  # DataLoader workers decoding micro-batches (0: decoded in this process)

    @property
    def dist(self) -> Dist:
        return self.backend.dist

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
    model: Any = None  # the trained student, plain (gathered from its shards under FSDP2)


@dataclass
class StageSetup:
    """What the loop works with, made by `prepare_stage`."""

    stepper: Stepper
    steps: int
    stream: IndexStream
    reader: SlotReader | None
    bad: BadSampleLog
    checkpointing: bool
    shapes: tuple[ModelShape, ModelShape | None] | None = None  # student, online teacher: for MFU
    rollout: Rollout | None = None  # writes the student's own answers (a stage with on_policy)
    step: int = 0
    position: int = 0

    @property
    def prepared(self) -> Prepared:
        return self.stepper.prepared

    @property
    def teacher(self) -> Teacher | None:
        return self.stepper.teacher


def open_reader(job: StageJob, s: StageSetup) -> SlotReader:
    """This process's micro-batches from stream position `s.position` on, decoded by workers."""
    stage, dist = job.stage, job.dist
    per_step = stage.grad_accum * stage.batch_size
    sampler = SlotSampler(
        s.stream, s.position, stage.batch_size, per_step, dist.micro_batches(stage.grad_accum)
    )
    pad_id = job.processor.tokenizer.pad_token_id
    pin = job.device.type == "cuda"
    return SlotReader(job.dataset, pad_id, job.bad_samples, sampler, s.bad, job.num_workers, pin)


def prepare_stage(job: StageJob, reporter: Reporter) -> StageSetup:
    """Trainable groups, latent projections, optimizer and schedule (prepared by the backend), data
    stream and loader; then the stage's newest resume state, if it has one (a state exists only for
    a stage cut short), loaded into the prepared objects."""
    stage, model = job.stage, job.model
    checkpointing = job.checkpointing or stage.gradient_checkpointing
    teacher = job.teacher if stage.distills else None
    steps = total_steps(stage, len(job.dataset))
    prepared = prepare_student(
        job.backend,
        model,
        teacher,
        stage,
        steps=steps,
        seed=job.run.seed * 7919 + job.index,
        device=job.device,
        precision=job.run.precision,
        checkpointing=checkpointing,
    )
    pad = pad_batch(job.processor.tokenizer.pad_token_id, job.device)
    vocab_rows = len(job.processor.tokenizer)
    s = StageSetup(
        stepper=Stepper(
            job.backend, prepared, stage, teacher, vocab_rows, pad, job.device, job.run.precision
        ),
        steps=steps,
        stream=IndexStream(len(job.dataset), job.run.seed * 31 + job.index),
        reader=None,
        bad=BadSampleLog(),
        checkpointing=checkpointing,
        shapes=flop_shapes(model, teacher, job.device),
        rollout=make_rollout(job, prepared),
    )
    found = TrainingProgress.load(job.state_dir)
    if found is not None:
        progress, folder = found
        progress.restore(folder, job.backend, s.prepared)
        if job.dist.main:  # the bad-sample counts (all processes') are carried on by rank 0 only
            s.bad.update(progress.bad)
        s.step, s.position = progress.step, progress.position
        reporter.message(f"[dim]{job.key}: resuming at step {progress.step}/{steps}[/dim]")
    s.reader = open_reader(job, s)
    return s


def make_rollout(job: StageJob, prepared: Prepared) -> Rollout | None:
    """What writes the student's answers in a stage with `on_policy` (None: a stage without)."""
    if job.stage.on_policy is None:
        return None
    student = job.backend.generating_student(prepared)
    return Rollout(
        student, job.processor, job.dataset, job.stage.on_policy, job.run.seed, job.index, job.device
    )


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
    """This process's micro-batches of the next step (see `lsd_edge.data.loading`), on its device;
    None marks a slot with nothing to run (all bad, or past the end of the step when processes do
    not divide grad_accum)."""
    pinned = job.device.type == "cuda"
    return [None if b is None else b.to(job.device, non_blocking=pinned) for b in s.reader.step()]


def global_counts(batches: list[Batch], n_img_tokens: int, dist: Dist, device) -> Counts:
    c = Counts.of(batches, n_img_tokens)
    if not dist.active:
        return c
    return Counts(*(int(v) for v in dist.sum_floats(c.as_list(), device)))


def merged_bad(dist: Dist, bad: BadSampleLog) -> BadSampleLog:
    """Bad samples met by all processes (each process sees only its own micro-batches)."""
    return BadSampleLog.merged(dist.gather(bad.as_dict()))


def flop_shapes(model, teacher: Teacher | None, device: torch.device):
    """The model shapes the step's FLOP count reads, where an MFU can be given (a known GPU)."""
    if track.device_peak_tflops(device) is None:
        return None
    online = teacher.model.config if isinstance(teacher, OnlineTeacher) else None
    return ModelShape.of(model.config), None if online is None else ModelShape.of(online)


def step_mfu(job: StageJob, s: StageSetup, counts: Counts, seconds: float) -> float | None:
    if s.shapes is None:
        return None
    seq_len = counts.tokens / (job.stage.grad_accum * job.stage.batch_size)
    flops = track.step_flops(*s.shapes, job.stage, counts.tokens, seq_len)
    return track.mfu(flops / max(seconds, 1e-9), job.device, job.dist.world)


def check_finite(job: StageJob, sums: dict[str, float], step: int) -> None:
    for name in TERMS:
        if not math.isfinite(sums[name]):
            where = job.state_dir if has_state(job.state_dir) else "the previous stage's folder"
            raise TrainingError(
                f"{job.key} step {step + 1}: loss term '{name}' is {sums[name]}; the last good "
                f"checkpoint is kept ({where}); lower stages.lr or check the data"
            )


def run_stage(job: StageJob, reporter: Reporter) -> StageResult:
    stage, dist = job.stage, job.dist
    s = prepare_stage(job, reporter)
    p = s.prepared
    if dist.main:
        truncate_log(job.workspace.log, job.key, s.step)
    weights = {t: stage.loss.weight(t) for t in DISTILL_TERMS}
    n_img_tokens = job.dataset.encoder.n_image_tokens
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
            t_roll = time.perf_counter()
            if s.rollout is not None:  # some micro-batches' answers become the student's own
                slots = s.rollout.apply(slots, s.step, dist.micro_batches(stage.grad_accum))
            t_roll = time.perf_counter() - t_roll
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
            sums = s.stepper.accumulate(slots, counts, lam)
            check_finite(job, sums, s.step)
            s.stepper.update()
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
                "lr": p.scheduler.get_last_lr()[0],
                "tokens": counts.tokens,
                "tokens_per_s": tok_s,
                "seconds": dt,
            }
            if s.rollout is not None:  # the student's answer positions (all processes'), and its writing time
                rec.update(own_answers=counts.response - counts.labelled, rollout_s=t_roll)
            if log is not None:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            track.log_step(job.backend.accelerator, rec, step_mfu(job, s, counts, dt))
            if s.step == 1 or s.step % job.run.log_every == 0 or s.step == s.steps:
                info = " ".join(f"{k}={v:.3f}" for k, v in last.items()) + f" {tok_s:,.0f} tok/s"
            reporter.advance(1, info)
            if job.run.checkpoint_every and s.step % job.run.checkpoint_every == 0 and s.step < s.steps:
                bad_now = merged_bad(dist, s.bad).as_dict()
                progress = TrainingProgress.capture(s.step, s.position, p.scheduler, bad_now)
                progress.save(job.state_dir, job.backend, p)
    finally:
        if log is not None:
            log.close()
        s.reader.close()
        reporter.done()
    model = job.backend.plain_student(p, job.device)
    job.backend.release()
    if s.checkpointing:
        set_activation_checkpointing(model, False)
    model.eval()
    seconds = time.perf_counter() - started
    bad_all = merged_bad(dist, s.bad)
    line = bad_all.report()
    if line:
        reporter.message(f"[yellow]{job.key}: {line}[/yellow]")
    tok_s = tokens_seen / max(seconds, 1e-9)
    return StageResult(job.key, s.steps, seconds, last, bad_all.as_dict(), tok_s, model)
