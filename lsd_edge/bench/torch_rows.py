"""A bench row's PyTorch side, in its own module so an ONNX row's worker never imports torch."""

from __future__ import annotations

import torch
from transformers import LlavaConfig

from lsd_edge.data.shapes import vocabulary
from lsd_edge.models.archs import arch_processor
from lsd_edge.models.info import random_model
from lsd_edge.runtime.torch_runner import TorchRunner


def torch_runner(spec):
    torch.set_num_threads(spec.threads)
    if spec.arch is None:
        return TorchRunner(spec.path, device=spec.device, dtype=spec.dtype, name=spec.name)
    config = LlavaConfig.from_dict(spec.arch["config"])
    processor = arch_processor(config.vision_config.image_size, config.vision_config.patch_size, vocabulary())
    model = random_model(config, getattr(torch, spec.dtype), torch.device(spec.device), spec.arch["seed"])
    return TorchRunner.from_model(model, processor, spec.name, spec.device)


def torch_decode_bytes(model) -> int:
    """Weight bytes one decode step reads: the decoder layers, final norm and lm_head (with tied
    embeddings that is the whole table), plus one row of an untied embedding table. The vision
    tower and projector run only in the prefill."""
    lm, head = model.model.language_model, model.lm_head
    table = lm.get_input_embeddings().weight
    params = {id(p): p for p in (*lm.parameters(), *head.parameters())}
    total = sum(p.numel() * p.element_size() for p in params.values())
    if head.weight is not table:
        total -= (table.shape[0] - 1) * table.shape[1] * table.element_size()
    return total
