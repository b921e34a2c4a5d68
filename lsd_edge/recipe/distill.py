"""What a stage's recipe section says of distillation: the loss weights and kinds (`[stages.loss]`),
the schedule of the distillation weight lambda (`distill_schedule`) and on-policy DFT (`on_policy`).
Strict and frozen, as every recipe section is (`lsd_edge.recipe.schema` holds the stage and the
whole `Recipe`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from lsd_edge.recipe.types import NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Strict

KLKind = Literal["forward", "reverse", "jsd", "skew"]


class LossConfig(Strict):
    """Loss weights and the KL flavour; weights left out are filled from the stage's kind."""

    ce: NonNegFloat = 1.0
    response_kl: NonNegFloat | None = None
    visual_kl: NonNegFloat | None = None
    relation: NonNegFloat | None = None
    latent: NonNegFloat | None = None
    # The vision-tower feature term (METHOD.md, "edge vision"): the student tower's feature layer,
    # projected to the teacher tower's width, against the teacher's (pooled onto the student's grid).
    vision: NonNegFloat | None = None
    kl: KLKind = "forward"
    temperature: PositiveFloat = 1.0
    jsd_beta: Annotated[float, Field(gt=0, lt=1)] = 0.5
    skew_lambda: Annotated[float, Field(gt=0, lt=1)] = 0.1
    latent_kind: Literal["mse", "cosine"] = "cosine"
    # (student layer, teacher layer) pairs of hidden states to align; "projector" is the projector
    # output (the visual tokens right after modality alignment), -1 the final layer.
    latent_pairs: list[tuple[int | Literal["projector"], int | Literal["projector"]]] = [
        ("projector", "projector"),
        (-1, -1),
    ]
    # Response and visual logit losses from hidden states and lm_head weights, this many positions at
    # a time, so B x T x V logits are never whole in memory; 0 = the plain path (whole logits).
    chunk_size: NonNegInt = 0
    # A student with another tokenizer than the teacher (lsd_edge.distill.cross_vocab): the response
    # and visual logit terms compare the two distributions sorted by probability (ULD), or match the
    # tokens both vocabularies hold exactly and sort the rest (GOLD). Unused with one vocabulary.
    cross_tokenizer: Literal["uld", "gold"] = "uld"

    def weight(self, term: str) -> float:
        value = getattr(self, term)
        return 0.0 if value is None else float(value)


class DistillSchedule(Strict):
    """How the distillation weight (lambda) moves over a stage; it multiplies every KD term."""

    kind: Literal["constant", "linear_decay", "warm_start"] = "constant"
    start: NonNegFloat = 1.0
    end: NonNegFloat = 0.0
    warm_steps: NonNegInt = 0
    ramp_steps: NonNegInt = 0

    def factor(self, step: int, total: int) -> float:
        if self.kind == "constant":
            return self.start
        if self.kind == "linear_decay":
            frac = min(1.0, step / max(1, total - 1))
            return self.start + (self.end - self.start) * frac
        if step < self.warm_steps:
            return 0.0
        if self.ramp_steps == 0:
            return self.start
        return self.start * min(1.0, (step - self.warm_steps + 1) / self.ramp_steps)


class OnPolicyConfig(Strict):
    """On-policy distilled fine-tuning (GKD, Agarwal et al. 2024): with probability `lmbda` a
    micro-batch's answers are the student's own, written by it at train time (greedy when
    `temperature` = 0, else sampled, at most `max_new_tokens` per answer), and the online teacher's
    distributions on them are the response-KL targets; they carry no CE label."""

    lmbda: Annotated[float, Field(gt=0, le=1)] = 0.5
    temperature: NonNegFloat = 1.0
    max_new_tokens: PositiveInt = 64
