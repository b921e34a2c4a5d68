"""A sample as a model reads it (`Encoded`), a padded batch of them (`Batch`), and collation.

A sample may carry its teacher's view (`Encoded.teacher`, `Batch.teacher`: another visual grid or
another tokenizer, `lsd_edge.data.dataset`), the mark that its answers are the student's own
(`own`: on-policy DFT, no CE label) and, where the teacher has another tokenizer, the answer tokens
both tokenizations start (`kd`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lsd_edge.models.tokens import IGNORE_INDEX


@dataclass
class Encoded:
    id: str
    input_ids: torch.Tensor  # (T,) long, visual tokens expanded
    labels: torch.Tensor  # (T,) long, -100 outside assistant answers
    pixel_values: torch.Tensor | None  # (n_images, 3, H, W)
    index: int = -1  # position in its data set (what a teacher cache is keyed by)
    truncated: bool = False  # cut at data.max_length (labels on what remains)
    teacher: Encoded | None = None  # the teacher's view, where it sees with another grid or tokenizer
    own: bool = False  # its answers are the student's own (on-policy): KL targets, no CE label
    # (T,) bool: the answer tokens a teacher with another tokenizer also starts (None: every label)
    kd: torch.Tensor | None = None
    pad_image: tuple[int, int] | None = None  # (pad, image) ids of another tokenizer (the teacher's)


@dataclass
class Batch:
    ids: list[str]
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 where no loss
    pixel_values: torch.Tensor | None  # (n_images, 3, H, W), images in sample order
    visual_mask: torch.Tensor  # (B, T) bool, True at visual-token positions
    indices: list[int] = field(default_factory=list)  # each sample's position in its data set
    teacher: Batch | None = None  # the teacher's view, where it sees with another grid or tokenizer
    own: torch.Tensor | None = None  # (B,) bool: the sample's answers are the student's (no CE label)
    kd: torch.Tensor | None = None  # (B, T) bool: tokens the response KD predicts (None: every label)

    @property
    def ce_labels(self) -> torch.Tensor:
        """`labels` where CE applies: the data's answers; a sample whose answers the student wrote
        itself (on-policy) has none, its labels feed the KL terms only."""
        if self.own is None:
            return self.labels
        return self.labels.masked_fill(self.own[:, None], IGNORE_INDEX)

    def apply(self, fn) -> Batch:
        """The same batch with `fn` applied to each tensor (the teacher's view's too)."""
        return Batch(
            self.ids,
            fn(self.input_ids),
            fn(self.attention_mask),
            fn(self.labels),
            None if self.pixel_values is None else fn(self.pixel_values),
            fn(self.visual_mask),
            self.indices,
            None if self.teacher is None else self.teacher.apply(fn),
            None if self.own is None else fn(self.own),
            None if self.kd is None else fn(self.kd),
        )

    @property
    def kd_positions(self) -> torch.Tensor:
        """(B, T-1) bool: the positions whose next-token distribution the response KD compares (position
        t predicts token t+1): every labelled one, or where a teacher with another tokenizer aligns."""
        if self.kd is None:
            return self.labels[:, 1:] != IGNORE_INDEX
        return self.kd[:, 1:]

    @property
    def teacher_view(self) -> Batch:
        """The batch as the teacher reads it: its own view, or this batch where it sees as the student."""
        return self if self.teacher is None else self.teacher

    def to(self, device, non_blocking: bool = False) -> Batch:
        return self.apply(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Page-locked copies, so a copy to the GPU can overlap compute (DataLoader(pin_memory=True))."""
        return self.apply(lambda t: t.pin_memory())

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(samples: list[Encoded], pad_id: int, image_id: int) -> Batch:
    """Right-pad a list of samples into a batch."""
    T = max(len(s.input_ids) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[i, :n] = s.input_ids
        labels[i, :n] = s.labels
        attention[i, :n] = 1
    pix = [s.pixel_values for s in samples if s.pixel_values is not None]
    pixel_values = torch.cat(pix) if pix else None
    kd = None
    if samples[0].kd is not None:
        kd = torch.zeros((B, T), dtype=torch.bool)
        for i, s in enumerate(samples):
            kd[i, : len(s.kd)] = s.kd
    teacher = None
    if samples[0].teacher is not None:
        t_pad, t_image = samples[0].teacher.pad_image or (pad_id, image_id)
        teacher = collate([s.teacher for s in samples], t_pad, t_image)
    return Batch(
        [s.id for s in samples],
        input_ids,
        attention,
        labels,
        pixel_values,
        input_ids == image_id,
        [s.index for s in samples],
        teacher,
        torch.tensor([s.own for s in samples]) if any(s.own for s in samples) else None,
        kd,
    )
