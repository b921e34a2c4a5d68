"""Worker loading: the same micro-batches, in the same order, with and without DataLoader workers."""

from __future__ import annotations

import pytest
import torch

from lsd_edge.data.dataset import LlavaDataset
from lsd_edge.data.loading import SlotReader, SlotSampler, auto_workers
from lsd_edge.data.records import BadSampleLog
from lsd_edge.data.sampling import IndexStream
from lsd_edge.errors import DataError

from ..messy import expected_skips, messy_data, messy_processor


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    return messy_data(tmp_path_factory.mktemp("messy"), seed=1, n=40, image_size=16)


def _read(data, processor, workers: int, slots, start: int = 0, steps: int = 12, policy: str = "skip"):
    ds = LlavaDataset(data, data.parent / "images", processor, max_length=48)
    log = BadSampleLog()
    sampler = SlotSampler(IndexStream(len(ds), seed=3), start, per_micro=3, per_step=3 * 3, slots=slots)
    reader = SlotReader(ds, processor.tokenizer.pad_token_id, policy, sampler, log, workers, pin_memory=False)
    try:
        return [reader.step() for _ in range(steps)], log
    finally:
        reader.close()


def _same(a, b) -> None:
    assert (a is None) == (b is None)
    if a is None:
        return
    assert a.ids == b.ids and a.indices == b.indices
    for name in ("input_ids", "attention_mask", "labels", "visual_mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.pixel_values is None) == (b.pixel_values is None)
    assert a.pixel_values is None or torch.equal(a.pixel_values, b.pixel_values)


@pytest.mark.parametrize("slots", [[0, 1, 2], [1, None]])  # one process; rank 1 of 2 (a pad slot)
def test_workers_yield_the_batches_and_bad_samples_of_the_main_process(messy, slots):
    data, kinds = messy
    processor = messy_processor(data)  # the data's words one token each, as a run's tokenizer has them
    plain, plain_log = _read(data, processor, 0, slots)
    # 2 epochs of a 40-sample set: bad samples met again, by another worker, are counted once
    workers, workers_log = _read(data, processor, 2, slots)
    for step_a, step_b in zip(plain, workers, strict=True):
        assert len(step_a) == len(slots)
        for a, b in zip(step_a, step_b, strict=True):
            _same(a, b)
    assert any(b is not None and b.pixel_values is not None for step in workers for b in step)
    assert workers_log.as_dict()["by_reason"] == plain_log.as_dict()["by_reason"]
    assert workers_log.kept == plain_log.kept
    expected = expected_skips(kinds)
    assert plain_log.total and all(n <= expected[k] for k, n in plain_log.counts.items())


def test_a_reader_started_at_a_position_continues_the_stream(messy, processor):
    """A resume state is one stream position: a reader opened there reads what the first one read
    from that step on."""
    data, _ = messy
    whole, _ = _read(data, processor, 1, [0, 1, 2])
    later, _ = _read(data, processor, 1, [0, 1, 2], start=5 * 9, steps=7)
    for step_a, step_b in zip(whole[5:], later, strict=True):
        for a, b in zip(step_a, step_b, strict=True):
            _same(a, b)


def test_a_refused_sample_in_a_worker_is_one_line_in_the_loop(messy, processor):
    data, _ = messy
    with pytest.raises(DataError) as e:
        _read(data, processor, 2, [0, 1, 2], policy="error")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("sample ") and "data.bad_samples = 'skip'" in msg


def test_auto_workers_share_the_cores_among_processes(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert auto_workers(1) == 8 and auto_workers(2) == 7 and auto_workers(4) == 3 and auto_workers(16) == 0
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert auto_workers(1) == 1 and auto_workers(2) == 0
