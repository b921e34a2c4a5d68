"""Loss terms over the batch compositions real data makes: micro-batches without images, samples with
several images, steps split unevenly; with the online teacher and with a teacher cache.

A step's gradient must not depend on how its samples fall into micro-batches (METHOD.md: normalise
by the counts of the whole accumulated batch), even when one micro-batch holds no image at all.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lsd_edge.data.dataset import BatchLoader, LlavaDataset
from lsd_edge.distill import losses
from lsd_edge.distill.cache_build import build_cache
from lsd_edge.distill.forward import forward
from lsd_edge.distill.objective import Counts, LatentProjector, loss_terms
from lsd_edge.distill.teacher import OnlineTeacher, online_targets
from lsd_edge.distill.teacher_cache import TeacherCache, cache_manifest, needed_parts
from lsd_edge.errors import TrainingError
from lsd_edge.progress import QuietReporter
from lsd_edge.recipe.schema import RunConfig, StageConfig
from lsd_edge.train.loop import StageJob, run_stage
from lsd_edge.workspace import Workspace

K = 4
Q = {"from": "human", "value": "<image>\nwhat color is the circle ?"}


def _rec(i: int, images: int) -> dict:
    if images == 0:
        conv = [{"from": "human", "value": "how many shapes ?"}, {"from": "gpt", "value": "two"}]
        return {"id": f"t{i}", "conversations": conv}
    text = " ".join(["<image>"] * images) + "\nwhat color is the circle ?"
    return {
        "id": f"i{i}",
        "image": [f"{(i + j) % 3}.png" for j in range(images)],
        "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "red"}],
    }


@pytest.fixture
def mixed(tmp_path, processor):
    """Samples 0-1 with one image, 2-3 text-only, 4 with two images, 5 text-only, 6 with three."""
    from PIL import Image

    d = tmp_path / "img"
    d.mkdir()
    for i, c in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        Image.new("RGB", (16, 16), c).save(d / f"{i}.png")
    recs = [_rec(i, n) for i, n in enumerate([1, 1, 0, 0, 2, 0, 3])]
    (tmp_path / "mixed.json").write_text(json.dumps(recs))
    return LlavaDataset(tmp_path / "mixed.json", d, processor)


def _stage(**loss) -> StageConfig:
    full = {"latent": 1.0, "latent_kind": "mse", "latent_pairs": [["projector", "projector"], [-1, -1]]}
    return StageConfig.model_validate(dict(name="dft", kind="dft", max_steps=1, loss={**full, **loss}))


def _grads(student, teacher, batches, stage, vocab):
    """Terms summed over micro-batches and the gradient of the step, from a fresh copy of the student."""
    m = copy.deepcopy(student)
    torch.manual_seed(0)
    latent = LatentProjector(stage.loss.latent_pairs, 16, 32)
    counts = Counts.of(batches, K)
    sums: dict[str, float] = {}
    for b in batches:
        terms = loss_terms(m, teacher, b, stage, counts, vocab, latent)
        sum(terms.values()).backward()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
    params = list(m.parameters()) + list(latent.parameters())
    return sums, torch.cat([p.grad.flatten() for p in params if p.grad is not None])


def _cache(tmp_path, dataset, teacher, stage, vocab) -> TeacherCache:
    build_cache(
        tmp_path / "cache",
        dataset,
        lambda b: online_targets(teacher, b, need_hidden=False),
        stage="dft",
        identity=cache_manifest({"teacher": "t"}),
        parts=needed_parts(stage),
        top_k=vocab,
        temperature=1.0,
        vocab_rows=vocab,
        teacher_hidden=32,
        batch_size=2,  # cache batches without images, too
    )
    return TeacherCache(tmp_path / "cache")


@pytest.mark.parametrize("mode", ["online", "cache"])
@pytest.mark.parametrize(
    "split", [[[0, 1, 4, 6], [2, 3, 5]], [[2], [0, 1, 3], [4, 5, 6]], [[2, 3], [5], [0, 1, 4, 6]]]
)
def test_a_micro_batch_without_images_leaves_the_step_unchanged(
    mixed, processor, tiny_teacher, tiny_student, tmp_path, mode, split
):
    """Micro-batches that hold no image (text-only samples) give the step the gradient of the whole
    batch in one piece: the visual terms come from the others, CE and response KL from all."""
    vocab = len(processor.tokenizer)
    pairs = None if mode == "online" else [["projector", "projector"]]
    stage = _stage(**({} if pairs is None else {"latent_pairs": pairs}))
    teacher = (
        OnlineTeacher(tiny_teacher)
        if mode == "online"
        else _cache(tmp_path, mixed, tiny_teacher, stage, vocab)
    )
    loader = BatchLoader(mixed, processor.tokenizer.pad_token_id)
    whole_terms, whole = _grads(tiny_student, teacher, [loader.batch(list(range(7)))], stage, vocab)
    parts = [loader.batch(idx) for idx in split]
    assert any(b.pixel_values is None for b in parts), "the split has a micro-batch without images"
    split_terms, split_grads = _grads(tiny_student, teacher, parts, stage, vocab)
    assert set(whole_terms) == set(split_terms) == {"ce", "response_kl", "visual_kl", "relation", "latent"}
    for k in whole_terms:
        assert split_terms[k] == pytest.approx(whole_terms[k], rel=1e-4, abs=1e-6), k
    assert torch.allclose(whole, split_grads, rtol=1e-4, atol=1e-6)


def test_text_only_micro_batch_has_only_the_text_terms(mixed, processor, tiny_teacher, tiny_student):
    loader = BatchLoader(mixed, processor.tokenizer.pad_token_id)
    text, images = loader.batch([2, 3, 5]), loader.batch([0, 4])
    counts = Counts.of([text, images], K)
    assert (counts.images, counts.visual) == (3, 3 * K)
    terms = loss_terms(
        tiny_student, OnlineTeacher(tiny_teacher), text, _stage(), counts, len(processor.tokenizer), None
    )
    assert set(terms) == {"ce", "response_kl"}
    t = online_targets(tiny_teacher, text, need_hidden=False)
    assert t.visual_tokens is None and t.image_features is None and len(t.visual) == 0


def test_relation_of_a_multi_image_sample_is_each_image_s_own(mixed, processor, tiny_teacher, tiny_student):
    """Two images in one sample: RDist compares each image's K x K matrix, never one 2K x 2K matrix."""
    loader = BatchLoader(mixed, processor.tokenizer.pad_token_id)
    batch = loader.batch([4])
    assert batch.pixel_values.shape[0] == 2 and int(batch.visual_mask.sum()) == 2 * K
    stage = _stage(response_kl=0.0, visual_kl=0.0, latent=0.0)
    terms = loss_terms(
        tiny_student,
        OnlineTeacher(tiny_teacher),
        batch,
        stage,
        Counts.of([batch], K),
        len(processor.tokenizer),
        None,
    )
    with torch.no_grad():
        s, t = forward(tiny_student, batch), forward(tiny_teacher, batch)
    sv, tv = s.hidden[batch.visual_mask], t.hidden[batch.visual_mask]
    each = [
        losses.relation_sum(sv[i * K : (i + 1) * K][None], tv[i * K : (i + 1) * K][None]) for i in range(2)
    ]
    assert float(terms["relation"].detach()) == pytest.approx(float(sum(each)) / 2, rel=1e-5)


def _job(dataset, student, tmp_path, **stage) -> StageJob:
    (tmp_path / "run").mkdir(exist_ok=True)
    st = StageConfig.model_validate(
        {"name": "sft", "kind": "sft", "lr": 1e-3, "max_steps": 3, "batch_size": 1, **stage}
    )
    return StageJob(
        key="sft",
        stage=st,
        index=0,
        model=copy.deepcopy(student),
        processor=dataset.encoder.processor,
        teacher=None,
        dataset=dataset,
        run=RunConfig(checkpoint_every=0),
        bad_samples="skip",
        workspace=Workspace(tmp_path / "run"),
        device=torch.device("cpu"),
    )


def test_a_step_whose_samples_are_all_bad_is_not_a_step(tmp_path, processor, tiny_student, mixed):
    recs = json.loads(mixed.path.read_text())
    bad = {"id": "bad", "image": "missing.png", "conversations": recs[0]["conversations"]}
    (tmp_path / "some-bad.json").write_text(json.dumps([bad, bad | {"id": "bad2"}, recs[2], recs[0]]))
    ds = LlavaDataset(tmp_path / "some-bad.json", mixed.image_dir, processor)
    res = run_stage(_job(ds, tiny_student, tmp_path, max_steps=4), QuietReporter())
    assert res.steps == 4 and res.bad_samples["by_reason"] == {"missing image": 2}
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["tokens"] > 0 for r in log)


def test_a_data_set_without_a_usable_sample_stops_with_one_line(tmp_path, processor, tiny_student, mixed):
    recs = json.loads(mixed.path.read_text())
    bad = {"id": "bad", "image": "missing.png", "conversations": recs[0]["conversations"]}
    (tmp_path / "all-bad.json").write_text(json.dumps([bad, bad | {"id": "bad2"}, bad | {"id": "bad3"}]))
    ds = LlavaDataset(tmp_path / "all-bad.json", mixed.image_dir, processor)
    with pytest.raises(
        TrainingError,
        match=r"^sft: no usable sample in 3 samples in a row of .*all-bad\.json \(3 missing image",
    ):
        run_stage(_job(ds, tiny_student, tmp_path, grad_accum=1), QuietReporter())


@pytest.mark.parametrize("chunk", [0, 5])
def test_a_micro_batch_without_response_tokens_adds_only_its_visual_terms(
    mixed, processor, tiny_teacher, tiny_student, chunk
):
    loader = BatchLoader(mixed, processor.tokenizer.pad_token_id)
    silent, other = loader.batch([0, 4]), loader.batch([1, 2])
    silent.labels.fill_(-100)  # as if every answer were cut away
    stage = _stage(chunk_size=chunk)
    counts = Counts.of([silent, other], K)
    vocab = len(processor.tokenizer)
    terms = loss_terms(
        copy.deepcopy(tiny_student), OnlineTeacher(tiny_teacher), silent, stage, counts, vocab, None
    )
    assert float(terms["ce"].detach()) == 0.0 and float(terms["response_kl"].detach()) == 0.0
    assert all(torch.isfinite(v) for v in terms.values()) and float(terms["visual_kl"].detach()) > 0
    sum(terms.values()).backward()
