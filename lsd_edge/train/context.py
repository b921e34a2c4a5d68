"""A distillation run in progress: its recipe, folder, device, processes and reporter, and the two
things every part of it does the same way: saving a checkpoint and making a stage job."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lsd_edge.data.dataset import LlavaDataset
from lsd_edge.data.loading import auto_workers
from lsd_edge.distill.teacher import Teacher
from lsd_edge.evaluate.greedy import eval_split
from lsd_edge.models.load import save_checkpoint
from lsd_edge.progress import Reporter
from lsd_edge.recipe.schema import Recipe, StageConfig
from lsd_edge.train import track
from lsd_edge.train.backends.base import Backend
from lsd_edge.train.distributed import Dist
from lsd_edge.train.loop import StageJob
from lsd_edge.workspace import Workspace


@dataclass
class RunContext:
    recipe: Recipe
    workspace: Workspace
    device: torch.device
    reporter: Reporter
    backend: Backend = field(default_factory=Backend)  # the engine that trains (one process by default)
    tracked: int = 0  # evaluations sent to the trackers so far (their step)

    @property
    def dist(self) -> Dist:
        return self.backend.dist

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
            backend=self.backend,
            checkpointing=checkpointing,
            num_workers=auto_workers(self.dist.local_world)
            if r.data.num_workers is None
            else r.data.num_workers,
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
        metrics = eval_split(self.recipe, model, processor, label, self.reporter)
        track.log_eval(self.backend.accelerator, label, metrics, self.tracked)
        self.tracked += 1
        return metrics
