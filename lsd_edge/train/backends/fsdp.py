"""Several processes under FSDP2 (Accelerate's FSDP launch with fsdp_version 2): the student's
layers sharded, gathered one at a time for their forward and backward, gradients reduce-scattered in
the backward of a step's last micro-batch; the frozen teacher's decoder layers sharded too.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lsd_edge.errors import TrainingError
from lsd_edge.train.backends.base import SHARDED_ROLLOUT, Prepared, rebuilt
from lsd_edge.train.backends.ddp import Ddp
from lsd_edge.train.launch import check_wrap_classes


class Fsdp2(Ddp):
    pad_runs_teacher = True  # the sharded teacher's forward is collective

    def prepare(self, student, latent, optimizer, scheduler, stage, bf16=False) -> Prepared:
        step = self.make_step(student, latent)
        check_wrap_classes(self.accelerator.state.fsdp_plugin, step)
        module, optimizer, scheduler = self.accelerator.prepare(step, optimizer, scheduler)
        step.sharded = any(isinstance(q, DTensor) for q in step.parameters())  # sharded in place
        return Prepared(module, optimizer, scheduler, step)

    def plain_student(self, p: Prepared, device: torch.device) -> nn.Module:
        """Rebuilt from the full weights, gathered from every process's shards."""
        student = p.step.student
        if not p.step.sharded:
            return student
        full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True))
        return rebuilt(student, full, device)

    def generating_student(self, p: Prepared) -> nn.Module:
        if p.step.sharded:
            raise TrainingError(SHARDED_ROLLOUT.format(engine="FSDP2"))
        return p.step.student

    def shard_teacher(self, model: nn.Module) -> int:
        return shard_decoder_layers(model)


def shard_decoder_layers(model, own_group: bool = False) -> int:
    """FSDP2-shard each decoder layer of a frozen model over all processes; returns how many.
    `own_group`: its gathers run on a process group of their own (under DeepSpeed ZeRO-3, whose
    gathers of the student's weights would otherwise interleave with them on the default group).

    Each layer's weights are all-gathered for its forward and freed after it, so a process holds
    1/W of the LLM's layers plus one layer at a time. Embeddings, head, projector and vision tower
    stay whole: the vision tower runs only on batches with images, and a collective must be entered
    by every process.
    """
    layers = model.model.language_model.layers
    mesh = None
    if own_group:
        device = next(model.parameters()).device.type
        mesh = DeviceMesh.from_group(torch.distributed.new_group(), device_type=device)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True, mesh=mesh)
    return len(layers)
