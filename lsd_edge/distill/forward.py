"""One model's forward pass as the losses read it: final hidden states, per-layer states, projector output."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lsd_edge.data.dataset import Batch
from lsd_edge.errors import TrainingError


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


def per_image(tokens: torch.Tensor, n_images: int) -> torch.Tensor | None:
    """Visual-token states gathered in batch order (I*K, D) as (I, K, D), one row per image; None for
    a micro-batch without images (text-only samples, or every image in it skipped as bad)."""
    if n_images == 0:
        return None
    if tokens.shape[0] % n_images:
        raise TrainingError(
            f"{tokens.shape[0]} visual-token positions for {n_images} image(s): the data set let a sample "
            "through whose image tokens do not match its images; report this with the batch's sample ids"
        )
    return tokens.view(n_images, -1, tokens.shape[-1])


def n_images(f: Forward) -> int:
    return 0 if f.image_features is None else f.image_features.shape[0]


def output_weight(model) -> torch.Tensor:
    """The lm_head weight (V, D) the chunked losses multiply by themselves."""
    head = model.lm_head
    if getattr(head, "bias", None) is not None:
        raise TrainingError("loss.chunk_size: this model's lm_head has a bias; set chunk_size = 0")
    return head.weight
