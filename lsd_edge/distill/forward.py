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


def output_weight(model) -> torch.Tensor:
    """The lm_head weight (V, D) the chunked losses multiply by themselves."""
    head = model.lm_head
    if getattr(head, "bias", None) is not None:
        raise TrainingError("loss.chunk_size: this model's lm_head has a bias; set chunk_size = 0")
    return head.weight
