"""The training backend of a one-process run, and what every backend shares.

A backend owns everything the engine that trains the student decides: how the student is prepared
(`prepare`), the context a micro-batch's backward runs in (`no_sync`), `backward`, `clip`, the
optimizer step, the resume state's tensors (`state_dicts`, `load_state`), the plain student back at
the end of a stage (`plain_student`), and what the engine needs of a forward pass (the
`StudentStep` subclass it trains, whether a pad slot runs the online teacher, whether the teacher is
sharded). The stage loop calls these and never asks which engine it is.

`StudentStep` holds the student and the stage's latent projections, and its forward runs the whole
objective (student forward, lm_head losses, projections), so a wrapper's hooks see every use of
every parameter.

`Backend` itself is one process: the student prepared by the run's Accelerator (or used as it is
for a stage run on its own, without one), gradients where backward leaves them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from lsd_edge.data.batch import Batch
from lsd_edge.distill.forward import PLAIN, StudentPass
from lsd_edge.distill.objective import Counts, LatentProjector, loss_terms, weighted_total
from lsd_edge.distill.teacher import Teacher
from lsd_edge.models.tokens import IGNORE_INDEX
from lsd_edge.recipe.schema import StageConfig
from lsd_edge.train.distributed import SINGLE, Dist

# An engine that shards the student's weights runs every forward together on all processes, which
# answers of different lengths per process cannot do.
SHARDED_ROLLOUT = (
    "on_policy: {engine} shards the student, so a process cannot write its own answers alone; "
    "train this stage with DDP (a plain multi-GPU launch) or one process, or remove on_policy"
)
OPTIONS = StateDictOptions(ignore_frozen_params=True)  # frozen weights come from the previous stage
# Putting back: the frozen weights are absent by design; every trainable one was read (DCP refuses
# a checkpoint that lacks a key asked for).
LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


class StudentStep(nn.Module):
    """The student and its latent projections; forward = one micro-batch's weighted loss and terms."""

    student_pass: StudentPass = PLAIN  # how the objective runs the student (a backend may need more)

    def __init__(self, student: nn.Module, latent: LatentProjector | None):
        super().__init__()
        self.student = student
        self.latent = latent

    def forward(
        self,
        batch: Batch,
        teacher: Teacher | None,
        stage: StageConfig,
        counts: Counts,
        vocab_rows: int,
        lam: float,
        weight: float = 1.0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`weight` scales the loss (0 for a pad slot, which only backends of several processes run)."""
        terms = loss_terms(
            self.student, teacher, batch, stage, counts, vocab_rows, self.latent, self.student_pass
        )
        return weighted_total(terms, stage, lam), terms


@dataclass
class Prepared:
    """A stage's trainable objects as the backend prepared them."""

    module: Any  # the StudentStep, or the engine's wrapper of it (DDP, DeepSpeed)
    optimizer: Any
    scheduler: Any
    step: StudentStep  # the StudentStep itself (sharded in place under FSDP2, partitioned under ZeRO-3)


def pad_batch(pad_id: int, device: torch.device) -> Batch:
    """One pad token with no label and no image: a micro-batch that adds nothing to any loss term."""
    one = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
    return Batch(
        ids=[],
        input_ids=one,
        attention_mask=torch.ones_like(one),
        labels=torch.full_like(one, IGNORE_INDEX),
        pixel_values=None,
        visual_mask=torch.zeros_like(one, dtype=torch.bool),
    )


def raw_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimizer


class Backend:
    """One process. Subclasses: `Ddp`, `Fsdp2` (`lsd_edge.train.backends.ddp`, `.fsdp`), `Zero`."""

    pad_runs_teacher = False  # a pad slot's forward runs the online teacher too (when it is collective)

    def __init__(self, dist: Dist = SINGLE, accelerator: Any = None):
        self.dist = dist
        self.accelerator = accelerator  # None: a stage run on its own (tests), nothing to prepare

    def make_step(self, student: nn.Module, latent: LatentProjector | None) -> StudentStep:
        return StudentStep(student, latent)

    def prepare(
        self,
        student: nn.Module,
        latent: LatentProjector | None,
        optimizer,
        scheduler,
        stage: StageConfig,
        bf16: bool = False,
    ) -> Prepared:
        """The stage's student (and latent projections) as the engine trains them. `bf16`: the
        stage's forward runs under bf16 autocast."""
        step = self.make_step(student, latent)
        if self.accelerator is None:
            return Prepared(step, optimizer, scheduler, step)
        module, optimizer, scheduler = self.accelerator.prepare(step, optimizer, scheduler)
        return Prepared(module, optimizer, scheduler, step)

    def no_sync(self, p: Prepared, last: bool):
        """The context of one micro-batch's forward and backward (`last`: the step's last one)."""
        return contextlib.nullcontext()

    def backward(self, p: Prepared, loss: torch.Tensor, last: bool) -> None:
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def clip(self, p: Prepared, max_norm: float) -> None:
        params = [q for q in p.step.parameters() if q.requires_grad]
        if self.accelerator is None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            self.accelerator.clip_grad_norm_(params, max_norm)

    def optimizer_step(self, p: Prepared) -> None:
        p.optimizer.step()
        p.optimizer.zero_grad(set_to_none=True)
        p.scheduler.step()

    def state_dicts(self, p: Prepared) -> dict[str, Any]:
        """This process's part of a resume state: {"model": trainable weights, "optim": AdamW's state}
        keyed by parameter name, as torch distributed checkpoints write them."""
        model_sd, optim_sd = get_state_dict(p.module, raw_optimizer(p.optimizer), options=OPTIONS)
        return {"model": model_sd, "optim": optim_sd}

    def load_state(self, p: Prepared, read) -> None:
        """Put a resume state back: `read(template)` fills a template like `state_dicts`'s."""
        state = self.state_dicts(p)
        read(state)
        set_state_dict(
            p.module,
            raw_optimizer(p.optimizer),
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=LOAD_OPTIONS,
        )

    def plain_student(self, p: Prepared, device: torch.device) -> nn.Module:
        """The trained student as a plain model on every process (evaluation and checkpoints read it)."""
        return p.step.student

    def generating_student(self, p: Prepared) -> nn.Module:
        """The student as on-policy generation runs it: whole in this process, each process writing
        the answers of its own micro-batches (no collective in its forward)."""
        return p.step.student

    def shard_teacher(self, model: nn.Module) -> int:
        """Shard a frozen teacher over the processes where the engine needs it; layers sharded."""
        return 0

    def release(self) -> None:
        """Drop the engine's references to a finished stage's objects."""
        if self.accelerator is not None:
            self.accelerator.free_memory()


def rebuilt(student: nn.Module, full: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """A fresh model of the student's class holding `full`, its buffers and trainable flags."""
    with torch.device("meta"):
        model = type(student)(student.config)
    model.to_empty(device=device)
    model.load_state_dict(full, strict=False)
    buffers = dict(student.named_buffers())
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])  # non-persistent ones (rotary frequencies) are not in `full`
    model.tie_weights()
    grads = {n: q.requires_grad for n, q in student.named_parameters()}
    for n, q in model.named_parameters():
        q.requires_grad_(grads.get(n, False))
    return model.train(student.training)
