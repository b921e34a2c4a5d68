"""The one decode loop and its pieces, torch-free: the result record, token sampling, streaming text.

Both runners (PyTorch and ONNX Runtime) generate through `decode_loop`, so greedy and sampled
decoding, stop tokens and streaming behave the same whichever backend runs the model. Only numpy
here: the ONNX runner must work where torch cannot be imported.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Generation:
    """One answer and how long it took."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    ttft_s: float  # call -> first new token: image preprocessing, vision encoder, prefill, first pick
    total_s: float
    stopped: str = "length"  # "stop" (a stop token) or "length" (max_new_tokens)
    extra: dict = field(default_factory=dict)
    # ttft_s in parts, timed where each happens in the one generation (`generate_tokens`): the vision
    # encoder and projector (None: no image was seen), and the prefill: the embedding and the decoder
    # over the prompt, the vision part excluded. None when the runner did not time them.
    vision_s: float | None = None
    prefill_s: float | None = None

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def first_token_s(self) -> float | None:
        """The rest of ttft_s: preparing the prompt and the image (tokenizing, resizing, normalising)
        and picking the first token from the prefill's logits."""
        if self.prefill_s is None:
            return None
        return self.ttft_s - self.prefill_s - (self.vision_s or 0.0)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, per second of decoding (prefill excluded)."""
        n = self.new_tokens - 1
        dt = self.total_s - self.ttft_s
        return n / dt if n > 0 and dt > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else 0.0

    @property
    def e2e_tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0


class PartTimer:
    """Wall seconds spent between `start()` and `stop()` (or inside `with timer:`), summed over the
    calls; None until one finished. A runner times the part of its prefill that runs inside it (the
    vision encoder) with one; `sync` waits for the device before each clock read."""

    def __init__(self, sync: Callable[[], None] = lambda: None):
        self.sync = sync
        self.seconds: float | None = None
        self._t: float | None = None

    def start(self) -> None:
        self.sync()
        self._t = time.perf_counter()

    def stop(self) -> None:
        if self._t is None:  # a stop without its start (a hook seen alone): nothing to add
            return
        self.sync()
        self.seconds = (self.seconds or 0.0) + time.perf_counter() - self._t
        self._t = None

    def __enter__(self) -> PartTimer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


def pick_token(
    logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, vocab_rows: int | None = None
) -> int:
    """Next token from one row of logits (V,): argmax, or a draw after temperature, top-k, top-p.

    Rows past `vocab_rows` (padded embedding rows) are never chosen.
    """
    if not params.do_sample or params.temperature <= 0:  # greedy: no copy of the row
        return int(np.argmax(logits[:vocab_rows] if vocab_rows is not None else logits))
    x = np.asarray(logits, dtype=np.float64)
    if vocab_rows is not None:
        x = x[:vocab_rows]
    x = x / params.temperature
    if params.top_k and params.top_k < x.shape[0]:
        kth = np.partition(x, -params.top_k)[-params.top_k]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        keep = cum - p[order] < params.top_p  # the smallest set whose mass reaches top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.shape[0], p=p))


def decode_loop(
    first: int,
    step: Callable[[int], np.ndarray],
    max_new_tokens: int,
    stop_ids: set[int],
    stream: StreamDecoder,
    *,
    sampling: SamplingParams,
    rng: np.random.Generator,
    vocab_rows: int | None = None,
    ignore_eos: bool = False,
) -> str:
    """The generation loop every runner shares, after the prefill picked `first`.

    Pushes tokens to `stream` until a stop token (not pushed) or `max_new_tokens`; `step(token)` feeds
    one token to the model and returns the next logits (V,). Returns "stop" or "length".
    """
    nxt = first
    for i in range(max_new_tokens):
        if nxt in stop_ids and not ignore_eos:
            return "stop"
        stream.push(nxt)
        if i == max_new_tokens - 1:
            break
        nxt = pick_token(step(nxt), sampling, rng, vocab_rows)
    return "length"


class StreamDecoder:
    """Turns a growing list of token ids into text increments for streaming.

    Decodes the whole answer each time and emits what is new, holding back a trailing replacement
    character (a multi-byte character cut between tokens) until it is complete.
    """

    def __init__(self, decode: Callable[[list[int]], str], on_text: Callable[[str], None] | None):
        self.decode = decode
        self.on_text = on_text
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        if self.on_text is None:
            return
        text = self.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._send(text)

    def _send(self, text: str) -> None:
        if text.startswith(self.sent):
            delta = text[len(self.sent) :]
        else:  # the tokenizer re-spaced earlier text; send the whole answer again
            delta = text
        if delta:
            self.sent = text
            self.on_text(delta)

    def text(self) -> str:
        """The whole answer; a character held back because the answer ended inside it (a byte-level
        model can stop mid-character) is sent now, so the streamed pieces add up to the answer."""
        text = self.decode(self.ids)
        if self.on_text is not None:
            self._send(text)
        return text


def generate_tokens(
    prefill: Callable[[], np.ndarray],
    step: Callable[[int], np.ndarray],
    *,
    prompt_tokens: int,
    max_new_tokens: int,
    stop_ids: set[int],
    decode: Callable[[list[int]], str],
    sampling: SamplingParams | None = None,
    ignore_eos: bool = False,
    on_text: Callable[[str], None] | None = None,
    vocab_rows: int | None = None,
    t0: float | None = None,
    sync: Callable[[], None] = lambda: None,
    vision: PartTimer | None = None,
) -> Generation:
    """One generation as every runner runs it: `prefill()` gives the last prompt position's logits (V,),
    the first token is picked from them, then `decode_loop` feeds tokens to `step`. `decode` turns
    token ids into text for streaming; `sync` waits for the device before a clock is read; `t0` is
    when the request came in (image preprocessing counts toward the time to first token); `vision`
    is the timer the runner's prefill runs its vision encoder under (Generation.vision_s)."""
    sampling = sampling or SamplingParams()
    rng = np.random.default_rng(sampling.seed)
    stream = StreamDecoder(decode, on_text)
    t0 = time.perf_counter() if t0 is None else t0
    t_prefill = time.perf_counter()
    logits = prefill()
    sync()
    t_logits = time.perf_counter()
    first = pick_token(logits, sampling, rng, vocab_rows)
    sync()
    ttft = time.perf_counter() - t0
    vision_s = None if vision is None else vision.seconds
    prefill_s = t_logits - t_prefill - (vision_s or 0.0)
    stopped = decode_loop(
        first,
        step,
        max_new_tokens,
        stop_ids,
        stream,
        sampling=sampling,
        rng=rng,
        vocab_rows=vocab_rows,
        ignore_eos=ignore_eos,
    )
    sync()
    total = time.perf_counter() - t0
    return Generation(
        stream.text(),
        list(stream.ids),
        prompt_tokens,
        ttft,
        total,
        stopped,
        vision_s=vision_s,
        prefill_s=prefill_s,
    )
