"""The run's teacher: loaded (a LLaVA checkpoint), or trained once and cached (the embedded default's
tiny teacher), frozen in its recipe dtype, sharded over processes under FSDP, released when a
stage distils from a cache.

A trained teacher is cached in `<output_dir>/teacher` with an `identity.json` tying it to the
teacher, data, seed and eval settings it was trained with; a teacher made with other settings is
refused rather than reused.
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path
from typing import Any

import torch

from lsd_edge.data.prepare import corpus_texts, open_dataset
from lsd_edge.data.shapes import FORMAT
from lsd_edge.errors import LsdEdgeError
from lsd_edge.files import files_hash, read_json
from lsd_edge.identity import IDENTITY_FILE, Manifest, settings
from lsd_edge.models.bpe import TOKENIZER_KIND
from lsd_edge.models.build import build_tiny_model, build_tiny_processor
from lsd_edge.models.groups import count_params
from lsd_edge.models.load import load_llava, model_folder, torch_dtype
from lsd_edge.recipe.schema import Recipe
from lsd_edge.train.context import RunContext
from lsd_edge.train.loop import run_stage
from lsd_edge.workspace import is_complete

RETRAIN = "delete it to train a new one, or set run.output_dir to another folder"


def teacher_manifest(recipe: Recipe) -> Manifest:
    """What a trained tiny teacher is tied to: its settings, the data's, the seed, the eval settings and
    the kind of tokenizer it was built with (a teacher of the earlier word-level tokenizer is refused)."""
    r = recipe
    data = settings(r.data) | ({"shapes_format": FORMAT} if r.data.shapes else {})
    return Manifest(
        "the cached teacher in",
        {
            "teacher": settings(r.teacher),
            "data": data,
            "run.seed": r.run.seed,
            "eval": settings(r.eval),
            "tokenizer": TOKENIZER_KIND,
        },
    )


class TeacherSlot:
    """Holds the teacher while stages need it. `folder` is where a trained teacher is cached
    (`<output_dir>/teacher`, or a shared one for ablations)."""

    def __init__(self, ctx: RunContext, folder: Path | None = None):
        self.ctx = ctx
        self.folder = folder or ctx.workspace.teacher
        self.model = None
        self.processor = None
        self.metrics: dict[str, Any] = {}
        self.info: dict[str, Any] = {}  # params, size: kept when the model leaves memory
        self._hash: str | None = None

    @property
    def trained(self) -> bool:
        """True for the embedded default's kind of teacher: built from sizes and trained by the recipe."""
        return self.ctx.recipe.teacher.tiny is not None

    def identity(self) -> str:
        """What stages are tied to: the trained teacher's identity, or the checkpoint it was loaded from."""
        r = self.ctx.recipe
        return teacher_manifest(r).digest if self.trained else r.teacher.path

    def get(self):
        """The teacher model, loaded (or trained) now if it is not in memory."""
        if self.model is None:
            self.load()
        return self.model

    def load(self) -> None:
        """Load (or train and cache) the teacher, frozen in the recipe's teacher dtype; under FSDP its
        decoder layers are then sharded over the processes."""
        ctx = self.ctx
        self._load_or_train()
        self.model = self.model.to(torch_dtype(ctx.recipe.teacher.dtype, ctx.device))
        self.model.requires_grad_(False).eval()
        n = ctx.backend.shard_teacher(self.model)
        if n:
            ctx.reporter.message(f"teacher: {n} decoder layers sharded over {ctx.dist.world} processes")
        size = sum(p.numel() * p.element_size() for p in self.model.parameters()) / 2**20
        self.info = {"params": count_params(self.model)["total"], "size_mb": size}

    def _load_or_train(self) -> None:
        r, ctx = self.ctx.recipe, self.ctx
        if not self.trained:
            ctx.reporter.message(f"loading teacher {r.teacher.path}")
            self.model, self.processor = load_llava(
                r.teacher.path,
                what="teacher.path",
                dtype=r.teacher.dtype,
                device=str(ctx.device),
                trust_remote_code=r.teacher.trust_remote_code,
            )
            return
        if is_complete(self.folder):
            teacher_manifest(r).check(self.folder, RETRAIN)
            ctx.reporter.message(f"reusing the cached teacher in {self.folder}")
            self.model, self.processor = load_llava(
                str(self.folder), what="cached teacher", device=str(ctx.device)
            )
            self.metrics = read_json(self.folder / "metrics.json")
        else:
            self.train()

    def train(self) -> None:
        """Train the tiny teacher with the recipe's [[teacher.stages]] and cache it in `folder`."""
        ctx, r = self.ctx, self.ctx.recipe
        tiny = r.teacher.tiny
        processor = build_tiny_processor(tiny.vision, corpus_texts(r))
        model = build_tiny_model(tiny, processor, seed=r.run.seed).to(ctx.device)
        manifest = teacher_manifest(r)
        if not r.teacher.stages:
            raise LsdEdgeError(
                "teacher.stages: a [teacher.tiny] teacher needs [[teacher.stages]] to train it"
            )
        for i, stage in enumerate(r.teacher.stages):
            folder = ctx.workspace.teacher_stages / stage.name
            key = f"teacher/{stage.name}"
            stage_manifest = Manifest(f"teacher stage '{stage.name}' in", {**manifest.tied_to, "stage": i})
            if is_complete(folder):
                stage_manifest.check(folder, "delete it to train the teacher's stages again")
                model, processor = load_llava(str(folder), what=key, device=str(ctx.device))
                continue
            job = ctx.job(
                key,
                stage,
                i,
                model,
                processor,
                None,
                open_dataset(r, stage, processor),
                r.teacher.gradient_checkpointing,
            )
            res = run_stage(job, ctx.reporter)
            model = res.model
            ctx.save(
                folder,
                model,
                processor,
                {"stage": key, "train": {k: v for k, v in res.__dict__.items() if k != "model"}},
                extra={IDENTITY_FILE: stage_manifest.record()},
                state_dir=job.state_dir,
            )
        metrics = {"eval": ctx.evaluate(model, processor, "teacher"), "params": count_params(model)}
        ctx.save(self.folder, model, processor, metrics, extra={IDENTITY_FILE: manifest.record()})
        if ctx.dist.main:
            shutil.rmtree(ctx.workspace.teacher_stages, ignore_errors=True)
        self.model, self.processor, self.metrics = model, processor, metrics

    def release(self) -> None:
        """Drop the teacher from memory: a stage distilling from a cache does not need it."""
        if self.model is None:
            return
        self.model = None
        gc.collect()
        if self.ctx.device.type == "cuda":
            torch.cuda.empty_cache()

    def files_hash(self) -> str:
        """A hash of the teacher's weight, config and tokenizer files: what caches are tied to."""
        if self._hash is None:
            r = self.ctx.recipe
            folder = self.folder if self.trained else model_folder(r.teacher.path, "teacher.path")
            self._hash = files_hash(folder)
        return self._hash
