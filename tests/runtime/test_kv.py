"""The in-place KV cache of the model builder's decoder, and the per-graph thread counts."""

from __future__ import annotations

import numpy as np
import pytest

from lsd_edge.runtime.onnx.kv import ConcatCache, SharedCache
from lsd_edge.runtime.onnx.runner import THREAD_BYTES, OnnxRunner, graph_threads


@pytest.fixture(scope="module")
def runner(onnx_dir):
    return OnnxRunner(onnx_dir, variant="fp32")


def _embeds(runner, n: int, seed: int = 0) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(5, runner.vocab_rows, n).tolist()
    return runner.embed(ids)


def _run(runner, cache, embeds: np.ndarray, prompt: int) -> list[np.ndarray]:
    """Prefill `prompt` positions, then one position per step: the last-position logits of each call."""
    out = []
    logits, cache = runner.decode(embeds[:, :prompt], cache)
    out.append(logits[0, -1].copy())
    for i in range(prompt, embeds.shape[1]):
        logits, cache = runner.decode(embeds[:, i : i + 1], cache)
        out.append(logits[0, -1].copy())
    return out


def test_the_builders_decoder_shares_past_and_present(runner):
    assert runner.kv_cache == "shared" and not runner.has_position_ids
    cache = runner.new_cache(32)
    assert isinstance(cache, SharedCache) and cache.capacity == 32
    before = {n: v.data_ptr() for n, v in cache.buffers.items()}
    embeds = _embeds(runner, 9)
    _run(runner, cache, embeds, 5)
    # the same buffers throughout, written in place (their contents: the next test)
    assert {n: v.data_ptr() for n, v in cache.buffers.items()} == before and cache.length == 9


def test_in_place_equals_a_growing_cache(runner, onnx_dir):
    """The same graph fed as transformers.js feeds it (a growing past) gives the same logits."""
    embeds = _embeds(runner, 12, seed=1)
    in_place = runner.new_cache(16)
    shared = _run(runner, in_place, embeds, 7)
    runner.kv_cache = "concat"  # the growing path on the same sessions
    try:
        grown_cache = runner.new_cache()
        assert isinstance(grown_cache, ConcatCache)
        logits, grown_cache = runner.decode(embeds[:, :7], grown_cache)
        grown = [logits[0, -1]]
        for i in range(7, 12):
            logits, grown_cache = runner.decode(embeds[:, i : i + 1], grown_cache)
            grown.append(logits[0, -1])
    finally:
        runner.kv_cache = "shared"
    assert len(shared) == len(grown) == 6
    for a, b in zip(shared, grown, strict=True):
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max())
    for name in runner.past_names:  # the buffer's first 12 positions are the grown cache
        got, want = in_place.buffers[name].numpy()[:, :, :12], grown_cache.tensors[name]
        assert want.shape[2] == 12 and np.abs(got - want).max() <= 1e-5


def test_a_longer_generation_than_planned_moves_to_a_bigger_buffer(runner):
    embeds = _embeds(runner, 14, seed=2)
    want = _run(runner, runner.new_cache(14), embeds, 6)
    small = runner.new_cache(4)  # the prompt alone does not fit: grows at the prefill, then again
    got = _run(runner, small, embeds, 6)
    assert small.capacity >= 14 and small.length == 14
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a, b)


def test_generation_allocates_its_cache_once(runner, monkeypatch):
    made = []
    real = SharedCache._allocate
    monkeypatch.setattr(SharedCache, "_allocate", lambda self, n: (made.append(n), real(self, n)))
    g = runner.generate(None, "how many shapes are there ?", 12, ignore_eos=True)
    assert g.new_tokens == 12 and made == [g.prompt_tokens + 12]


def test_threads_follow_the_graph_size(tmp_path):
    small, big, split = tmp_path / "s.onnx", tmp_path / "b.onnx", tmp_path / "x.onnx"
    small.write_bytes(bytes(1000))
    big.write_bytes(bytes(1000))
    (tmp_path / "b.onnx_data").write_bytes(bytes(5 * THREAD_BYTES))  # external weights count
    split.write_bytes(bytes(2 * THREAD_BYTES + 1))
    assert graph_threads(small, 8) == 1 and graph_threads(big, 8) == 5 and graph_threads(big, 2) == 2
    assert graph_threads(split, 8) == 2 and graph_threads(split, None) >= 1


def test_the_runner_says_its_threads_and_cache(onnx_dir):
    info = OnnxRunner(onnx_dir, threads=4).info()
    assert info["kv_cache"] == "shared" and info["threads"] == dict.fromkeys(info["threads"], 1)
