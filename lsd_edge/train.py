"""The stages of METHOD.md: one stage loop (`run_stage`) and `distill(recipe)` that chains them.

`distill` prepares the data, gets the teacher (training and caching it first for the embedded
default), builds the student, checks the tokenizers, then runs the recipe's stages in order, each
from the previous stage's weights. After every stage the eval split is scored and an HF checkpoint
folder is written; mid-stage step states make `--resume` exact. The loss step (`loss_terms`) is
separate from the loop, so every formula can be traced to `losses.py`.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lsd_edge import losses
from lsd_edge.checkpoint import (
    atomic_dir,
    files_hash,
    fingerprint,
    is_complete,
    latest_step_state,
    read_json,
    rng_state,
    save_checkpoint,
    save_step_state,
    set_rng_state,
    write_json,
)
from lsd_edge.config import DISTILL_TERMS, DISTILLING_KINDS, Recipe, StageConfig
from lsd_edge.data.llava import IGNORE_INDEX, BadSampleLog, Batch, BatchLoader, LlavaDataset
from lsd_edge.distributed import SINGLE, Dist, idle_forward, resolve_device, setup, shard_decoder_layers
from lsd_edge.errors import DataError, LsdEdgeError, TrainingError
from lsd_edge.models import (
    build_tiny_model,
    build_tiny_processor,
    check_tokenizers,
    compile_layers,
    compose_llava,
    count_params,
    dir_size_mb,
    eager,
    group_modules,
    load_llava,
    model_folder,
    set_activation_checkpointing,
    set_trainable,
    torch_dtype,
)
from lsd_edge.progress import QuietReporter, Reporter
from lsd_edge.regenerate import regenerate
from lsd_edge.teacher_cache import TeacherCache, build_cache, needed_parts

TERMS = ("ce",) + DISTILL_TERMS


# ------------------------------------------------------------------------------------------ environment


def autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# -------------------------------------------------------------------------------------------- data side


def prepare_data(recipe: Recipe, reporter: Reporter) -> None:
    """Generate ShapesVQA into data.root when the recipe asks for it and the files are missing."""
    shapes = recipe.data.shapes
    if shapes is None:
        return
    root = Path(recipe.data.root)
    from lsd_edge.data.shapes import FORMAT, generate

    marker = root / "shapes.json"
    wanted = shapes.model_dump() | {"format": FORMAT}
    if marker.is_file():
        have = read_json(marker)
        differ = [f"{k} = {have.get(k)!r}, not {v!r}" for k, v in wanted.items() if have.get(k) != v]
        if not differ:
            return
        raise LsdEdgeError(
            f"{root} holds ShapesVQA made with other settings ({'; '.join(differ)}); "
            "delete it or point data.root elsewhere"
        )
    if root.exists() and any(root.iterdir()):
        raise LsdEdgeError(
            f"data.root {root} holds files not made by ShapesVQA; point data.root to a new folder, "
            "or remove [data.shapes] to use the files there"
        )
    reporter.task("ShapesVQA", shapes.n_train + shapes.n_eval)
    last = [0]

    def tick(done, total):
        reporter.advance(done - last[0])
        last[0] = done

    with atomic_dir(root) as tmp:
        generate(
            tmp,
            seed=shapes.seed,
            n_train=shapes.n_train,
            n_eval=shapes.n_eval,
            image_size=shapes.image_size,
            questions_per_image=shapes.questions_per_image,
            progress=tick,
            jitter=shapes.jitter,
        )
        # The summary names the temporary folder; point it at the final one.
        summary = read_json(tmp / "shapes.json")
        summary["out_dir"] = str(root)
        write_json(tmp / "shapes.json", summary)
    reporter.done()


def corpus_words(recipe: Recipe) -> list[str]:
    """The words of every configured data file, for a tiny model's word-level tokenizer."""
    import re

    from lsd_edge.data.llava import read_records

    words: set[str] = set()
    for name in ("pretrain", "instruct", "eval"):
        ds = getattr(recipe.data, name)
        if ds is None:
            continue
        path, _ = recipe.data.resolve(ds)
        for rec in read_records(path):
            for turn in rec.get("conversations", []):
                text = str(turn.get("value", "")).replace("<image>", " ")
                words.update(re.findall(r"\w+|[^\w\s]+", text))
    return sorted(words)


def open_dataset(
    recipe: Recipe, stage: StageConfig, processor, data: tuple[Path, Path | None] | None = None
) -> LlavaDataset:
    """The stage's data set; `data` (JSON, image folder) replaces the recipe's file (regenerated data)."""
    path, images = data or recipe.data.resolve(recipe.data.dataset(stage.data))
    return LlavaDataset(
        path,
        images,
        processor,
        max_length=recipe.data.max_length,
        max_samples=stage.max_samples,
        max_turns=stage.max_turns,
    )


class IndexStream:
    """An endless stream of sample indices: epoch e is a permutation seeded by (seed, e).

    A stream position is a plain integer, so the data position of a resume state is one number.
    """

    def __init__(self, n: int, seed: int):
        self.n = n
        self.seed = seed
        self._perm: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def take(self, position: int, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            epoch, offset = divmod(position, self.n)
            chunk = self._permutation(epoch)[offset : offset + count - len(out)].tolist()
            out += chunk
            position += len(chunk)
        return out


# ----------------------------------------------------------------------------------------------- losses


@dataclass
class Forward:
    """What the losses need from one model's forward pass."""

    hidden: torch.Tensor  # (B, T, D) last hidden state (after the final norm)
    hidden_states: tuple[torch.Tensor, ...] | None  # per layer, 0 = embeddings, -1 = final
    image_features: torch.Tensor | None  # (I, K, D) projector output


def forward(model, batch: Batch, hidden_states: bool = False) -> Forward:
    out = model.model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=None if batch.pixel_values is None else batch.pixel_values.to(model.dtype),
        output_hidden_states=hidden_states,
        use_cache=False,  # training: a KV cache would only hold memory
        return_dict=True,
    )
    feats = None
    if out.image_outputs is not None:
        feats = torch.stack(list(out.image_outputs.pooler_output))
    return Forward(out.last_hidden_state, out.hidden_states if hidden_states else None, feats)


@dataclass
class Counts:
    """Valid items in a whole accumulated batch: the denominators of every term."""

    response: int = 0
    visual: int = 0
    images: int = 0
    tokens: int = 0

    @staticmethod
    def of(batches: list[Batch], n_image_tokens: int) -> Counts:
        c = Counts()
        for b in batches:
            c.response += int((b.labels[:, 1:] != IGNORE_INDEX).sum())
            c.visual += int(b.visual_mask.sum())
            c.images += int(b.visual_mask.sum()) // max(1, n_image_tokens)
            c.tokens += b.n_tokens
        return c


class LatentProjector(nn.Module):
    """Trainable linear maps from student hidden size to teacher hidden size, one per latent pair.

    Part of training only: never saved with the student (METHOD.md)."""

    def __init__(self, pairs, student_dim: int, teacher_dim: int):
        super().__init__()
        self.pairs = [tuple(p) for p in pairs]
        self.maps = nn.ModuleList(nn.Linear(student_dim, teacher_dim) for _ in self.pairs)


def output_weight(model) -> torch.Tensor:
    """The lm_head weight (V, D) the chunked losses multiply by themselves."""
    head = model.lm_head
    if getattr(head, "bias", None) is not None:
        raise TrainingError("loss.chunk_size: this model's lm_head has a bias; set chunk_size = 0")
    return head.weight


def online_targets(teacher, batch: Batch, need_hidden: bool) -> losses.TeacherTargets:
    """The teacher side of a micro-batch from a forward pass of the teacher (no graph)."""
    with torch.no_grad():
        t = forward(teacher, batch, hidden_states=need_hidden)
    resp = batch.labels[:, 1:] != IGNORE_INDEX
    vis = batch.visual_mask
    weight = teacher.lm_head.weight
    n_img = t.image_features.shape[0] if t.image_features is not None else 0
    return losses.TeacherTargets(
        response=losses.DenseTargets(t.hidden[:, :-1][resp], weight),
        visual=losses.DenseTargets(t.hidden[vis], weight),
        visual_tokens=t.hidden[vis].view(n_img, -1, t.hidden.shape[-1]),
        image_features=t.image_features,
        hidden_states=t.hidden_states,
    )


def teacher_targets(teacher, batch: Batch, need_hidden: bool) -> losses.TeacherTargets:
    """From the teacher model run now, or from a teacher cache (anything with `targets(batch)`)."""
    if isinstance(teacher, nn.Module):
        return online_targets(teacher, batch, need_hidden)
    return teacher.targets(batch)


def teacher_width(teacher) -> int:
    if isinstance(teacher, nn.Module):
        return teacher.config.text_config.hidden_size
    return teacher.teacher_hidden


def logit_sums(student, hidden, lc, vocab_rows, *, targets=None, teacher=None):
    """(CE sum, KD sum) at gathered positions: hidden (N, Ds), targets (N,) for CE, `teacher` targets
    for KD; whole logits, or `lc.chunk_size` positions at a time (same values and gradients)."""
    kl = dict(
        kind=lc.kl,
        temperature=lc.temperature,
        jsd_beta=lc.jsd_beta,
        skew_lambda=lc.skew_lambda,
        vocab_rows=vocab_rows,
    )
    if lc.chunk_size:
        return losses.chunked_logit_sums(
            hidden, output_weight(student), targets=targets, teacher=teacher, chunk=lc.chunk_size, **kl
        )
    logits = student.lm_head(hidden)  # (N, Vs)
    ce = None if targets is None else losses.cross_entropy_sum(logits, targets, vocab_rows)
    kd = None if teacher is None else losses.divergence_sum(logits, teacher, **kl)
    return ce, kd


def loss_terms(
    student,
    teacher,
    batch: Batch,
    stage: StageConfig,
    counts: Counts,
    vocab_rows: int,
    latent: LatentProjector | None,
) -> dict[str, torch.Tensor]:
    """Every loss term of one micro-batch, each normalised by its count in the accumulated batch.

    L = ce*L_reg + lambda * (alpha*L_res + beta*L_vis + gamma*L_rel + delta*L_lat); the weights are
    applied by the caller. Terms with weight 0 are not computed. `teacher` is the teacher model or a
    teacher cache.
    """
    lc = stage.loss
    w = {t: lc.weight(t) for t in DISTILL_TERMS}
    need_teacher = teacher is not None and stage.distills
    need_hidden = need_teacher and w["latent"] > 0 and any(isinstance(p[0], int) for p in lc.latent_pairs)
    s = forward(student, batch, hidden_states=need_hidden)
    resp = batch.labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts token t+1
    s_resp_h = s.hidden[:, :-1][resp]  # (N, Ds)
    targets = batch.labels[:, 1:][resp]  # (N,)
    t = teacher_targets(teacher, batch, need_hidden) if need_teacher else None
    ce, kd = logit_sums(
        student,
        s_resp_h,
        lc,
        vocab_rows,
        targets=targets,
        teacher=t.response if t is not None and w["response_kl"] > 0 else None,
    )
    terms: dict[str, torch.Tensor] = {"ce": ce / max(1, counts.response)}
    if t is None:
        return terms
    if kd is not None:
        terms["response_kl"] = kd / max(1, counts.response)
    vis = batch.visual_mask
    if w["visual_kl"] > 0 and counts.visual > 0:
        _, kd = logit_sums(student, s.hidden[vis], lc, vocab_rows, teacher=t.visual)
        terms["visual_kl"] = kd / max(1, counts.visual)
    if w["relation"] > 0 and counts.images > 0:
        n_img = s.image_features.shape[0] if s.image_features is not None else 0
        sv = s.hidden[vis].view(n_img, -1, s.hidden.shape[-1])
        if t.relation is not None:
            rel = losses.relation_sum_to(sv, t.relation)
        else:
            rel = losses.relation_sum(sv, t.visual_tokens)
        terms["relation"] = rel / max(1, counts.images)
    if w["latent"] > 0 and latent is not None:
        total = s.hidden.new_zeros(())
        valid = batch.attention_mask.bool()
        for proj, (ls, lt) in zip(latent.maps, latent.pairs, strict=True):
            if ls == "projector":
                if s.image_features is None:
                    continue
                sx = s.image_features.flatten(0, 1)
                tx = t.image_features.flatten(0, 1)
                denom = max(1, counts.visual)
            else:
                sx = s.hidden_states[ls][valid]
                tx = t.hidden_states[lt][valid]
                denom = max(1, counts.tokens)
            total = total + losses.latent_sum(proj(sx.float()), tx.float(), lc.latent_kind) / denom
        terms["latent"] = total / len(latent.pairs)
    return terms


def weighted_total(terms: dict[str, torch.Tensor], stage: StageConfig, lam: float) -> torch.Tensor:
    """L = ce*L_reg + lambda * sum(weight * term) over the distillation terms present."""
    total = stage.loss.ce * terms["ce"]
    for t in DISTILL_TERMS:
        if t in terms:
            total = total + lam * stage.loss.weight(t) * terms[t]
    return total


# ------------------------------------------------------------------------------------------- stage loop


def lr_lambda(stage: StageConfig, total_steps: int):
    warm = stage.warmup_steps or math.ceil(stage.warmup_ratio * total_steps)

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if stage.schedule == "constant":
            return 1.0
        frac = (step - warm) / max(1, total_steps - warm)
        frac = min(1.0, max(0.0, frac))
        decay = 0.5 * (1 + math.cos(math.pi * frac)) if stage.schedule == "cosine" else 1.0 - frac
        return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * decay

    return f


def total_steps(stage: StageConfig, n_samples: int) -> int:
    if stage.max_steps is not None:
        return stage.max_steps
    per_step = stage.batch_size * stage.grad_accum
    return max(1, math.ceil(stage.epochs * n_samples / per_step))


@dataclass
class StageResult:
    name: str
    steps: int
    seconds: float
    last_terms: dict[str, float]
    bad_samples: dict[str, Any]
    tokens_per_s: float


@dataclass
class StageJob:
    """Everything one stage needs; `key` names it in logs and resume states."""

    key: str
    stage: StageConfig
    index: int
    model: Any
    processor: Any
    teacher: Any
    dataset: LlavaDataset
    state_dir: Path
    seed: int
    device: torch.device
    precision: str
    checkpoint_every: int
    log_every: int
    policy: str
    log_path: Path
    resume: bool
    dist: Dist = SINGLE
    checkpointing: bool = False  # activation checkpointing for the whole run (the model's setting)


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _truncate_log(log_path: Path, key: str, step: int) -> None:
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


def _step_batches(
    job: StageJob, stream: IndexStream, loader: BatchLoader, position: int
) -> list[Batch | None]:
    """This process's micro-batches of the step whose samples start at stream `position`.

    Micro-batch k of a step holds samples [position + k*B, position + (k+1)*B) of the one global
    stream, whichever process runs it; None marks a slot with nothing to run (all bad, or past the
    end of the step when processes do not divide grad_accum)."""
    per_micro = job.stage.batch_size
    out: list[Batch | None] = []
    for k in job.dist.micro_batches(job.stage.grad_accum):
        b = None if k is None else loader.batch(stream.take(position + k * per_micro, per_micro))
        out.append(None if b is None else b.to(job.device))
    return out


def _global_counts(batches: list[Batch], n_img_tokens: int, dist: Dist, device) -> Counts:
    c = Counts.of(batches, n_img_tokens)
    if not dist.active:
        return c
    return Counts(*(int(v) for v in dist.sum_floats([c.response, c.visual, c.images, c.tokens], device)))


def _merged_bad(dist: Dist, bad: BadSampleLog) -> dict[str, Any]:
    """Bad samples met by all processes (each process sees only its own micro-batches)."""
    parts = dist.gather(bad.as_dict())
    if len(parts) == 1:
        return parts[0]
    merged = BadSampleLog()
    for part in parts:
        for kind, n in part["by_reason"].items():
            merged.counts[kind] += n
        for kind, ids in part["examples"].items():
            ex = merged.examples.setdefault(kind, [])
            ex.extend(ids[: max(0, 3 - len(ex))])
    return merged.as_dict()


def _restore(job: StageJob, model, latent, optimizer, scheduler, bad: BadSampleLog, reporter, steps: int):
    """Load the stage's latest step state, if any; returns (step, stream position)."""
    found = latest_step_state(job.state_dir)
    if found is None:
        return 0, 0
    step, payload = found
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in payload["trainable"].items():
            named[n].copy_(v)
    if latent is not None and payload.get("latent") is not None:
        latent.load_state_dict(payload["latent"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"])
    if job.dist.main:  # the saved counts are every process's; one process carries them on
        for kind, n in payload.get("bad", {}).get("by_reason", {}).items():
            bad.counts[kind] = n
        bad.examples.update(payload.get("bad", {}).get("examples", {}))
    reporter.message(f"[dim]{job.key}: resuming at step {step}/{steps}[/dim]")
    return step, payload["position"]


def param_groups(model, latent: nn.Module | None, stage: StageConfig) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: one at stage.lr, or one per model group when the stage
    scales a group's learning rate (`lr_scale`); the latent projections train at stage.lr."""
    extra = [] if latent is None else list(latent.parameters())
    if not stage.lr_scale:
        return [{"params": [p for p in model.parameters() if p.requires_grad] + extra}]
    groups = []
    for name, module in group_modules(model).items():
        own = [p for p in module.parameters() if p.requires_grad]
        if own:
            groups.append({"params": own, "lr": stage.lr * stage.lr_scale.get(name, 1.0)})
    if extra:
        groups.append({"params": extra, "lr": stage.lr})
    grouped = {id(p) for g in groups for p in g["params"]}
    assert all(id(p) in grouped for p in model.parameters() if p.requires_grad), (
        "a trainable parameter outside the groups"
    )
    return groups


def run_stage(job: StageJob, reporter: Reporter) -> StageResult:
    stage = job.stage
    model = job.model
    dist = job.dist
    set_trainable(model, stage.trainable)
    model.train()
    checkpointing = job.checkpointing or stage.gradient_checkpointing
    if checkpointing:
        set_activation_checkpointing(model, True)
    teacher = job.teacher if stage.distills else None
    if isinstance(teacher, nn.Module):
        teacher.eval()
    vocab_rows = len(job.processor.tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.seed * 7919 + job.index)
        latent = None
        if teacher is not None and stage.loss.weight("latent") > 0:
            latent = LatentProjector(
                stage.loss.latent_pairs,
                model.config.text_config.hidden_size,
                teacher_width(teacher),
            ).to(job.device)
    groups = param_groups(model, latent, stage)
    params = [p for g in groups for p in g["params"]]  # every trained parameter, for clipping and sync
    optimizer = torch.optim.AdamW(groups, lr=stage.lr, weight_decay=stage.weight_decay, betas=(0.9, 0.999))
    steps = total_steps(stage, len(job.dataset))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage, steps))
    stream = IndexStream(len(job.dataset), job.seed * 31 + job.index)
    bad = BadSampleLog()
    loader = BatchLoader(job.dataset, job.processor.tokenizer.pad_token_id, job.policy, bad)
    n_img_tokens = loader.dataset.encoder.n_image_tokens
    step, position = 0, 0
    if job.resume:
        step, position = _restore(job, model, latent, optimizer, scheduler, bad, reporter, steps)
    if dist.main:
        _truncate_log(job.log_path, job.key, step)
    weights = {t: stage.loss.weight(t) for t in DISTILL_TERMS}
    reporter.task(job.key, steps)
    reporter.advance(step)
    started = time.perf_counter()
    tokens_seen = 0
    last: dict[str, float] = {}
    idle_teacher = dist.shard_teacher and isinstance(teacher, nn.Module)
    log = job.log_path.open("a", encoding="utf-8") if dist.main else None
    try:
        while step < steps:
            t0 = time.perf_counter()
            slots, error = [], None
            try:
                slots = _step_batches(job, stream, loader, position)
            except LsdEdgeError as e:  # a bad sample under bad_samples = 'error'
                error = e
            dist.raise_together(error)
            position += stage.grad_accum * stage.batch_size
            batches = [b for b in slots if b is not None]
            counts = _global_counts(batches, n_img_tokens, dist, job.device)
            if counts.tokens == 0:
                raise TrainingError(
                    f"{job.key} step {step + 1}: every sample of the batch is bad ({bad.summary()}); check the data"
                )
            lam = stage.distill_schedule.factor(step, steps)
            sums = {t: 0.0 for t in TERMS}
            for b in slots:
                if b is None:
                    if idle_teacher:
                        idle_forward(teacher, job.device)
                    continue
                with autocast(job.device, job.precision):
                    terms = loss_terms(model, teacher, b, stage, counts, vocab_rows, latent)
                total = weighted_total(terms, stage, lam)
                for name, value in terms.items():
                    sums[name] += float(value.detach())
                if total.requires_grad:  # a projector-only stage on a text-only batch has nothing to learn
                    total.backward()
            if dist.active:
                sums = dict(zip(TERMS, dist.sum_floats([sums[t] for t in TERMS], job.device), strict=True))
            for name in TERMS:
                if not math.isfinite(sums[name]):
                    where = (
                        job.state_dir if latest_step_state(job.state_dir) else "the previous stage's folder"
                    )
                    raise TrainingError(
                        f"{job.key} step {step + 1}: loss term '{name}' is {sums[name]}; the last good "
                        f"checkpoint is kept ({where}); lower stages.lr or check the data"
                    )
            dist.sum_gradients(params)
            if stage.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, stage.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            dt = time.perf_counter() - t0
            tokens_seen += counts.tokens
            tok_s = counts.tokens / max(dt, 1e-9)
            last = {t: sums[t] for t in TERMS if t == "ce" or weights.get(t, 0) > 0 and teacher is not None}
            total_loss = stage.loss.ce * sums["ce"] + lam * sum(weights[t] * sums[t] for t in DISTILL_TERMS)
            rec = {
                "stage": job.key,
                "step": step,
                "loss": total_loss,
                **last,
                "lambda": lam,
                "lr": scheduler.get_last_lr()[0],
                "tokens": counts.tokens,
                "tokens_per_s": tok_s,
            }
            if log is not None:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            info = " ".join(f"{k}={v:.3f}" for k, v in last.items()) + f" {tok_s:,.0f} tok/s"
            reporter.advance(1, info)
            if job.checkpoint_every and step % job.checkpoint_every == 0 and step < steps:
                bad_now = _merged_bad(dist, bad)
                if dist.main:
                    save_step_state(
                        job.state_dir,
                        step,
                        {
                            "trainable": _trainable_state(model),
                            "latent": None if latent is None else latent.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "rng": rng_state(),
                            "position": position,
                            "bad": bad_now,
                        },
                    )
    finally:
        if log is not None:
            log.close()
        reporter.done()
    if checkpointing:
        set_activation_checkpointing(model, False)
    model.eval()
    seconds = time.perf_counter() - started
    bad_all = _merged_bad(dist, bad)
    if bad_all["total"]:
        summary = BadSampleLog(Counter(bad_all["by_reason"]), bad_all["examples"]).summary()
        reporter.message(f"[yellow]{job.key}: skipped {bad_all['total']} bad sample(s): {summary}[/yellow]")
    return StageResult(job.key, steps, seconds, last, bad_all, tokens_seen / max(seconds, 1e-9))


# ------------------------------------------------------------------------------------------------ runs


@dataclass
class RunPaths:
    root: Path

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    def stage(self, name: str) -> Path:
        return self.root / name

    def state(self, key: str) -> Path:
        return self.root / "state" / key

    @property
    def teacher_stages(self) -> Path:
        return self.root / "teacher-stages"

    def teacher_cache(self, stage: str) -> Path:
        return self.root / "teacher-cache" / stage

    def regenerated(self, stage: str) -> Path:
        return self.root / "regenerated" / stage

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def log(self) -> Path:
        return self.root / "log.jsonl"

    @property
    def report(self) -> Path:
        return self.root / "report.json"


@dataclass
class DistillOptions:
    resume: bool = False
    restart: bool = False
    teacher_dir: Path | None = None  # a shared teacher (ablation); default <output>/teacher
    stages: list[StageConfig] | None = None  # override the recipe's stages (ablation)
    evaluate_stages: bool = True


@dataclass
class Run:
    """A distillation run in progress: the recipe, where it writes, the models."""

    recipe: Recipe
    paths: RunPaths
    device: torch.device
    reporter: Reporter
    options: DistillOptions
    teacher: Any = None
    processor: Any = None
    student: Any = None
    student_processor: Any = None
    teacher_metrics: dict[str, Any] = field(default_factory=dict)
    dist: Dist = SINGLE
    teacher_info: dict[str, Any] = field(default_factory=dict)  # params, size: kept when it leaves memory
    _teacher_hash: str | None = None
    _stage_data: dict[str, tuple[Path, Path | None]] = field(default_factory=dict)

    # -- evaluation

    def eval_split(self, model, processor, label: str) -> dict[str, Any]:
        from lsd_edge.data.llava import BadSampleLog
        from lsd_edge.evaluate import greedy_answers, load_eval_items, score

        if self.recipe.data.eval is None or not self.dist.main:
            return {}
        path, images = self.recipe.data.resolve(self.recipe.data.eval)
        ev = self.recipe.eval
        log = BadSampleLog()
        items = load_eval_items(path, images, processor, ev.max_samples, log)
        self.reporter.task(f"eval {label}", len(items))
        done = [0]

        def tick(n: int, total: int) -> None:
            self.reporter.advance(n - done[0])
            done[0] = n

        with eager():
            answers = greedy_answers(model, processor, items, ev.max_new_tokens, ev.batch_size, tick)
        result = score(items, answers)
        result.bad_samples = log.as_dict()
        self.reporter.advance(0, f"accuracy {result.accuracy:.3f}")
        self.reporter.done()
        return result.as_dict()

    # -- teacher

    def teacher_fingerprint(self) -> str:
        r = self.recipe
        from lsd_edge.data.shapes import FORMAT

        data = settings(r.data) | ({"shapes_format": FORMAT} if r.data.shapes else {})
        return fingerprint(settings(r.teacher), data, r.run.seed, settings(r.eval))

    def get_teacher(self) -> None:
        """Load (or train and cache) the teacher, frozen in the recipe's teacher dtype; under FSDP its
        decoder layers are then sharded over the processes."""
        self._load_or_train_teacher()
        self.teacher = self.teacher.to(torch_dtype(self.recipe.teacher.dtype, self.device))
        self.teacher.requires_grad_(False).eval()
        if self.dist.shard_teacher:
            n = shard_decoder_layers(self.teacher)
            self.reporter.message(f"teacher: {n} decoder layers sharded over {self.dist.world} processes")

    def _load_or_train_teacher(self) -> None:
        r = self.recipe
        tdir = self.options.teacher_dir or self.paths.teacher
        if r.teacher.tiny is None:
            self.reporter.message(f"loading teacher {r.teacher.path}")
            self.teacher, self.processor = load_llava(
                r.teacher.path,
                what="teacher.path",
                dtype=r.teacher.dtype,
                device=str(self.device),
                trust_remote_code=r.teacher.trust_remote_code,
            )
            return
        fp = self.teacher_fingerprint()
        if is_complete(tdir):
            made = (
                read_json(tdir / "teacher.json").get("fingerprint")
                if (tdir / "teacher.json").is_file()
                else None
            )
            if made != fp:
                raise LsdEdgeError(
                    f"{tdir} holds a teacher trained with other teacher/data settings; delete it to train a new "
                    "one, or set run.output_dir to another folder"
                )
            self.reporter.message(f"reusing the cached teacher in {tdir}")
            self.teacher, self.processor = load_llava(
                str(tdir), what="cached teacher", device=str(self.device)
            )
            self.teacher_metrics = read_json(tdir / "metrics.json")
        else:
            self.train_teacher(tdir, fp)

    def train_teacher(self, tdir: Path, fp: str) -> None:
        r = self.recipe
        tiny = r.teacher.tiny
        if tiny.vision == "teacher":
            raise LsdEdgeError("teacher.tiny.vision: the teacher needs its own vision sizes, not 'teacher'")
        processor = build_tiny_processor(tiny.vision, corpus_words(r))
        model = build_tiny_model(tiny, processor, seed=r.run.seed).to(self.device)
        if not r.teacher.stages:
            raise LsdEdgeError(
                "teacher.stages: a [teacher.tiny] teacher needs [[teacher.stages]] to train it"
            )
        for i, stage in enumerate(r.teacher.stages):
            folder = self.paths.teacher_stages / stage.name
            key = f"teacher/{stage.name}"
            if is_complete(folder):
                model, processor = load_llava(str(folder), what=key, device=str(self.device))
                continue
            job = self._job(key, stage, i, model, processor, None, self.paths.state(f"teacher-{stage.name}"))
            job.checkpointing = r.teacher.gradient_checkpointing
            res = run_stage(job, self.reporter)
            self.save(
                folder, model, processor, {"stage": key, "train": res.__dict__}, state_dir=job.state_dir
            )
        metrics = {"eval": self.eval_split(model, processor, "teacher"), "params": count_params(model)}
        self.save(tdir, model, processor, metrics, extra={"teacher.json": {"fingerprint": fp}})
        if self.dist.main:
            shutil.rmtree(self.paths.teacher_stages, ignore_errors=True)
        self.teacher, self.processor = model, processor
        self.teacher_metrics = metrics

    # -- student

    def build_student(self) -> None:
        spec = self.recipe.student
        seed = self.recipe.run.seed + 1
        if spec.tiny is not None:
            if spec.tiny.vision == "teacher":
                processor = self.processor
            else:
                processor = build_tiny_processor(spec.tiny.vision, corpus_words(self.recipe))
            model = build_tiny_model(spec.tiny, processor, vision_from=self.teacher, seed=seed)
        elif spec.llm is not None:
            model, processor = compose_llava(spec, self.teacher, self.processor, device="cpu", seed=seed)
        else:
            model, processor = load_llava(
                spec.path, what="student.path", device="cpu", trust_remote_code=spec.trust_remote_code
            )
        check_tokenizers(self.processor.tokenizer, processor.tokenizer)
        self.student, self.student_processor = self.trainable_student(model), processor

    def trainable_student(self, model):
        """The student as stages train it: fp32 weights on the run's device, compiled if asked."""
        model = model.float().to(self.device)
        if self.recipe.run.compile:
            compile_layers(model)
        return model

    def save(
        self, folder: Path, model, processor, metrics, extra=None, state_dir: Path | None = None
    ) -> None:
        """Write a checkpoint folder (rank 0) and drop the stage's step states; every process waits
        until it is in place, so none reads a folder still being written."""
        if self.dist.main:
            save_checkpoint(folder, model, processor, self.recipe.to_toml(), metrics, extra=extra)
            if state_dir is not None:
                shutil.rmtree(state_dir, ignore_errors=True)
        self.dist.barrier()

    # -- the teacher's offline work: regenerated answers and top-k caches

    def note_teacher(self) -> None:
        t = self.teacher
        size = sum(p.numel() * p.element_size() for p in t.parameters()) / 2**20
        self.teacher_info = {"params": count_params(t)["total"], "size_mb": size}

    def ensure_teacher(self) -> None:
        if self.teacher is None:
            self.get_teacher()

    def release_teacher(self) -> None:
        """Drop the teacher from memory: a stage distilling from a cache does not need it."""
        if self.teacher is None:
            return
        self.teacher = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def refuse_multi_process(self, what: str, command: str, stage: str) -> None:
        # Every process would write the same folder, and a sharded teacher needs all of them in each
        # forward; one process makes it once, before the launch.
        if self.dist.active:
            raise LsdEdgeError(
                f"{what} is missing or stale and a {self.dist.world}-process run does not make it; run "
                f"`lsd-edge {command} RECIPE --stage {stage}` in one process first, then launch again"
            )

    def teacher_hash(self) -> str:
        """A hash of the teacher's weight, config and tokenizer files: what caches are tied to."""
        if self._teacher_hash is None:
            r = self.recipe
            if r.teacher.tiny is not None:
                folder = self.options.teacher_dir or self.paths.teacher
            else:
                folder = model_folder(r.teacher.path, "teacher.path")
            self._teacher_hash = files_hash(folder)
        return self._teacher_hash

    def source_data(self, stage: StageConfig) -> tuple[Path, Path | None]:
        return self.recipe.data.resolve(self.recipe.data.dataset(stage.data))

    def stage_data(self, stage: StageConfig) -> tuple[Path, Path | None]:
        """The data a stage trains on: the recipe's file, or the teacher's answers to it (made once)."""
        if not stage.regenerate:
            return self.source_data(stage)
        # Checked once per run (it hashes the data); only student stages regenerate, so names are unique.
        if stage.name not in self._stage_data:
            self._stage_data[stage.name] = (Path(self.regenerated(stage)["path"]), self.source_data(stage)[1])
        return self._stage_data[stage.name]

    def regenerated(self, stage: StageConfig, remake: bool = False, force: bool = False) -> dict[str, Any]:
        """The manifest of the stage's regenerated data, made when missing. A folder made with other
        settings is refused, or made again when `remake` (the `regenerate` command); `force` remakes any."""
        folder = self.paths.regenerated(stage.name)
        src, images = self.source_data(stage)
        identity = {
            "teacher": self.teacher_hash(),
            "data": files_hash(src),
            "images": str(images),
            "max_samples": stage.max_samples,
            "max_turns": stage.max_turns,
            "max_new_tokens": stage.regenerate_max_new_tokens,
        }
        if (folder / "manifest.json").is_file() and not force:
            made = read_json(folder / "manifest.json")
            changed = [k for k, v in identity.items() if made.get("identity", {}).get(k) != v]
            if not changed:
                return {**made, "path": str(folder / "data.json"), "built": False}
            if not remake:
                raise LsdEdgeError(
                    f"{folder} holds answers regenerated with other settings ({', '.join(changed)} changed); "
                    f"make them again with `lsd-edge regenerate RECIPE --stage {stage.name}` or delete the folder"
                )
        self.refuse_multi_process(f"the regenerated data of stage '{stage.name}'", "regenerate", stage.name)
        self.ensure_teacher()
        with atomic_dir(folder) as tmp:
            summary = regenerate(
                self.teacher,
                self.processor,
                src,
                images,
                tmp / "data.json",
                max_samples=stage.max_samples,
                max_turns=stage.max_turns,
                max_new_tokens=stage.regenerate_max_new_tokens,
                batch_size=self.recipe.eval.batch_size,
                reporter=self.reporter,
            )
            made = {"stage": stage.name, "source": str(src), "identity": identity, **summary.as_dict()}
            write_json(tmp / "manifest.json", made)
        self._stage_data.pop(stage.name, None)
        return {**made, "path": str(folder / "data.json"), "built": True}

    def cache_folder(self, stage: StageConfig) -> Path:
        if stage.teacher_cache in ("off", "auto"):
            return self.paths.teacher_cache(stage.name)
        return Path(stage.teacher_cache)

    def cache_identity(self, stage: StageConfig) -> dict[str, Any]:
        """Everything that decides a cache's content apart from k: teacher, data, positions, T."""
        data, images = self.stage_data(stage)
        return {
            "teacher": self.teacher_hash(),
            "data": files_hash(data),
            "images": str(images),
            "max_length": self.recipe.data.max_length,
            "max_samples": stage.max_samples,
            "max_turns": stage.max_turns,
            "temperature": stage.loss.temperature,
            "vocab_rows": len(self.processor.tokenizer),
        }

    def teacher_cache(
        self, stage: StageConfig, remake: bool = False, top_k: int | None = None, force: bool = False
    ) -> tuple[TeacherCache, bool]:
        """The stage's teacher cache and whether it was made now. Distilling (`remake` False) makes a
        missing 'auto' cache and refuses a stale one; the `cache-teacher` command (`remake`) makes a
        missing or stale one again, or one with another k when `top_k` is given; `force` always."""
        folder = self.cache_folder(stage)
        identity, parts = self.cache_identity(stage), needed_parts(stage)
        if (folder / "manifest.json").is_file() and not force:
            cache = TeacherCache(folder)
            fresh = not cache.problems(identity, parts)
            if fresh and (top_k is None or min(top_k, identity["vocab_rows"]) == cache.top_k):
                return cache, False
            if not remake:
                cache.check(identity, parts)
        elif not remake and stage.teacher_cache != "auto":
            raise missing_cache(stage)
        self.refuse_multi_process(f"the teacher cache of stage '{stage.name}'", "cache-teacher", stage.name)
        self.ensure_teacher()
        teacher, precision = self.teacher, self.recipe.run.precision

        def online(batch: Batch) -> losses.TeacherTargets:
            with autocast(self.device, precision):
                return online_targets(teacher, batch, need_hidden=False)

        build_cache(
            folder,
            open_dataset(self.recipe, stage, self.processor, self.stage_data(stage)),
            online,
            stage=stage.name,
            identity=identity,
            parts=parts,
            top_k=top_k or stage.teacher_cache_top_k,
            temperature=stage.loss.temperature,
            vocab_rows=identity["vocab_rows"],
            teacher_hidden=teacher_width(teacher),
            device=self.device,
            batch_size=stage.batch_size,
            policy=self.recipe.data.bad_samples,
            reporter=self.reporter,
        )
        return TeacherCache(folder), True

    def stage_teacher(self, stage: StageConfig):
        """What a stage distils from: the teacher model, or its cache (and then the teacher leaves memory)."""
        if not stage.distills:
            return self.teacher
        if not stage.cached:
            self.ensure_teacher()
            return self.teacher
        cache, _ = self.teacher_cache(stage)
        self.release_teacher()
        self.reporter.message(
            f"stage {stage.name}: distilling from the teacher cache {cache.folder} (top-{cache.top_k}); "
            "the teacher is not in memory"
        )
        return cache

    def _job(self, key, stage, index, model, processor, teacher, state_dir) -> StageJob:
        r = self.recipe
        return StageJob(
            key=key,
            stage=stage,
            index=index,
            model=model,
            processor=processor,
            teacher=teacher,
            dataset=open_dataset(r, stage, processor, self.stage_data(stage)),
            state_dir=state_dir,
            seed=r.run.seed,
            device=self.device,
            precision=r.run.precision,
            checkpoint_every=r.run.checkpoint_every,
            log_every=r.run.log_every,
            policy=r.data.bad_samples,
            log_path=self.paths.log,
            resume=True,  # a state folder exists only for a stage cut short; the caller checked --resume
            dist=self.dist,
            checkpointing=r.student.gradient_checkpointing,
        )

    def stages(self) -> list[StageConfig]:
        return self.options.stages if self.options.stages is not None else list(self.recipe.stages)

    def stage_fingerprints(self) -> list[str]:
        """Each stage's identity: its settings, every stage before it, the student and the teacher."""
        r = self.recipe
        base = [
            settings(r.student),
            self.teacher_fingerprint() if r.teacher.tiny else r.teacher.path,
        ]
        base.append(settings(r.data))
        out = []
        for st in self.stages():
            base.append(settings(st))
            out.append(fingerprint(*base, r.run.seed))
        return out


def settings(section: Any) -> dict[str, Any]:
    """A recipe section as it identifies a cached teacher or a finished stage: only what differs from
    the defaults, so a release that adds an option (with a default) keeps earlier caches valid."""
    return section.model_dump(mode="json", exclude_defaults=True)


def missing_cache(stage: StageConfig) -> LsdEdgeError:
    return LsdEdgeError(
        f"stage '{stage.name}': teacher_cache = '{stage.teacher_cache}' holds no teacher cache; make it "
        f"with `lsd-edge cache-teacher RECIPE --stage {stage.name}` or set teacher_cache = 'auto'"
    )


def _check_cache_paths(stages: list[StageConfig]) -> None:
    """A cache folder named in the recipe must be there before hours of earlier stages run."""
    for st in stages:
        if (
            st.cached
            and st.teacher_cache != "auto"
            and not (Path(st.teacher_cache) / "manifest.json").is_file()
        ):
            raise missing_cache(st)


def _existing_work(paths: RunPaths, stage_names: list[str]) -> list[str]:
    found = [n for n in stage_names if paths.stage(n).exists()]
    if (paths.root / "state").exists():
        found.append("state")
    if paths.student.exists():
        found.append("student")
    return found


def _check_output(
    paths: RunPaths, stage_names: list[str], options: DistillOptions, reporter: Reporter
) -> None:
    existing = _existing_work(paths, stage_names)
    if options.restart:
        for n in stage_names + ["student", "state", "log.jsonl", "report.json", "loss_curve.png"]:
            p = paths.root / n
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        if existing:
            reporter.message(
                f"[yellow]--restart: removed the student stages in {paths.root} (teacher kept)[/yellow]"
            )
        return
    if existing and not options.resume:
        raise LsdEdgeError(
            f"{paths.root} already holds a run ({', '.join(existing)}); pass --resume to continue it or "
            "--restart to train the student again (the cached teacher is kept)"
        )


def check_data(recipe: Recipe, stages: list[StageConfig]) -> None:
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


def distill(
    recipe: Recipe, options: DistillOptions | None = None, reporter: Reporter | None = None
) -> dict[str, Any]:
    """Run a recipe end to end; returns the report (also written to <output>/report.json).

    Launched on several processes (`accelerate launch -m lsd_edge distill`), every process trains
    its share of each step and rank 0 writes; the other processes return an empty report."""
    options = options or DistillOptions()
    reporter = reporter or QuietReporter()
    if recipe.run.num_threads:
        torch.set_num_threads(recipe.run.num_threads)
    torch.manual_seed(recipe.run.seed)
    dist, device = setup(recipe.run.device)
    if not dist.main:  # one process reports and writes; the others train beside it
        reporter = QuietReporter()
    paths = RunPaths(recipe.output_dir)
    run = Run(recipe, paths, device, reporter, options, dist=dist)
    stage_names = [s.name for s in run.stages()]

    def set_up_output() -> None:
        _check_output(paths, stage_names, options, reporter)
        paths.root.mkdir(parents=True, exist_ok=True)
        (paths.root / "recipe.toml").write_text(recipe.to_toml(), encoding="utf-8")
        prepare_data(recipe, reporter)

    started = time.perf_counter()
    dist.on_main(set_up_output)
    check_data(recipe, run.stages())
    _check_cache_paths(run.stages())
    run.get_teacher()
    run.note_teacher()
    run.build_student()
    fps = run.stage_fingerprints()
    stage_reports = []
    model, processor = run.student, run.student_processor
    for i, (stage, fp) in enumerate(zip(run.stages(), fps, strict=True)):
        folder = paths.stage(stage.name)
        if is_complete(folder):
            made = (
                read_json(folder / "stage.json").get("fingerprint")
                if (folder / "stage.json").is_file()
                else None
            )
            if made != fp:
                raise LsdEdgeError(
                    f"{folder} was made with other settings than this recipe's stage '{stage.name}'; "
                    "pass --restart to train the student again, or set run.output_dir to another folder"
                )
            reporter.message(f"stage {stage.name}: done before, loading {folder}")
            model, _ = load_llava(str(folder), what=f"stage {stage.name}", device=str(device))
            model = run.trainable_student(model)
            stage_reports.append(read_json(folder / "metrics.json"))
            continue
        teacher = run.stage_teacher(stage)
        job = run._job(stage.name, stage, i, model, processor, teacher, paths.state(stage.name))
        res = run_stage(job, reporter)
        metrics: dict[str, Any] = {
            "stage": stage.name,
            "kind": stage.kind,
            "steps": res.steps,
            "seconds": round(res.seconds, 2),
            "tokens_per_s": round(res.tokens_per_s, 1),
            "last_losses": res.last_terms,
            "bad_samples": res.bad_samples,
            **offline_facts(stage, teacher, job.dataset),
        }
        if options.evaluate_stages or i == len(fps) - 1:
            metrics["eval"] = run.eval_split(model, processor, stage.name)
        run.save(folder, model, processor, metrics, {"stage.json": {"fingerprint": fp}}, job.state_dir)
        stage_reports.append(metrics)
    report: dict[str, Any] = {}
    if dist.main:  # the other processes return an empty report
        report = _finish(run, model, stage_reports, time.perf_counter() - started)
    dist.barrier()
    return report


def _finish(run: Run, model, stage_reports: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Copy the last stage to student/, drop step states, write the report and the loss curve."""
    paths, reporter = run.paths, run.reporter
    last = paths.stage(run.stages()[-1].name)
    if paths.student.exists():
        shutil.rmtree(paths.student)
    with atomic_dir(paths.student) as tmp:
        for f in last.iterdir():
            shutil.copy2(f, tmp / f.name)
    shutil.rmtree(paths.root / "state", ignore_errors=True)
    report = build_report(run, model, stage_reports, seconds)
    write_json(paths.report, report)
    try:
        plot_losses(paths.log, paths.root / "loss_curve.png")
    except Exception as e:  # a plot is a nicety; never lose a finished run over it
        reporter.message(f"[yellow]loss curve not drawn: {e}[/yellow]")
    return report


def offline_facts(stage: StageConfig, teacher, dataset: LlavaDataset) -> dict[str, Any]:
    """For a stage's metrics: where its teacher targets and its data came from."""
    out: dict[str, Any] = {}
    if isinstance(teacher, TeacherCache) and stage.distills:
        out["teacher_cache"] = {"path": str(teacher.folder), "top_k": teacher.top_k}
    if stage.regenerate:
        out["regenerated_data"] = str(dataset.path)
    return out


def _acc(metrics: dict[str, Any]) -> float | None:
    ev = metrics.get("eval") or {}
    return ev.get("accuracy")


def build_report(run: Run, student, stage_reports: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    tdir = run.options.teacher_dir or run.paths.teacher
    if run.recipe.teacher.tiny is not None:
        t_size = dir_size_mb(tdir)
        t_acc = _acc(run.teacher_metrics)
    else:
        t_size = run.teacher_info["size_mb"]
        t_acc = _acc(run.teacher_metrics) if run.teacher_metrics else None
    return {
        "recipe": run.recipe.run.name,
        "output_dir": str(run.paths.root),
        "teacher": {
            "accuracy": t_acc,
            "params": run.teacher_info["params"],
            "size_mb": round(t_size, 3),
        },
        "student": {
            "accuracy": _acc(stage_reports[-1]),
            "params": count_params(student)["total"],
            "size_mb": round(dir_size_mb(run.paths.student), 3),
            "path": str(run.paths.student),
        },
        "stages": [
            {
                "name": m.get("stage"),
                "kind": m.get("kind"),
                "accuracy": _acc(m),
                "steps": m.get("steps"),
                "seconds": m.get("seconds"),
                "last_losses": m.get("last_losses"),
            }
            for m in stage_reports
        ],
        "seconds": round(seconds, 1),
        "device": str(run.device),
    }


def plot_losses(log_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    stages: list[str] = []
    for r in rows:
        if r["stage"] not in stages:
            stages.append(r["stage"])
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.2), squeeze=False)
    for ax, st in zip(axes[0], stages, strict=True):
        sr = [r for r in rows if r["stage"] == st]
        for term in ("loss",) + TERMS:
            ys = [r[term] for r in sr if term in r]
            if ys:
                ax.plot([r["step"] for r in sr if term in r], ys, label=term, lw=1)
        ax.set_title(st)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------- the teacher's offline work


def find_stage(recipe: Recipe, name: str) -> StageConfig:
    for st in recipe.stages:
        if st.name == name:
            return st
    raise LsdEdgeError(
        f"--stage {name}: the recipe has no such stage; its stages are {', '.join(s.name for s in recipe.stages)}"
    )


def offline_run(recipe: Recipe, reporter: Reporter | None = None) -> Run:
    """A run set up for work on the teacher's side only: data prepared, teacher loaded (or trained)."""
    reporter = reporter or QuietReporter()
    if recipe.run.num_threads:
        torch.set_num_threads(recipe.run.num_threads)
    torch.manual_seed(recipe.run.seed)
    run = Run(
        recipe, RunPaths(recipe.output_dir), resolve_device(recipe.run.device), reporter, DistillOptions()
    )
    run.paths.root.mkdir(parents=True, exist_ok=True)
    prepare_data(recipe, reporter)
    run.get_teacher()
    return run


def cache_teacher(
    recipe: Recipe,
    stage_name: str,
    top_k: int | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """`lsd-edge cache-teacher`: make (or find up to date) a stage's top-k teacher cache."""
    stage = find_stage(recipe, stage_name)
    if stage.kind not in DISTILLING_KINDS or not stage.distills:
        raise LsdEdgeError(
            f"--stage {stage_name}: a '{stage.kind}' stage does no distillation, so it has no use for a "
            "teacher cache; pick a dpt or dft stage"
        )
    run = offline_run(recipe, reporter)
    cache, built = run.teacher_cache(stage, remake=True, top_k=top_k, force=force)
    return {"folder": str(cache.folder), "built": built, "used_by_stage": stage.cached, **cache.manifest}


def regenerate_data(
    recipe: Recipe, stage_name: str, force: bool = False, reporter: Reporter | None = None
) -> dict[str, Any]:
    """`lsd-edge regenerate`: make (or find up to date) a stage's teacher-answered data."""
    stage = find_stage(recipe, stage_name)
    run = offline_run(recipe, reporter)
    return {"used_by_stage": stage.regenerate, **run.regenerated(stage, remake=True, force=force)}
