"""The teacher side of a micro-batch (`online_targets`): as today where the teacher sees as the
student does, and pooled onto the student's grid where it sees with another one."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from lsd_edge.data.dataset import BatchLoader, LlavaDataset, TeacherView, regrid
from lsd_edge.distill.forward import forward
from lsd_edge.distill.grid import GridMap, overlap_matrix
from lsd_edge.distill.teacher import online_targets
from lsd_edge.models.build import student_processor


def _batch(shapes_dir, processor, view=None):
    ds = LlavaDataset(shapes_dir / "instruct.json", shapes_dir / "images", processor, teacher_view=view)
    return BatchLoader(ds, processor.tokenizer.pad_token_id).batch([0, 1, 2])


def test_regrid_replaces_each_images_run_and_keeps_the_text():
    ids = torch.tensor([5, 9, 9, 9, 9, 6, 9, 9, 9, 9, 7])
    labels = torch.tensor([-100] * 10 + [7])
    new_ids, new_labels = regrid(ids, labels, 9, 4, 2)
    assert new_ids.tolist() == [5, 9, 9, 6, 9, 9, 7] and new_labels.tolist() == [-100] * 6 + [7]
    assert regrid(ids, labels, 9, 4, 4)[0].tolist() == ids.tolist()
    assert regrid(torch.tensor([9, 9, 1]), torch.tensor([-100, -100, 1]), 9, 1, 3)[0].tolist() == [
        9,
        9,
        9,
        9,
        9,
        9,
        1,
    ]


def test_a_view_that_sees_as_the_student_gives_todays_targets_bit_for_bit(
    shapes_dir, processor, tiny_teacher
):
    plain = _batch(shapes_dir, processor)
    viewed = dataclasses.replace(plain, teacher=dataclasses.replace(plain))
    a = online_targets(tiny_teacher, plain, need_hidden=True)
    b = online_targets(tiny_teacher, viewed, need_hidden=True, grid=None)
    assert torch.equal(a.response.hidden, b.response.hidden) and torch.equal(a.visual.hidden, b.visual.hidden)
    assert torch.equal(a.visual_tokens, b.visual_tokens) and torch.equal(a.image_features, b.image_features)
    assert all(torch.equal(x, y) for x, y in zip(a.hidden_states, b.hidden_states, strict=True))
    assert torch.equal(a.vision_features, b.vision_features)


def test_targets_pooled_onto_a_smaller_grid_match_a_plain_reference(shapes_dir, processor, tiny_teacher):
    """Teacher 2 x 2 (16 px), student 1 x 1 (8 px): the visual target is the mean of the teacher's four
    distributions (probability space, at T), the tokens, features and visual hidden states their mean,
    the text positions' states the teacher's own."""
    small = student_processor(processor, type("S", (), {"image_size": 8})())
    batch = _batch(shapes_dir, small, TeacherView(processor.image_processor, 4))
    tb = batch.teacher
    assert batch.visual_mask.sum() == 3 and tb.visual_mask.sum() == 12 and tb.pixel_values.shape[-1] == 16
    T, rows = 2.0, len(processor.tokenizer)
    grid = GridMap(overlap_matrix((2, 2), (1, 1)), T, rows)
    t = online_targets(tiny_teacher, batch, need_hidden=True, grid=grid)
    with torch.no_grad():
        ref = forward(tiny_teacher, tb, hidden_states=True)
        logits = tiny_teacher.lm_head(ref.hidden[tb.visual_mask])[:, :rows].double()
        mix = F.softmax(logits / T, -1).view(3, 4, -1).mean(1)
    torch.testing.assert_close(t.visual.logp.double().exp(), mix, rtol=1e-5, atol=1e-7)
    vis = ref.hidden[tb.visual_mask].view(3, 4, -1)
    torch.testing.assert_close(t.visual_tokens, vis.mean(1, keepdim=True))
    torch.testing.assert_close(t.image_features, ref.image_features.mean(1, keepdim=True))
    torch.testing.assert_close(t.vision_features, ref.vision_features.mean(1, keepdim=True))
    text_s = batch.attention_mask.bool() & ~batch.visual_mask
    text_t = tb.attention_mask.bool() & ~tb.visual_mask
    for laid, h in zip(t.hidden_states, ref.hidden_states, strict=True):
        assert laid.shape[:2] == batch.input_ids.shape
        assert torch.equal(laid[text_s], h[text_t])
        torch.testing.assert_close(laid[batch.visual_mask], h[tb.visual_mask].view(3, 4, -1).mean(1))
    # the response positions are the same tokens in both views
    assert torch.equal(batch.labels[batch.labels != -100], tb.labels[tb.labels != -100])


def test_a_teacher_with_another_tokenizer_reads_its_own_tokens_and_scores_across_vocabularies(
    shapes_dir, processor, tiny_teacher
):
    """The student speaks a word-level tokenizer, the teacher the tiny BPE: the teacher's view is the
    record in its own tokens (its pad and image ids), the response targets are taken at the answer
    tokens both start at the same character, in the same order, and score themselves by ULD."""
    from lsd_edge.data.chat import ChatEncoder
    from lsd_edge.data.records import read_records
    from lsd_edge.distill import losses
    from lsd_edge.distill.cross_vocab import CrossTargets, VocabMap
    from lsd_edge.models.build import with_own_tokenizer

    texts = [t["value"] for r in read_records(shapes_dir / "instruct.json") for t in r["conversations"]]
    words = with_own_tokenizer(processor, "word", texts)
    batch = _batch(shapes_dir, words, TeacherView(processor.image_processor, 4, ChatEncoder(processor)))
    tb = batch.teacher
    assert tb.visual_mask.sum() == batch.visual_mask.sum() == 12
    assert torch.equal(tb.input_ids[tb.visual_mask], torch.full((12,), processor.image_token_id))
    # every student answer word has a teacher token starting at the same character: the same words
    s_words = words.tokenizer.convert_ids_to_tokens(batch.input_ids[batch.kd].tolist())
    t_words = processor.tokenizer.convert_ids_to_tokens(tb.input_ids[tb.kd].tolist())
    assert [w.lstrip("Ġ") for w in t_words] == s_words and "<|im_end|>" in s_words
    assert batch.kd_positions.sum() == tb.kd_positions.sum() == len(s_words)
    vmap = VocabMap.between(processor.tokenizer, words.tokenizer, "uld")
    t = online_targets(tiny_teacher, batch, need_hidden=False, vocab=vmap)
    assert isinstance(t.response, CrossTargets) and isinstance(t.visual, CrossTargets)
    with torch.no_grad():
        ref = forward(tiny_teacher, tb)
    assert torch.equal(t.response.target.hidden, ref.hidden[:, :-1][tb.kd[:, 1:]])
    student_logits = torch.randn(len(s_words), len(words.tokenizer))
    rows = len(processor.tokenizer)
    want = losses.log_probs(tiny_teacher.lm_head(t.response.target.hidden), 1.0, rows).exp()
    got = losses.divergence_sum(student_logits, t.response, vocab_rows=len(words.tokenizer))
    ps = F.softmax(student_logits, -1).sort(-1, descending=True).values
    pt = want.sort(-1, descending=True).values
    cross_ref = (F.pad(ps, (0, rows - ps.shape[-1])) - pt).abs().sum()
    torch.testing.assert_close(got, cross_ref)
