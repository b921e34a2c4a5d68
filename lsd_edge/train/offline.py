"""The teacher's offline work for a stage: answers it regenerates (LLaVADI) and top-k caches of its
targets, each made once, tied to what made it, and refused when stale; plus the `lsd-edge
cache-teacher` and `lsd-edge regenerate` commands that make them ahead of a run.

A stage trains on its recipe data set, or on the teacher's answers to it (`regenerate = true`), and
distils from the teacher model, or from a cache (`teacher_cache`), in which case the teacher leaves
memory for the stage. Where the student sees with another visual grid than the teacher, a distilling
stage's data carries the teacher's view and its teacher pools onto the student's grid (`sight`);
where it has another tokenizer, the view is the teacher's own tokenization and the online teacher
scores across the two vocabularies (a cache is refused).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lsd_edge.data.batch import Batch
from lsd_edge.data.prepare import open_dataset, prepare_data
from lsd_edge.distill import losses
from lsd_edge.distill.cache_build import build_cache
from lsd_edge.distill.grid import GridMap
from lsd_edge.distill.regenerate import regenerate
from lsd_edge.distill.teacher import OnlineTeacher, Teacher, online_targets
from lsd_edge.distill.teacher_cache import TeacherCache, cache_manifest, needed_parts
from lsd_edge.errors import LsdEdgeError
from lsd_edge.files import atomic_dir, files_hash, read_json, write_json
from lsd_edge.identity import Manifest
from lsd_edge.models.load import resolve_device
from lsd_edge.models.tokens import same_vocabulary
from lsd_edge.progress import QuietReporter, Reporter
from lsd_edge.recipe.schema import DISTILLING_KINDS, Recipe, StageConfig
from lsd_edge.train.context import RunContext
from lsd_edge.train.setup import autocast, pick_stage
from lsd_edge.train.sight import check_cross_tokenizer, grid_map, teacher_view, visual_grid, vocab_map
from lsd_edge.train.student import student_processor_of
from lsd_edge.train.teacher import TeacherSlot
from lsd_edge.workspace import Workspace


def missing_cache(stage: StageConfig) -> LsdEdgeError:
    return LsdEdgeError(
        f"stage '{stage.name}': teacher_cache = '{stage.teacher_cache}' holds no teacher cache; make it "
        f"with `lsd-edge cache-teacher RECIPE --stage {stage.name}` or set teacher_cache = 'auto'"
    )


def check_cache_paths(stages: list[StageConfig]) -> None:
    """A cache folder named in the recipe must be there before hours of earlier stages run."""
    for st in stages:
        if (
            st.cached
            and st.teacher_cache != "auto"
            and not (Path(st.teacher_cache) / "manifest.json").is_file()
        ):
            raise missing_cache(st)


class StageInputs:
    """What each stage trains on and distils from, made on first use."""

    def __init__(self, ctx: RunContext, teacher: TeacherSlot, student_processor=None):
        self.ctx = ctx
        self.teacher = teacher
        self._student_processor = student_processor
        self._data: dict[str, tuple[Path, Path | None]] = {}

    @property
    def student_processor(self):
        """The student's processor (the run's; built from the recipe for the offline commands)."""
        if self._student_processor is None:
            self._student_processor = student_processor_of(
                self.ctx.recipe, lambda: self.teacher.get(), self.teacher_processor()
            )
        return self._student_processor

    def grid(self, stage: StageConfig) -> GridMap | None:
        """How the teacher's visual positions map onto the student's for this stage (None: equal grids)."""
        return grid_map(self.teacher_processor(), self.student_processor, stage.loss.temperature)

    def vocab(self, stage: StageConfig):
        """How the teacher's vocabulary meets the student's for this stage (None: one vocabulary)."""
        return vocab_map(self.teacher_processor(), self.student_processor, stage)

    # -- the data a stage trains on

    def source_data(self, stage: StageConfig) -> tuple[Path, Path | None]:
        return self.ctx.recipe.data.resolve(self.ctx.recipe.data.dataset(stage.data))

    def data(self, stage: StageConfig) -> tuple[Path, Path | None]:
        """The recipe's file, or the teacher's answers to it (made once)."""
        if not stage.regenerate:
            return self.source_data(stage)
        # Checked once per run (it hashes the data); only student stages regenerate, so names are unique.
        if stage.name not in self._data:
            self._data[stage.name] = (Path(self.regenerated(stage)["path"]), self.source_data(stage)[1])
        return self._data[stage.name]

    def dataset(self, stage: StageConfig, processor):
        """The stage's data as `processor` encodes it; a distilling stage's with the teacher's view
        where the teacher sees the images otherwise."""
        view = teacher_view(self.teacher_processor(), processor) if stage.distills else None
        return open_dataset(self.ctx.recipe, stage, processor, self.data(stage), view)

    def regenerated_manifest(self, stage: StageConfig) -> Manifest:
        src, images = self.source_data(stage)
        return Manifest(
            "the regenerated answers in",
            {
                "teacher": self.teacher.files_hash(),
                "data": files_hash(src),
                "images": str(images),
                "max_samples": stage.max_samples,
                "max_turns": stage.max_turns,
                "max_new_tokens": stage.regenerate_max_new_tokens,
            },
            {"teacher": "the teacher's weights", "data": "the data file", "images": "the image folder"},
        )

    def regenerated(self, stage: StageConfig, remake: bool = False, force: bool = False) -> dict[str, Any]:
        """The summary of the stage's regenerated data, made when missing. A folder made with other
        settings is refused, or made again when `remake` (the `regenerate` command); `force` remakes any."""
        folder = self.ctx.workspace.regenerated(stage.name)
        manifest = self.regenerated_manifest(stage)
        if (folder / "manifest.json").is_file() and not force:
            if manifest.matches(folder):
                return {
                    **read_json(folder / "manifest.json"),
                    "path": str(folder / "data.json"),
                    "built": False,
                }
            if not remake:
                manifest.check(
                    folder,
                    f"make them again with `lsd-edge regenerate RECIPE --stage {stage.name}` or delete the folder",
                )
        self.refuse_multi_process(f"the regenerated data of stage '{stage.name}'", "regenerate", stage.name)
        src, images = self.source_data(stage)
        with atomic_dir(folder) as tmp:
            summary = regenerate(
                self.teacher.get(),
                self.teacher.processor,
                src,
                images,
                tmp / "data.json",
                max_samples=stage.max_samples,
                max_turns=stage.max_turns,
                max_new_tokens=stage.regenerate_max_new_tokens,
                batch_size=self.ctx.recipe.eval.batch_size,
                reporter=self.ctx.reporter,
            )
            made = {"stage": stage.name, "source": str(src), **summary.as_dict()}
            write_json(tmp / "manifest.json", made)
            manifest.write(tmp)
        self._data.pop(stage.name, None)
        return {**made, "path": str(folder / "data.json"), "built": True}

    # -- the teacher a stage distils from

    def cache_folder(self, stage: StageConfig) -> Path:
        if stage.teacher_cache in ("off", "auto"):
            return self.ctx.workspace.teacher_cache(stage.name)
        return Path(stage.teacher_cache)

    def cache_manifest(self, stage: StageConfig) -> Manifest:
        """Everything that decides a cache's content apart from k: teacher, data, positions, T, and
        the student's grid where it is not the teacher's (its rows are pooled onto it)."""
        data, images = self.data(stage)
        grid = self.grid(stage)
        sight = {}
        if grid is not None:
            sight["student_grid"] = "x".join(map(str, visual_grid(self.student_processor, "the student")))
        return cache_manifest(
            {
                **sight,
                "teacher": self.teacher.files_hash(),
                "data": files_hash(data),
                "images": str(images),
                "max_length": self.ctx.recipe.data.max_length,
                "max_samples": stage.max_samples,
                "max_turns": stage.max_turns,
                "temperature": stage.loss.temperature,
                "vocab_rows": len(self.teacher_processor().tokenizer),
            }
        )

    def teacher_processor(self):
        if self.teacher.processor is None:
            self.teacher.get()
        return self.teacher.processor

    def cache(
        self, stage: StageConfig, remake: bool = False, top_k: int | None = None, force: bool = False
    ) -> tuple[TeacherCache, bool]:
        """The stage's teacher cache and whether it was made now. Distilling (`remake` False) makes a
        missing 'auto' cache and refuses a stale one; the `cache-teacher` command (`remake`) makes a
        missing or stale one again, or one with another k when `top_k` is given; `force` always."""
        if not same_vocabulary(self.teacher_processor().tokenizer, self.student_processor.tokenizer):
            check_cross_tokenizer(stage, cached=True)
        folder = self.cache_folder(stage)
        identity, parts = self.cache_manifest(stage), needed_parts(stage)
        vocab_rows = identity.tied_to["vocab_rows"]
        if (folder / "manifest.json").is_file() and not force:
            cache = TeacherCache(folder)
            fresh = not cache.problems(identity, parts)
            if fresh and (top_k is None or min(top_k, vocab_rows) == cache.top_k):
                return cache, False
            if not remake:
                cache.check(identity, parts)
        elif not remake and stage.teacher_cache != "auto":
            raise missing_cache(stage)
        self.refuse_multi_process(f"the teacher cache of stage '{stage.name}'", "cache-teacher", stage.name)
        model, device, precision = self.teacher.get(), self.ctx.device, self.ctx.recipe.run.precision

        grid = self.grid(stage)

        def online(batch: Batch) -> losses.TeacherTargets:
            with autocast(device, precision):
                return online_targets(model, batch, need_hidden=False, grid=grid)

        build_cache(
            folder,
            self.dataset(stage, self.student_processor if grid is not None else self.teacher.processor),
            online,
            stage=stage.name,
            identity=identity,
            parts=parts,
            top_k=top_k or stage.teacher_cache_top_k,
            temperature=stage.loss.temperature,
            vocab_rows=vocab_rows,
            teacher_hidden=model.config.text_config.hidden_size,
            teacher_vision_hidden=OnlineTeacher(model).vision_hidden_size,
            device=device,
            batch_size=stage.batch_size,
            policy=self.ctx.recipe.data.bad_samples,
            reporter=self.ctx.reporter,
        )
        return TeacherCache(folder), True

    def teacher_for(self, stage: StageConfig) -> Teacher | None:
        """What a stage distils from: the teacher model, or its cache (and then the teacher leaves memory)."""
        if not stage.distills:
            return None
        if not stage.cached:
            return OnlineTeacher(self.teacher.get(), self.grid(stage), self.vocab(stage))
        cache, _ = self.cache(stage)
        self.teacher.release()
        self.ctx.reporter.message(
            f"stage {stage.name}: distilling from the teacher cache {cache.folder} (top-{cache.top_k}); "
            "the teacher is not in memory"
        )
        return cache

    def refuse_multi_process(self, what: str, command: str, stage: str) -> None:
        # Every process would write the same folder, and a sharded teacher needs all of them in each
        # forward; one process makes it once, before the launch.
        dist = self.ctx.dist
        if dist.active:
            raise LsdEdgeError(
                f"{what} is missing or stale and a {dist.world}-process run does not make it; run "
                f"`lsd-edge {command} RECIPE --stage {stage}` in one process first, then launch again"
            )


# ------------------------------------------------------------------------------ the offline commands


def offline_inputs(recipe: Recipe, reporter: Reporter | None = None) -> StageInputs:
    """A run set up for work on the teacher's side only: data prepared, teacher loaded (or trained)."""
    reporter = reporter or QuietReporter()
    if recipe.run.num_threads:
        torch.set_num_threads(recipe.run.num_threads)
    torch.manual_seed(recipe.run.seed)
    ctx = RunContext(recipe, Workspace(recipe.output_dir), resolve_device(recipe.run.device), reporter)
    ctx.workspace.root.mkdir(parents=True, exist_ok=True)
    prepare_data(recipe, reporter)
    teacher = TeacherSlot(ctx)
    teacher.load()
    return StageInputs(ctx, teacher)


def cache_teacher(
    recipe: Recipe,
    stage_name: str,
    top_k: int | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """`lsd-edge cache-teacher`: make (or find up to date) a stage's top-k teacher cache."""
    stage = pick_stage(recipe, stage_name)
    if stage.kind not in DISTILLING_KINDS or not stage.distills:
        raise LsdEdgeError(
            f"--stage {stage_name}: a '{stage.kind}' stage does no distillation, so it has no use for a "
            "teacher cache; pick a dpt or dft stage"
        )
    inputs = offline_inputs(recipe, reporter)
    cache, built = inputs.cache(stage, remake=True, top_k=top_k, force=force)
    return {"folder": str(cache.folder), "built": built, "used_by_stage": stage.cached, **cache.manifest}


def regenerate_data(
    recipe: Recipe, stage_name: str, force: bool = False, reporter: Reporter | None = None
) -> dict[str, Any]:
    """`lsd-edge regenerate`: make (or find up to date) a stage's teacher-answered data."""
    stage = pick_stage(recipe, stage_name)
    inputs = offline_inputs(recipe, reporter)
    return {"used_by_stage": stage.regenerate, **inputs.regenerated(stage, remake=True, force=force)}
