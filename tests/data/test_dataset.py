"""LLaVA-format loading: chat template, label masks, visual positions, bad samples, collation."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from lsd_edge.data.batch import collate
from lsd_edge.data.dataset import BatchLoader, LlavaDataset
from lsd_edge.data.records import BadSample, BadSampleLog, load_image, read_records, to_messages
from lsd_edge.errors import DataError
from lsd_edge.models.tokens import IGNORE_INDEX, num_image_tokens

from ..helpers import write_records as _write


@pytest.fixture
def img_dir(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    Image.new("RGB", (20, 12), (200, 10, 10)).save(d / "rgb.png")
    Image.new("L", (16, 16), 128).save(d / "gray.png")
    Image.new("RGBA", (16, 16), (0, 0, 255, 0)).save(d / "rgba.png")
    Image.new("P", (16, 16), 3).save(d / "pal.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return d


def _decode_labels(processor, enc):
    tok = processor.tokenizer
    return [
        tok.convert_ids_to_tokens(int(i))
        for i, lab in zip(enc.input_ids, enc.labels, strict=True)
        if lab != IGNORE_INDEX
    ]


def test_labels_only_on_answers_multi_turn(tmp_path, img_dir, processor):
    rec = {
        "id": "m1",
        "image": "rgb.png",
        "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the circle ?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "how many shapes are there ?"},
            {"from": "gpt", "value": "two"},
        ],
    }
    ds = LlavaDataset(_write(tmp_path, [rec]), img_dir, processor)
    enc = ds[0]
    assert _decode_labels(processor, enc) == [
        "Ġred",
        "<|im_end|>",
        "Ġtwo",
        "<|im_end|>",
    ]  # answers after a space
    assert enc.pixel_values.shape == (1, 3, 16, 16)
    n_vis = int((enc.input_ids == processor.image_token_id).sum())
    assert n_vis == num_image_tokens(processor) == 4
    # the visual tokens are contiguous and carry no label
    pos = (enc.input_ids == processor.image_token_id).nonzero().flatten()
    assert (pos[1:] - pos[:-1] == 1).all()
    assert (enc.labels[pos] == IGNORE_INDEX).all()


def test_text_only_and_jsonl(tmp_path, processor):
    rec = {
        "id": "t",
        "conversations": [{"from": "human", "value": "how many shapes ?"}, {"from": "gpt", "value": "one"}],
    }
    ds = LlavaDataset(_write(tmp_path, [rec], "d.jsonl"), None, processor)
    enc = ds[0]
    assert enc.pixel_values is None
    assert _decode_labels(processor, enc) == ["Ġone", "<|im_end|>"]


def test_system_turn_and_max_turns(tmp_path, img_dir, processor):
    rec = {
        "id": "s",
        "image": "rgb.png",
        "conversations": [
            {"from": "system", "value": "a"},
            {"from": "human", "value": "<image>\nwhat color is the circle ?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "what shape is red ?"},
            {"from": "gpt", "value": "circle"},
        ],
    }
    ds = LlavaDataset(_write(tmp_path, [rec]), img_dir, processor, max_turns=1)
    assert _decode_labels(processor, ds[0]) == ["Ġred", "<|im_end|>"]
    msgs, n = to_messages(rec, max_turns=1)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"] and n == 1


def test_image_after_question(processor, tmp_path, img_dir):
    rec = {
        "id": "q",
        "image": "rgb.png",
        "conversations": [
            {"from": "human", "value": "what color is it ?\n<image>"},
            {"from": "gpt", "value": "red"},
        ],
    }
    msgs, n = to_messages(rec)
    assert n == 1 and [c["type"] for c in msgs[0]["content"]] == ["text", "image"]
    enc = LlavaDataset(_write(tmp_path, [rec]), img_dir, processor)[0]
    ids = enc.input_ids.tolist()
    assert ids.index(processor.image_token_id) > ids.index(
        processor.tokenizer.convert_tokens_to_ids("Ġcolor")
    )


@pytest.mark.parametrize("name", ["gray.png", "rgba.png", "pal.png"])
def test_odd_image_modes_are_converted(img_dir, name):
    im = load_image(img_dir / name)
    assert im.mode == "RGB"
    if name == "rgba.png":  # transparent pixels come out white, not black
        assert im.getpixel((0, 0)) == (255, 255, 255)


BAD = [
    (
        {
            "id": "b1",
            "image": "nope.png",
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
        },
        "missing image",
    ),
    (
        {
            "id": "b2",
            "image": "broken.png",
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
        },
        "corrupt image",
    ),
    (
        {
            "id": "b3",
            "image": "rgb.png",
            "conversations": [
                {"from": "human", "value": "<image> <image>\nq"},
                {"from": "gpt", "value": "a"},
            ],
        },
        "image count mismatch",
    ),
    ({"id": "b4", "image": "rgb.png", "conversations": []}, "empty conversation"),
    (
        {
            "id": "b5",
            "conversations": [{"from": "human", "value": "what " * 100}, {"from": "gpt", "value": "a"}],
        },
        "truncated: no answer left within data.max_length 64",
    ),
    ({"id": "b6", "conversations": [{"from": "human", "value": "q"}]}, "no answer"),
    ({"id": "b7", "conversations": [{"from": "robot", "value": "q"}]}, "malformed turn"),
]


@pytest.mark.parametrize("rec,reason", BAD, ids=[b[1] for b in BAD])
def test_bad_samples_raise_with_reason(tmp_path, img_dir, processor, rec, reason):
    ds = LlavaDataset(_write(tmp_path, [rec]), img_dir, processor, max_length=64)
    with pytest.raises(BadSample, match=reason):
        ds[0]


def _mixed(tmp_path, img_dir, processor):
    good = {
        "id": "g",
        "image": "rgb.png",
        "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the circle ?"},
            {"from": "gpt", "value": "red"},
        ],
    }
    records = [good, BAD[0][0], good | {"id": "g2"}, BAD[1][0], BAD[3][0]]
    return LlavaDataset(_write(tmp_path, records), img_dir, processor, max_length=64)


def test_skip_policy_counts_and_reports(tmp_path, img_dir, processor):
    ds = _mixed(tmp_path, img_dir, processor)
    log = BadSampleLog()
    loader = BatchLoader(ds, processor.tokenizer.pad_token_id, "skip", log)
    batch = loader.batch(list(range(5)))
    assert batch.ids == ["g", "g2"]
    assert log.total == 3 and log.counts["missing image"] == 1 and log.counts["corrupt image"] == 1
    assert "b1" in log.summary()
    loader.batch(list(range(5)))  # bad samples are counted once
    assert log.total == 3


def test_error_policy_stops_with_sample_id(tmp_path, img_dir, processor):
    ds = _mixed(tmp_path, img_dir, processor)
    loader = BatchLoader(ds, processor.tokenizer.pad_token_id, "error")
    with pytest.raises(DataError, match=r"sample b1 .*missing image.*bad_samples = 'skip'"):
        loader.batch([0, 1])


def test_collate_pads_right(tmp_path, img_dir, processor, shapes_dir):
    ds = LlavaDataset(shapes_dir / "instruct.json", shapes_dir / "images", processor)
    samples = [ds[i] for i in range(4)]
    b = collate(samples, processor.tokenizer.pad_token_id, processor.image_token_id)
    T = max(len(s.input_ids) for s in samples)
    assert b.input_ids.shape == (4, T) and b.pixel_values.shape[0] == 4
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        assert b.attention_mask[i, :n].all() and not b.attention_mask[i, n:].any()
        assert (b.labels[i, n:] == IGNORE_INDEX).all()
    assert (b.visual_mask.sum(1) == 4).all()


def test_broken_files(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        read_records(tmp_path / "x.json")
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        read_records(tmp_path / "bad.json")
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(DataError, match="expected a list"):
        read_records(tmp_path / "obj.json")


def test_empty_data_set(tmp_path, processor):
    with pytest.raises(DataError, match="no records"):
        LlavaDataset(_write(tmp_path, []), None, processor)


def test_batch_with_text_only_and_image_samples(tmp_path, img_dir, processor, tiny_teacher):
    recs = [
        {
            "id": "i",
            "image": "rgb.png",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat color is the circle ?"},
                {"from": "gpt", "value": "red"},
            ],
        },
        {
            "id": "t",
            "conversations": [
                {"from": "human", "value": "how many shapes ?"},
                {"from": "gpt", "value": "one"},
            ],
        },
    ]
    ds = LlavaDataset(_write(tmp_path, recs), img_dir, processor)
    b = BatchLoader(ds, processor.tokenizer.pad_token_id).batch([0, 1])
    assert b.pixel_values.shape[0] == 1 and b.visual_mask[1].sum() == 0
    out = tiny_teacher(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values)
    assert torch.isfinite(out.logits).all()


def test_pixels_and_text_are_decoded_once_per_process(tmp_path, img_dir, processor, monkeypatch):
    """Data sets over the same files share decoded pixels and encoded text; an edited file is read
    again, and a cached record is still cut to each data set's max_length."""
    import lsd_edge.data.dataset as llava
    from lsd_edge.data import decoded

    monkeypatch.setattr(llava, "SHARED_PIXELS", decoded.SharedCache(decoded.PIXEL_CACHE_BYTES))
    monkeypatch.setattr(llava, "SHARED_TEXT", decoded.SharedCache(decoded.TEXT_CACHE_BYTES))
    opened, encoded = [], []
    real_load, real_encode = llava.load_image, llava.ChatEncoder.encode_with_starts
    monkeypatch.setattr(llava, "load_image", lambda path: opened.append(path.name) or real_load(path))
    monkeypatch.setattr(
        llava.ChatEncoder,
        "encode_with_starts",
        lambda self, messages: encoded.append(1) or real_encode(self, messages),
    )
    conv = [{"from": "human", "value": "<image>\nis it red ?"}, {"from": "gpt", "value": "yes"}]
    data = _write(tmp_path, [{"id": "a", "image": "rgb.png", "conversations": conv}], "a.json")
    first = LlavaDataset(data, img_dir, processor)[0]
    second = LlavaDataset(data, img_dir, processor, max_samples=1)[0]
    assert opened == ["rgb.png"] and len(encoded) == 1
    assert torch.equal(first.pixel_values, second.pixel_values) and torch.equal(
        first.input_ids, second.input_ids
    )
    cut = LlavaDataset(data, img_dir, processor, max_length=len(first.input_ids) - 1)[0]
    assert cut.truncated and torch.equal(cut.input_ids, first.input_ids[:-1])
    assert len(encoded) == 1
    Image.new("RGB", (20, 12), (10, 10, 200)).save(img_dir / "rgb.png")
    os.utime(img_dir / "rgb.png", ns=(0, 1))  # a new modification time, whatever the clock's resolution
    conv[1]["value"] = "no"
    data = _write(tmp_path, [{"id": "a", "image": "rgb.png", "conversations": conv}], "a.json")
    os.utime(data, ns=(0, 1))
    third = LlavaDataset(data, img_dir, processor)[0]
    assert opened == ["rgb.png", "rgb.png"] and len(encoded) == 2
    assert not torch.equal(first.pixel_values, third.pixel_values)
    assert not torch.equal(first.labels, third.labels)
