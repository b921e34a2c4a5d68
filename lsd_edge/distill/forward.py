"""One model's forward pass as the losses read it: final hidden states, per-layer states, projector output."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lsd_edge.data.batch import Batch
from lsd_edge.errors import TrainingError


@dataclass
class Forward:
    """What the losses need from one model's forward pass."""

    hidden: torch.Tensor  # (B, T, D) last hidden state (after the final norm)
    hidden_states: tuple[torch.Tensor, ...] | None  # per layer, 0 = embeddings, -1 = final
    image_features: torch.Tensor | None  # (I, K, D) projector output
    vision_features: torch.Tensor | None = (
        None  # (I, K, Dv) the tower's feature layer, as the projector reads it
    )


def tower_features(config, image_outputs) -> torch.Tensor:
    """The vision tower's hidden state LLaVA's projector reads (its feature layer or layers, patch
    positions only): (I, K, Dv)."""
    hs, layer = image_outputs.hidden_states, config.vision_feature_layer
    feats = hs[layer] if isinstance(layer, int) else torch.cat([hs[i] for i in layer], dim=-1)
    return feats[:, 1:] if config.vision_feature_select_strategy == "default" else feats


def forward(model, batch: Batch, hidden_states: bool = False) -> Forward:
    out = model.model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=None if batch.pixel_values is None else batch.pixel_values.to(model.dtype),
        output_hidden_states=hidden_states,
        use_cache=False,  # training: a KV cache would only hold memory
        return_dict=True,
    )
    feats = tower = None
    if out.image_outputs is not None:
        feats = torch.stack(list(out.image_outputs.pooler_output))
        tower = tower_features(model.config, out.image_outputs)
    return Forward(out.last_hidden_state, out.hidden_states if hidden_states else None, feats, tower)


def image_features(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The projector's output (I, K, D) for I images, as the model's own forward computes it, and
    the tower's features it read (I, K, Dv)."""
    cfg = model.config
    out = model.model.get_image_features(
        pixel_values=pixel_values.to(model.dtype),
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        return_dict=True,
    )
    return torch.stack(list(out.pooler_output)), tower_features(cfg, out)


class StudentPass:
    """How the objective runs the student's forward pass, and what a micro-batch adds for a latent
    map it has nothing for. This one is the plain pass: the model's own forward, and nothing for an
    unused map (it gets no gradient). A training engine that needs more of a forward pass (every
    module with trainable weights run in every micro-batch) supplies its own; the losses are the same."""

    def run(self, model, batch: Batch, hidden_states: bool) -> Forward:
        return forward(model, batch, hidden_states)

    def unused_map(self, proj: torch.nn.Linear, f: Forward) -> torch.Tensor | None:
        """What a latent map adds where a micro-batch has nothing for it: None (nothing)."""
        return None


PLAIN = StudentPass()


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
