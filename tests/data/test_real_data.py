"""What real LLaVA mixes bring: multi-image samples, conversations longer than max_length, images the
vision tower would read at another size, 16-bit images, malformed records; and the messy generator."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from PIL import Image

from lsd_edge.data.dataset import BatchLoader, LlavaDataset, truncate
from lsd_edge.data.prepare import corpus_texts
from lsd_edge.data.questions import first_questions, load_eval_items
from lsd_edge.data.records import BadSample, BadSampleLog, load_image, parse_record
from lsd_edge.errors import DataError
from lsd_edge.models.tokens import IGNORE_INDEX
from lsd_edge.recipe.load import parse_recipe

from ..helpers import write_records as _write
from ..messy import KINDS, expected_skips, messy_data, messy_processor, record, turns

K = 4  # visual tokens per image of the tiny processor


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    for i, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        Image.new("RGB", (16, 16), colour).save(d / f"{i}.png")
    Image.new("RGB", (64, 8), (9, 9, 9)).save(d / "wide.png")
    return d


def _answers(processor, enc) -> list[str]:
    """The labelled tokens, each decoded alone (a byte-level token's leading space dropped)."""
    tok = processor.tokenizer
    return [
        tok.decode([int(i)]).strip()
        for i, lab in zip(enc.input_ids, enc.labels, strict=True)
        if lab != IGNORE_INDEX
    ]


MULTI = {
    "id": "mi",
    "image": ["0.png", "1.png"],
    "conversations": [
        {"from": "human", "value": "left <image> right <image>\nwhat color is the circle ?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "<image>\nand here ?"},
        {"from": "gpt", "value": "blue"},
    ],
}


def test_multi_image_samples_expand_each_image_in_place(tmp_path, images, processor):
    rec = copy.deepcopy(MULTI) | {"image": ["0.png", "1.png", "2.png"]}
    enc = LlavaDataset(_write(tmp_path, [rec]), images, processor)[0]
    assert enc.pixel_values.shape == (3, 3, 16, 16)
    at = (enc.input_ids == processor.image_token_id).nonzero().flatten()
    assert len(at) == 3 * K
    # three runs of K visual tokens, in the order of the placeholders (the third after the first answer)
    runs = [at[i * K : (i + 1) * K] for i in range(3)]
    assert all((r[1:] - r[:-1] == 1).all() for r in runs) and runs[0][-1] + 1 < runs[1][0]
    red = enc.input_ids.tolist().index(
        processor.tokenizer.convert_tokens_to_ids("Ġred")
    )  # an answer follows a space
    assert runs[1][-1] < red < runs[2][0]
    assert _answers(processor, enc) == ["red", "<|im_end|>", "blue", "<|im_end|>"]


def test_max_turns_keeps_the_images_of_the_kept_turns(tmp_path, images, processor):
    rec = copy.deepcopy(MULTI) | {"image": ["0.png", "1.png", "2.png"]}
    messages, files = parse_record(rec, max_turns=1)
    assert files == ["0.png", "1.png"] and [m["role"] for m in messages] == ["user", "assistant"]
    enc = LlavaDataset(_write(tmp_path, [rec]), images, processor, max_turns=1)[0]
    assert enc.pixel_values.shape[0] == 2 and int((enc.input_ids == processor.image_token_id).sum()) == 2 * K


def _long(n_words: int) -> dict:
    pairs = [
        ("<image>\nwhat color is the circle ?", "red"),
        ("tell me more .", " ".join(["circle"] * n_words)),
    ]
    return {"id": "long", "image": "0.png", "conversations": turns(*pairs)}


def test_a_conversation_cut_inside_an_answer_keeps_labels_on_what_remains(tmp_path, images, processor):
    # over 40 tokens before the second answer ("tell me more ." is in byte-level pieces): 48 cuts it
    full = LlavaDataset(_write(tmp_path, [_long(40)]), images, processor)[0]
    assert not full.truncated and len(full.input_ids) > 40
    cut = LlavaDataset(_write(tmp_path, [_long(40)]), images, processor, max_length=48)[0]
    assert cut.truncated and len(cut.input_ids) == 48
    assert torch.equal(cut.input_ids, full.input_ids[:48]) and torch.equal(cut.labels, full.labels[:48])
    answers = _answers(processor, cut)
    assert answers[:2] == ["red", "<|im_end|>"] and set(answers[2:]) == {"circle"}
    log = BadSampleLog()
    loader = BatchLoader(
        LlavaDataset(_write(tmp_path, [_long(40)]), images, processor, max_length=48), 0, log=log
    )
    loader.batch([0])
    loader.batch([0])
    assert log.total == 0 and log.kept == {"truncated": 1}, "a kept sample is noted once, not skipped"
    assert "1 truncated at data.max_length and kept (e.g. long)" in log.report()


def test_a_sample_whose_answers_are_all_cut_is_skipped(tmp_path, images, processor):
    rec = {
        "id": "p",
        "conversations": [{"from": "human", "value": "what " * 80}, {"from": "gpt", "value": "red"}],
    }
    ds = LlavaDataset(_write(tmp_path, [rec]), images, processor, max_length=32)
    with pytest.raises(
        BadSample, match=r"truncated: no answer left within data.max_length 32 \(\d+ tokens\)"
    ):
        ds[0]
    with pytest.raises(DataError, match=r"^sample p in .*: truncated: no answer left"):
        BatchLoader(ds, 0, "error").batch([0])


def test_truncation_never_cuts_an_image_in_part():
    img, k = 9, 4
    #        0  1  2  3  4  5  6  7  8  9 10 11 12 13
    ids = torch.tensor([1, 9, 9, 9, 9, 2, 3, 9, 9, 9, 9, 4, 5, 6])
    labels = torch.tensor([-100] * 5 + [2, 3] + [-100] * 4 + [4, 5, 6])
    for max_length, kept_len, kept_images in [
        (14, 14, 2),
        (13, 13, 2),
        (11, 11, 2),
        (10, 7, 1),
        (8, 7, 1),
        (5, 5, 1),
        (4, 1, 0),
    ]:
        out_ids, out_labels, kept = truncate(ids, labels, 2, img, k, max_length)
        assert len(out_ids) == kept_len and kept == kept_images, max_length
        assert int((out_ids == img).sum()) == kept * k
        assert torch.equal(out_labels, labels[:kept_len])


def test_cut_inside_an_image_drops_it_and_keeps_the_answer_before(tmp_path, images, processor):
    rec = copy.deepcopy(MULTI)
    rec["conversations"][0]["value"] = "<image>\nwhat color is the circle ?"
    rec["image"] = ["0.png", "1.png"]
    full = LlavaDataset(_write(tmp_path, [rec]), images, processor)[0]
    second = (full.input_ids == processor.image_token_id).nonzero().flatten()[K]
    cut = LlavaDataset(_write(tmp_path, [rec]), images, processor, max_length=int(second) + 2)[0]
    assert cut.truncated and len(cut.input_ids) == int(second) and cut.pixel_values.shape[0] == 1
    assert _answers(processor, cut) == ["red", "<|im_end|>"]


def test_an_image_the_vision_tower_reads_at_another_size_is_refused_per_sample(tmp_path, images, processor):
    keeps_size = copy.deepcopy(processor)
    keeps_size.image_processor.do_resize = False  # as a processor that keeps each image's own size
    recs = [
        {
            "id": "ok",
            "image": "0.png",
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "red"}],
        },
        {
            "id": "wide-1",
            "image": "wide.png",
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "red"}],
        },
    ]
    ds = LlavaDataset(_write(tmp_path, recs), images, keeps_size)
    assert ds[0].pixel_values.shape == (1, 3, 16, 16)
    with pytest.raises(
        BadSample,
        match=r"image token mismatch: wide.png becomes 8x64 pixels, 8 visual tokens, but <image> expands to 4",
    ):
        ds[1]
    with pytest.raises(DataError, match=r"^sample wide-1 in .*: image token mismatch: wide.png"):
        BatchLoader(ds, 0, "error").batch([0, 1])
    log = BadSampleLog()
    assert BatchLoader(ds, 0, "skip", log).batch([0, 1]).ids == ["ok"]
    assert log.counts == {"image token mismatch": 1}


def test_a_template_that_writes_other_image_tokens_is_refused_per_sample(tmp_path, images, processor):
    doubled = copy.deepcopy(processor)
    doubled.chat_template = doubled.chat_template.replace("<image>\n", "<image><image>\n")
    rec = {
        "id": "d",
        "image": "0.png",
        "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "red"}],
    }
    ds = LlavaDataset(_write(tmp_path, [rec]), images, doubled)
    with pytest.raises(
        BadSample, match=r"image token mismatch: the text holds 8 image tokens, not 1 image\(s\) x 4"
    ):
        ds[0]


@pytest.mark.parametrize(
    "rec,reason",
    [
        ({"id": "a", "image": 3, "conversations": []}, "malformed record|empty conversation"),
        (
            {
                "id": "b",
                "image": {"path": "0.png"},
                "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
            },
            "malformed image field",
        ),
        ({"id": "c", "conversations": "hello"}, "malformed record"),
        (
            {"id": "d", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": None}]},
            "malformed turn",
        ),
        (
            {"id": "e", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]},
            "empty answer",
        ),
        (
            {
                "id": "f",
                "image": "0.png",
                "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
            },
            "image count mismatch",
        ),
    ],
)
def test_malformed_records_are_bad_samples(tmp_path, images, processor, rec, reason):
    with pytest.raises(BadSample, match=reason):
        LlavaDataset(_write(tmp_path, [rec]), images, processor)[0]


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    import numpy as np

    Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert load_image(tmp_path / "deep.png").getpixel((0, 0)) == (128, 128, 128)


def test_eval_items_carry_the_images_shown_before_each_answer(tmp_path, images, processor):
    rec = copy.deepcopy(MULTI) | {"image": ["0.png", "1.png", "2.png"]}
    text_first = {
        "id": "tf",
        "image": "0.png",
        "conversations": turns(("say red .", "red"), ("<image>\nwhat color ?", "red")),
    }
    items = load_eval_items(_write(tmp_path, [rec, text_first]), images, processor)
    assert [(it.id, len(it.images)) for it in items] == [("mi", 2), ("mi/1", 3), ("tf", 0), ("tf/1", 1)]
    for it in items:
        assert it.prompt_ids.count(processor.image_token_id) == len(it.images) * K


def test_bad_sample_log_merges_and_survives_a_round_trip():
    a, b = BadSampleLog(), BadSampleLog()
    a.add("x", "missing image: x.png")
    a.note("y", "truncated")
    b.add("z", "missing image: z.png")
    b.add("w", "corrupt image: w.png (OSError)")
    merged = BadSampleLog.merged([a.as_dict(), b.as_dict()])
    assert merged.counts == {"missing image": 2, "corrupt image": 1} and merged.kept == {"truncated": 1}
    assert BadSampleLog.merged([merged.as_dict()]).as_dict() == merged.as_dict()
    assert merged.report() == (
        "skipped 3 bad sample(s): 2 missing image (e.g. x, z); 1 corrupt image (e.g. w); "
        "1 truncated at data.max_length and kept (e.g. y)"
    )
    assert BadSampleLog().report() == ""


def test_messy_generator_is_seeded_and_holds_every_composition(tmp_path):
    p1, kinds1 = messy_data(tmp_path / "a", seed=3, n=40)
    p2, kinds2 = messy_data(tmp_path / "b", seed=3, n=40)
    _, kinds3 = messy_data(tmp_path / "c", seed=4, n=40)
    assert kinds1 == kinds2 and p1.read_bytes() == p2.read_bytes() and kinds1 != kinds3
    assert set(kinds1) == set(KINDS) and len(kinds1) == 40
    # the tokenizer a tiny model would train on this data (its words one token each, as a run's are)
    processor = messy_processor(p1)
    ds = LlavaDataset(p1, p1.parent / "images", processor, max_length=64)
    log = BadSampleLog()
    loader = BatchLoader(ds, 0, "skip", log)
    loader.batch(list(range(len(ds))))
    assert dict(log.counts) == expected_skips(kinds1)
    assert log.kept["truncated"] == kinds1.count("long-answer") + kinds1.count("long-multi-image")


def test_corpus_texts_read_past_malformed_records(tmp_path, recipe_dict):
    data, _ = messy_data(tmp_path / "messy", seed=0, n=30)
    r = copy.deepcopy(recipe_dict)
    r["data"] = {
        "root": str(data.parent),
        **{n: {"path": "messy.json", "images": "images"} for n in ("pretrain", "instruct", "eval")},
    }
    texts = corpus_texts(parse_recipe(r))
    assert any("circle" in t for t in texts) and any(not t.isascii() for t in texts)


@pytest.mark.parametrize("kind", sorted(k for k, (_, reason) in KINDS.items() if reason))
def test_each_bad_composition_stops_with_its_id_and_reason_under_error(tmp_path, processor, kind):
    src, _ = messy_data(tmp_path / "messy", seed=0, n=len(KINDS))  # for its images
    rec = {"id": f"the-{kind}", **record(kind, random.Random(1), 80)}
    data = _write(tmp_path, [rec])
    loader = BatchLoader(LlavaDataset(data, src.parent / "images", processor, max_length=64), 0, "error")
    with pytest.raises(DataError) as e:
        loader.batch([0])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"sample the-{kind} in {data}: {KINDS[kind][1]}"), msg
    assert msg.endswith("fix the sample or set data.bad_samples = 'skip'")


def test_bench_and_demo_questions_pass_over_messy_records(tmp_path):
    src, kinds = messy_data(tmp_path / "messy", seed=0, n=40)
    questions = first_questions(src, src.parent / "images")
    # the records whose first question shows their one image, which opens
    one = {"single", "image-after-question", "system-turn", "unicode", "odd-image", "dangling-question"}
    one |= {"multi-turn", "long-answer", "long-prompt"}
    assert len(questions) == sum(k in one for k in kinds)
    assert all(q.image.is_file() and q.question and q.answer for q in questions)
