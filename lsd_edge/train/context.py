"""A distillation run in progress: its recipe, folder, device, processes and reporter, and the two
things every part of it does the same way: saving a checkpoint and making a stage job."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lsd_edge.data.dataset import LlavaDataset
from lsd_edge.distill.teacher import Teacher
from lsd_edge.evaluate.greedy import eval_split
from lsd_edge.models.load import save_checkpoint
from lsd_edge.progress import Reporter
from lsd_edge.recipe.schema import Recipe, StageConfig
from lsd_edge.train.distributed import SINGLE, Dist
from lsd_edge.train.loop import StageJob
from lsd_edge.workspace import Workspace


@dataclass
class RunContext:
    recipe: Recipe
    workspace: Workspace
    device: torch.device
    reporter: Reporter
    dist: Dist = SINGLE

    def job(
        self,
        key: str,
        stage: StageConfig,
        index: int,
        model,
        processor,
        teacher: Teacher | None,
        dataset: LlavaDataset,
        checkpointing: bool,
    ) -> StageJob:
        r = self.recipe
        return StageJob(
            key=key,
            stage=stage,
            index=index,
            model=model,
            processor=processor,
            teacher=teacher,
            dataset=dataset,
            run=r.run,
            bad_samples=r.data.bad_samples,
            workspace=self.workspace,
            device=self.device,
            dist=self.dist,
            checkpointing=checkpointing,
        )

    def save(
        self,
        folder: Path,
        model,
        processor,
        metrics: dict[str, Any],
        extra: dict[str, Any] | None = None,
        state_dir: Path | None = None,
    ) -> None:
        """Write a checkpoint folder (rank 0) and drop the stage's step states; every process waits
        until it is in place, so none reads a folder still being written."""
        if self.dist.main:
            save_checkpoint(folder, model, processor, self.recipe.to_toml(), metrics, extra=extra)
            if state_dir is not None:
                shutil.rmtree(state_dir, ignore_errors=True)
        self.dist.barrier()

    def evaluate(self, model, processor, label: str) -> dict[str, Any]:
        """The recipe's eval split scored by rank 0 ({} on the other processes, or without eval data)."""
        if not self.dist.main:
            return {}
        return eval_split(self.recipe, model, processor, label, self.reporter)
