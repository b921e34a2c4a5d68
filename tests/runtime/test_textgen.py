"""Torch-free generation pieces: token picking, streaming text, the time to first token in parts."""

from __future__ import annotations

import time

import numpy as np
import pytest

from lsd_edge.runtime.textgen import (
    Generation,
    PartTimer,
    SamplingParams,
    StreamDecoder,
    decode_loop,
    generate_tokens,
    pick_token,
)


def test_greedy_and_padded_rows():
    logits = np.array([0.1, 2.0, 0.3, 9.0])
    assert pick_token(logits, SamplingParams(), np.random.default_rng(0)) == 3
    assert pick_token(logits, SamplingParams(), np.random.default_rng(0), vocab_rows=3) == 1


def test_top_k_and_top_p_restrict_the_draw():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    k1 = {pick_token(logits, SamplingParams(do_sample=True, top_k=1), rng) for _ in range(50)}
    assert k1 == {0}
    p = {pick_token(logits, SamplingParams(do_sample=True, top_p=0.7), rng) for _ in range(300)}
    assert p == {0, 1}
    free = {pick_token(logits, SamplingParams(do_sample=True), rng) for _ in range(2000)}
    assert free == {0, 1, 2, 3}


def test_sampling_is_seeded():
    logits = np.zeros(50)
    a = [pick_token(logits, SamplingParams(do_sample=True), np.random.default_rng(7)) for _ in range(5)]
    b = [pick_token(logits, SamplingParams(do_sample=True), np.random.default_rng(7)) for _ in range(5)]
    assert a == b


def test_stream_decoder_emits_increments():
    words = {1: "top", 2: "left", 3: "\ufffd"}
    got = []
    s = StreamDecoder(lambda ids: " ".join(words[i] for i in ids), got.append)
    s.push(1)
    s.push(2)
    assert got == ["top", " left"] and "".join(got) == s.text()
    s.push(3)  # an incomplete character is held back
    assert got == ["top", " left"]


def test_generation_rates():
    g = Generation("a b c", [1, 2, 3], prompt_tokens=10, ttft_s=0.5, total_s=1.5)
    assert (
        g.new_tokens == 3
        and g.decode_tokens_per_s == 2.0
        and g.prefill_tokens_per_s == 20.0
        and g.e2e_tokens_per_s == 2.0
    )


def test_decode_loop_stops_before_a_stop_token_or_at_the_limit():
    script = iter([5, 6, 2, 7])  # the model "predicts" these in turn; 2 is the stop token

    def step(_token):
        logits = np.zeros(10)
        logits[next(script, 0)] = 1.0
        return logits

    stream = StreamDecoder(lambda ids: " ".join(map(str, ids)), None)
    how = decode_loop(4, step, 10, {2}, stream, sampling=SamplingParams(), rng=np.random.default_rng(0))
    assert how == "stop" and stream.ids == [4, 5, 6]
    stream = StreamDecoder(lambda ids: "", None)
    how = decode_loop(
        2, step, 3, {2}, stream, sampling=SamplingParams(), rng=np.random.default_rng(0), ignore_eos=True
    )
    assert how == "length" and stream.ids == [2, 7, 0]  # the script is spent: token 0


def _timed_generation(vision_s: float, prefill_s: float, image: bool):
    """A generation whose prefill spends `vision_s` under the vision timer (with an image) and
    `prefill_s` outside it, after 0.01 s of preparation before `generate_tokens` is called."""
    t0 = time.perf_counter()
    time.sleep(0.01)  # preparing the prompt and the image: part of the first token
    vision = PartTimer()

    def prefill():
        if image:
            with vision:
                time.sleep(vision_s)
        time.sleep(prefill_s)
        return np.array([0.0, 1.0])

    return generate_tokens(
        prefill,
        lambda _t: np.array([0.0, 1.0]),
        prompt_tokens=4,
        max_new_tokens=2,
        stop_ids=set(),
        decode=str,
        t0=t0,
        vision=vision,
    )


def test_the_time_to_first_token_in_parts():
    g = _timed_generation(0.05, 0.03, image=True)
    # the prefill holds the vision part (0.05 s) in its interval, but not in its figure
    assert g.vision_s >= 0.05 and 0.03 <= g.prefill_s < 0.08 and g.first_token_s >= 0.01
    # the parts are timed in the one generation and make up its whole TTFT
    assert g.vision_s + g.prefill_s + g.first_token_s == pytest.approx(g.ttft_s, abs=1e-9)
    plain = _timed_generation(0.05, 0.03, image=False)
    assert plain.vision_s is None and plain.prefill_s >= 0.03
    assert plain.prefill_s + plain.first_token_s == pytest.approx(plain.ttft_s, abs=1e-9)
    # a runner that times nothing has no split
    assert Generation("", [], 1, ttft_s=0.5, total_s=1.0).first_token_s is None


def test_a_part_timer_sums_its_calls_and_ignores_a_lone_stop():
    timer = PartTimer()
    timer.stop()
    assert timer.seconds is None
    for _ in range(2):
        with timer:
            time.sleep(0.01)
    assert timer.seconds >= 0.02


def test_an_answer_that_ends_inside_a_character_streams_it_at_the_end():
    """A byte-level model can stop inside a multi-byte character: held back while it might complete,
    it is sent when the answer ends, so the streamed pieces add up to the answer."""
    texts = {1: "a", 2: "a\ufffd"}
    pieces: list[str] = []
    stream = StreamDecoder(lambda ids: texts[len(ids)], pieces.append)
    stream.push(5)
    stream.push(6)
    assert pieces == ["a"]
    assert stream.text() == "a\ufffd" and pieces == ["a", "\ufffd"]
