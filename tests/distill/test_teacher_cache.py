"""The top-k teacher cache: same losses as the online teacher, staleness refused, no teacher in memory."""

from __future__ import annotations

import copy
import gc
import json
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from lsd_edge.data.dataset import BatchLoader, LlavaDataset
from lsd_edge.distill import losses
from lsd_edge.distill import teacher as teacher_module
from lsd_edge.distill.cache_build import build_cache
from lsd_edge.distill.forward import forward
from lsd_edge.distill.objective import Counts, LatentProjector, loss_terms
from lsd_edge.distill.teacher import OnlineTeacher, online_targets
from lsd_edge.distill.teacher_cache import TeacherCache, cache_manifest, needed_parts
from lsd_edge.errors import LsdEdgeError, RecipeError, TrainingError
from lsd_edge.progress import QuietReporter
from lsd_edge.recipe.load import parse_recipe
from lsd_edge.recipe.schema import StageConfig
from lsd_edge.recipe.toml import dumps_toml
from lsd_edge.train import loop, offline, pipeline
from lsd_edge.train.backends.base import Backend
from lsd_edge.train.context import RunContext
from lsd_edge.train.distributed import Dist
from lsd_edge.train.offline import StageInputs
from lsd_edge.train.pipeline import DistillOptions, distill
from lsd_edge.train.teacher import TeacherSlot
from lsd_edge.workspace import Workspace

from ..helpers import one_red_line, run


def _stage(**loss) -> StageConfig:
    return StageConfig.model_validate(dict(name="dft", kind="dft", max_steps=1, loss=loss))


def _dataset(processor, shapes_dir, **kw):
    return LlavaDataset(shapes_dir / "instruct.json", shapes_dir / "images", processor, **kw)


IDENTITY = {"teacher": "t0", "data": "d0", "max_turns": None, "temperature": 2.0}


def _identity(**changes):
    return cache_manifest({**IDENTITY, **changes})


def _build(tmp_path, processor, shapes_dir, teacher, stage, top_k, name="cache"):
    out = tmp_path / name
    build_cache(
        out,
        _dataset(processor, shapes_dir),
        lambda b: online_targets(teacher, b, need_hidden=False),
        stage="dft",
        identity=_identity(),
        parts=needed_parts(stage),
        top_k=top_k,
        temperature=stage.loss.temperature,
        vocab_rows=len(processor.tokenizer),
        teacher_hidden=32,
        batch_size=6,
        shard_samples=5,  # several shards, and batches that cross them
    )
    return TeacherCache(out)


def _terms_and_grads(student, teacher, batch, stage, vocab):
    student = copy.deepcopy(student)
    torch.manual_seed(0)
    latent = LatentProjector(stage.loss.latent_pairs, 16, 32)
    terms = loss_terms(student, teacher, batch, stage, Counts.of([batch], 4), vocab, latent)
    sum(terms.values()).backward()
    grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    return {k: v.detach() for k, v in terms.items()}, grads


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd", "skew"])
def test_cache_with_every_row_equals_the_online_teacher(
    kind, tmp_path, processor, shapes_dir, tiny_teacher, tiny_student
):
    """k >= V: the cached response/visual KL, relation and projector latent terms (and their
    gradients) are those of the teacher run online, for every KL kind."""
    stage = _stage(
        latent=0.5, latent_pairs=[["projector", "projector"]], kl=kind, temperature=2.0, chunk_size=0
    )
    vocab = len(processor.tokenizer)
    cache = _build(tmp_path, processor, shapes_dir, tiny_teacher, stage, top_k=vocab + 10)
    assert cache.top_k == vocab and cache.manifest["shards"] > 1
    assert set(cache.parts) == {"response", "visual", "relation", "projector"}
    loader = BatchLoader(_dataset(processor, shapes_dir), processor.tokenizer.pad_token_id)
    batch = loader.batch([11, 3, 4, 9, 0, 15, 7])  # out of order, across shards
    online, g_online = _terms_and_grads(tiny_student, OnlineTeacher(tiny_teacher), batch, stage, vocab)
    cached, g_cached = _terms_and_grads(tiny_student, cache, batch, stage, vocab)
    assert online.keys() == cached.keys() == {"ce", "response_kl", "visual_kl", "relation", "latent"}
    for k in online:
        assert torch.allclose(cached[k], online[k], rtol=1e-5, atol=1e-7), k
    assert torch.allclose(g_cached, g_online, rtol=1e-4, atol=1e-7)


def test_cache_top_k_gives_the_sparse_kl_of_the_teacher(
    tmp_path, processor, shapes_dir, tiny_teacher, tiny_student
):
    stage = _stage(temperature=2.0, relation=0.0, visual_kl=0.0)
    cache = _build(tmp_path, processor, shapes_dir, tiny_teacher, stage, top_k=5)
    assert cache.parts == ["response"] and cache.top_k == 5
    mf = cache.manifest
    assert mf["topk_bytes_per_position"] == 8 * 5 + 4 and mf["bytes"] > 0 and mf["positions"]["response"] > 0
    batch = BatchLoader(_dataset(processor, shapes_dir), processor.tokenizer.pad_token_id).batch([2, 8, 13])
    vocab = len(processor.tokenizer)
    got = loss_terms(tiny_student, cache, batch, stage, Counts.of([batch], 4), vocab, None)["response_kl"]
    t = online_targets(tiny_teacher, batch, need_hidden=False)
    target = losses.top_k_targets(t.response.logits(vocab), 5, 2.0, vocab)
    resp = batch.labels[:, 1:] != -100
    s_logits = tiny_student.lm_head(forward(tiny_student, batch).hidden[:, :-1][resp])
    want = (
        losses.sparse_kd_sum(s_logits, target, temperature=2.0, vocab_rows=vocab)
        / Counts.of([batch], 4).response
    )
    # the cache ran the teacher on batches of 6, this on 3: other padding, float noise only
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got.item(), want.item())


def test_stale_or_damaged_cache_is_refused(tmp_path, processor, shapes_dir, tiny_teacher):
    stage = _stage(temperature=2.0)
    cache = _build(tmp_path, processor, shapes_dir, tiny_teacher, stage, top_k=3)
    cache.check(_identity(), ["response", "visual", "relation"])
    with pytest.raises(TrainingError, match=r"stale: max_turns changed .*cache-teacher"):
        cache.check(_identity(max_turns=1), ["response"])
    with pytest.raises(TrainingError, match="teacher's weights changed"):
        cache.check(_identity(teacher="other"), ["response"])
    with pytest.raises(TrainingError, match="holds no projector targets"):
        cache.check(_identity(), ["response", "projector"])
    # a sample whose tokens differ from the ones cached is refused, whatever the manifest says
    other = LlavaDataset(shapes_dir / "pretrain.json", shapes_dir / "images", processor)
    batch = BatchLoader(other, processor.tokenizer.pad_token_id).batch([0, 1])
    with pytest.raises(TrainingError, match="does not match sample"):
        cache.targets(batch)
    with pytest.raises(TrainingError, match="no teacher cache there"):
        TeacherCache(tmp_path / "nowhere")
    ok = BatchLoader(_dataset(processor, shapes_dir), processor.tokenizer.pad_token_id).batch([0, 1])
    ok.indices = [0, len(cache.index)]  # a data set longer than the one cached
    with pytest.raises(TrainingError, match="fewer than the data set"):
        cache.targets(ok)
    ok.indices = [0, 1]
    (cache.folder / "shard-00000" / "resp_logp.npy").write_bytes(b"cut short")
    with pytest.raises(TrainingError, match=r"cannot read resp_logp.npy of shard 0 .*cache-teacher"):
        TeacherCache(cache.folder).targets(ok)
    manifest = json.loads((cache.folder / "manifest.json").read_text())
    (cache.folder / "manifest.json").write_text(json.dumps({**manifest, "format": 0}))
    with pytest.raises(TrainingError, match="teacher cache of another format"):
        TeacherCache(cache.folder)
    (cache.folder / "index.npy").write_bytes(b"garbage")
    with pytest.raises(TrainingError, match="damaged teacher cache"):
        TeacherCache(cache.folder)


def test_blank_teacher_cache_setting_is_refused(recipe_dict):
    with pytest.raises(RecipeError, match=r"teacher_cache: give 'off', 'auto' or the folder"):
        parse_recipe(recipe_dict, overrides=["stages[2].teacher_cache= "])


def test_a_multi_process_run_does_not_make_caches_or_answers(recipe_dict, tmp_path, monkeypatch, processor):
    """Each process would write the same folder (and a sharded teacher needs them all): refused."""
    r = parse_recipe(recipe_dict, overrides=["stages[2].teacher_cache=auto", "stages[1].regenerate=true"])
    ctx = RunContext(
        r, Workspace(tmp_path / "run"), torch.device("cpu"), QuietReporter(), Backend(Dist(0, 2))
    )
    monkeypatch.setattr(offline, "files_hash", lambda path: "h")
    teacher = TeacherSlot(ctx)
    teacher._hash, teacher.processor = "t", processor
    inputs = StageInputs(ctx, teacher)
    with pytest.raises(LsdEdgeError, match=r"2-process run does not make it; run `lsd-edge cache-teacher"):
        inputs.cache(r.stages[2])
    with pytest.raises(LsdEdgeError, match=r"regenerated data of stage 'sft' .* `lsd-edge regenerate"):
        inputs.regenerated(r.stages[1])


def test_cache_needs_projector_pairs_only(recipe_dict):
    with pytest.raises(RecipeError, match=r"latent_pairs: a teacher cache stores projector features only"):
        parse_recipe(recipe_dict, overrides=["stages[2].teacher_cache=auto", "stages[2].loss.latent=1.0"])
    ok = parse_recipe(
        recipe_dict,
        overrides=[
            "stages[2].teacher_cache=auto",
            "stages[2].loss.latent=1.0",
            'stages[2].loss.latent_pairs=[["projector", "projector"]]',
        ],
    )
    assert needed_parts(ok.stages[2]) == ["response", "visual", "relation", "projector"]
    with pytest.raises(
        RecipeError, match=r"stages\[1\].*teacher_cache: a 'sft' stage does not use the teacher"
    ):
        parse_recipe(recipe_dict, overrides=["stages[1].teacher_cache=auto"])


def test_distill_with_a_cache_keeps_no_teacher_in_memory(recipe_dict, monkeypatch):
    r = parse_recipe(
        recipe_dict, overrides=["stages[2].teacher_cache=auto", "stages[2].teacher_cache_top_k=6"]
    )
    seen = {}
    real_teacher_for = StageInputs.teacher_for
    real_online = teacher_module.online_targets
    current = {"stage": None}

    real_run_stage = loop.run_stage
    refs = []

    def spy_teacher_for(self, stage):
        out = real_teacher_for(self, stage)
        current["stage"] = stage.name
        model = self.teacher.model
        seen[stage.name] = (type(out).__name__, model is None)
        if model is not None:
            refs.append(weakref.ref(model))
        return out

    def spy_run_stage(job, reporter):
        if job.key == "dft":
            gc.collect()
            assert refs and all(r() is None for r in refs), "the teacher model is still alive"
        return real_run_stage(job, reporter)

    def spy_online(teacher, batch, need_hidden, *args, **kw):
        assert current["stage"] != "dft", "the teacher ran during the cached stage"
        return real_online(teacher, batch, need_hidden, *args, **kw)

    monkeypatch.setattr(StageInputs, "teacher_for", spy_teacher_for)
    monkeypatch.setattr(teacher_module, "online_targets", spy_online)
    monkeypatch.setattr(pipeline, "run_stage", spy_run_stage)
    report = distill(r)
    assert seen["dpt"] == ("OnlineTeacher", False)
    assert seen["dft"] == ("TeacherCache", True)
    root = Path(r.run.output_dir)
    manifest = root / "teacher-cache" / "dft" / "manifest.json"
    assert json.loads(manifest.read_text())["top_k"] == 6
    metrics = json.loads((root / "dft" / "metrics.json").read_text())
    assert metrics["teacher_cache"]["top_k"] == 6
    assert {"response_kl", "visual_kl", "relation"} <= set(metrics["last_losses"])
    assert report["teacher"]["params"] > report["student"]["params"]
    # a second run of the stage reuses the cache as it is
    stamp = manifest.stat().st_mtime_ns
    shutil.rmtree(root / "dft")
    distill(r, DistillOptions(resume=True))
    assert manifest.stat().st_mtime_ns == stamp
    # another stage setting that moves positions makes it stale: refused, never silently used
    shutil.rmtree(root / "dft")
    stale = parse_recipe(recipe_dict, overrides=["stages[2].teacher_cache=auto", "stages[2].max_samples=20"])
    with pytest.raises(TrainingError, match=r"teacher cache .* is stale: max_samples changed"):
        distill(stale, DistillOptions(resume=True))


def test_explicit_cache_path_must_exist(recipe_dict, tmp_path):
    r = parse_recipe(recipe_dict, overrides=[f"stages[2].teacher_cache={tmp_path / 'none'}"])
    with pytest.raises(LsdEdgeError, match="holds no teacher cache; make it with `lsd-edge cache-teacher"):
        distill(r)
    assert not (tmp_path / "run" / "teacher").exists(), "refused before any training"


def test_cache_teacher_command(tmp_path, monkeypatch, capsys, recipe_dict):
    path = tmp_path / "r.toml"
    path.write_text(dumps_toml(copy.deepcopy(recipe_dict)))
    code, out, err = run(monkeypatch, capsys, "cache-teacher", str(path), "--stage", "dft", "--top-k", "4")
    assert code == 0, err
    assert (
        "teacher cache made" in out and "bytes per cached position" in out and "teacher_cache = 'auto'" in out
    )
    folder = Path(recipe_dict["run"]["output_dir"]) / "teacher-cache" / "dft"
    assert np.load(folder / "index.npy").shape[0] == 64
    code, out, _ = run(monkeypatch, capsys, "cache-teacher", str(path), "--stage", "dft", "--top-k", "4")
    assert code == 0 and "up to date" in out
    for args, needle in (
        (["--stage", "nope"], "no such stage; its stages are dpt, sft, dft"),
        (["--stage", "sft"], "does no distillation"),
    ):
        code, _, err = run(monkeypatch, capsys, "cache-teacher", str(path), *args)
        assert code == 1 and needle in one_red_line(err)
    code, _, err = run(monkeypatch, capsys, "cache-teacher", str(tmp_path / "missing.toml"))
    assert code == 1 and "no such recipe file" in one_red_line(err)
