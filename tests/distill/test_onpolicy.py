"""On-policy distillation (`lsd_edge.distill.onpolicy`): the student's answers written into a
micro-batch, labelled for the KL terms and not for CE, the same draws on every run, and the loss
path over a step that mixes them with the data's answers."""

from __future__ import annotations

import copy

import pytest
import torch

from lsd_edge.data.dataset import BatchLoader, LlavaDataset, TeacherView
from lsd_edge.data.records import parse_record
from lsd_edge.distill.objective import Counts, loss_terms
from lsd_edge.distill.onpolicy import Rollout, slot_rng
from lsd_edge.distill.teacher import OnlineTeacher
from lsd_edge.models.build import build_tiny_model, student_processor
from lsd_edge.models.tokens import IGNORE_INDEX
from lsd_edge.recipe.distill import OnPolicyConfig
from lsd_edge.recipe.schema import StageConfig, TinyConfig


def _dataset(shapes_dir, processor, view=None):
    return LlavaDataset(shapes_dir / "instruct.json", shapes_dir / "images", processor, teacher_view=view)


def _rollout(model, processor, ds, lmbda=1.0, temperature=0.0, max_new_tokens=4, seed=0):
    op = OnPolicyConfig(lmbda=lmbda, temperature=temperature, max_new_tokens=max_new_tokens)
    return Rollout(model, processor, ds, op, seed, 2, torch.device("cpu"))


def _answer_text(processor, batch, row: int) -> str:
    ids = batch.labels[row][batch.labels[row] != IGNORE_INDEX]
    return processor.tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_the_students_answer_becomes_the_kl_labels_and_carries_no_ce(shapes_dir, processor, tiny_student):
    ds = _dataset(shapes_dir, processor)
    data = BatchLoader(ds, processor.tokenizer.pad_token_id).batch([0, 1, 2])
    r = _rollout(tiny_student, processor, ds)
    (own,) = r.apply([data], step=0, slot_ids=[0])
    assert own.own.tolist() == [True, True, True] and own.indices == data.indices
    for row, index in enumerate(data.indices):
        messages, files = parse_record(ds.records[index])
        (answer,) = r.answer(messages, ds.pixels(files), slot_rng(0, 0, 0, 0))  # greedy: any draw
        assert _answer_text(processor, own, row) == answer
    assert (own.ce_labels == IGNORE_INDEX).all() and torch.equal(data.ce_labels, data.labels)
    counts = Counts.of([own, data], 4)
    assert counts.labelled == Counts.of([data], 4).labelled > 0
    assert counts.response == Counts.of([own], 4).response + counts.labelled


def test_generation_puts_the_students_mode_back(shapes_dir, processor, tiny_student):
    model = copy.deepcopy(tiny_student).train()
    ds = _dataset(shapes_dir, processor)
    r = _rollout(model, processor, ds)
    assert model.training
    r.apply([BatchLoader(ds, processor.tokenizer.pad_token_id).batch([0])], step=0, slot_ids=[0])
    assert model.training


def test_an_edge_student_batch_keeps_the_teachers_view(shapes_dir, processor, tiny_teacher):
    """Rewritten samples are encoded by the data set's own code: the teacher's view holds the same
    answer (its labels) with its own visual tokens and pixels."""
    small = student_processor(processor, type("S", (), {"image_size": 8})())
    ds = _dataset(shapes_dir, small, TeacherView(processor.image_processor, 4))
    data = BatchLoader(ds, processor.tokenizer.pad_token_id).batch([0, 1])
    tiny = TinyConfig(
        hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32, vision="teacher"
    )
    model = build_tiny_model(tiny, small, vision_from=tiny_teacher, image_size=8)
    (own,) = _rollout(model, small, ds).apply([data], step=0, slot_ids=[0])
    tb = own.teacher
    assert own.own.all() and own.visual_mask.sum() == 2 and tb.visual_mask.sum() == 8
    assert tb.pixel_values.shape[-1] == 16 and own.pixel_values.shape[-1] == 8
    assert torch.equal(own.labels[own.labels != -100], tb.labels[tb.labels != -100])


def test_draws_are_a_pure_function_of_seed_stage_step_and_slot(shapes_dir, processor, tiny_student):
    ds = _dataset(shapes_dir, processor)
    loader = BatchLoader(ds, processor.tokenizer.pad_token_id)
    slots = [loader.batch([0, 1, 2, 3]), loader.batch([4, 5, 6, 7])]

    def run(seed):
        r = _rollout(
            copy.deepcopy(tiny_student),
            processor,
            ds,
            lmbda=0.5,
            temperature=1.0,
            max_new_tokens=6,
            seed=seed,
        )
        return [r.apply(slots, step, [0, 1]) for step in range(6)]

    def seen(run):
        return [(bx.own is not None, bx.input_ids.tolist()) for x in run for bx in x]

    a = seen(run(0))
    assert a == seen(run(0))
    drawn = [on for on, _ in a]
    assert any(drawn) and not all(drawn), "lmbda = 0.5 draws both kinds over 12 micro-batches"
    assert a != seen(run(1)), "another run seed draws other micro-batches and samples other answers"


def test_the_loss_on_a_mixed_step(shapes_dir, processor, tiny_teacher, tiny_student):
    """CE reads the data's answers only, over the step's labelled count; the response KL reads both
    micro-batches over their joint count, and trains the student (its gradient is not zero)."""
    ds = _dataset(shapes_dir, processor)
    data = BatchLoader(ds, processor.tokenizer.pad_token_id).batch([0, 1, 2, 3])
    student = copy.deepcopy(tiny_student).train()
    (own,) = _rollout(student, processor, ds).apply([data], step=0, slot_ids=[0])
    stage = StageConfig.model_validate(
        dict(name="dft", kind="dft", max_steps=1, batch_size=4, on_policy={"lmbda": 1.0})
    )
    counts = Counts.of([own, data], 4)
    vocab, teacher = len(processor.tokenizer), OnlineTeacher(tiny_teacher)
    t_own = loss_terms(student, teacher, own, stage, counts, vocab, None)
    t_data = loss_terms(student, teacher, data, stage, counts, vocab, None)
    alone = loss_terms(student, teacher, data, stage, Counts.of([data], 4), vocab, None)
    assert t_own["ce"].item() == 0.0
    torch.testing.assert_close(t_data["ce"], alone["ce"])  # CE's count is the data's answers alone
    # the response KL's count is both micro-batches' answers
    torch.testing.assert_close(
        t_data["response_kl"] * counts.response, alone["response_kl"] * alone_count(data)
    )
    t_own["response_kl"].backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def alone_count(batch) -> int:
    return Counts.of([batch], 4).response


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(kind="sft"), "on_policy: a 'sft' stage has no teacher to score the student's answers"),
        (
            dict(teacher_cache="auto"),
            "on_policy: a teacher cache cannot hold targets for answers not yet written",
        ),
        (dict(loss={"response_kl": 0.0}), "on_policy: loss.response_kl is 0"),
        (dict(on_policy={"lmbda": 0.0}), "lmbda"),
    ],
)
def test_on_policy_settings_are_checked_at_load(settings, match):
    base = dict(name="x", kind="dft", max_steps=1, on_policy={})
    with pytest.raises(ValueError, match=match):
        StageConfig.model_validate({**base, **settings})


def test_on_policy_combines_with_regenerated_answers():
    """The other micro-batches then train on the teacher's answers (GKD's mix); greedy is temperature 0."""
    st = StageConfig.model_validate(
        dict(name="x", kind="dft", max_steps=1, regenerate=True, on_policy={"temperature": 0.0})
    )
    assert st.regenerate and st.on_policy == OnPolicyConfig(lmbda=0.5, temperature=0.0, max_new_tokens=64)
