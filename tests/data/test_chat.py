"""Aligning two tokenizations of one conversation by the answers' text: `answer_starts` and
`common_starts` on hand-made tokenizations, then on the tiny models' BPE against a word-level one."""

from __future__ import annotations

from lsd_edge.data.chat import TURN_STRIDE, ChatEncoder, answer_starts, common_starts
from lsd_edge.models.build import with_own_tokenizer
from lsd_edge.models.tokens import IGNORE_INDEX

N = IGNORE_INDEX


def _tokens(full: str, pieces: list[str]) -> list[tuple[int, int]]:
    """(start, end) of each piece, the pieces read left to right out of `full`."""
    out, at = [], 0
    for p in pieces:
        at = full.index(p, at)
        out.append((at, at + len(p)))
        at += len(p)
    return out


def test_answer_starts_count_from_the_answer_text_and_skip_leading_space():
    # template A: a space before the answer, <|im_end|> after; template B: no space, <eot> after
    a = "Q: hi\nA: dark red<|im_end|>\n"
    b = "Q: hi\nA:dark red<eot>"
    sa, sb = (a.index("A:") + 2, len(a) - 1), (b.index("A:") + 2, len(b))
    toks_a = _tokens(a, ["Q:", " hi", "\n", "A:", " dark", " red", "<|im_end|>", "\n"])
    toks_b = _tokens(b, ["Q:", " hi", "\n", "A:", "da", "rk", " ", "red", "<eot>"])
    lab_a = [N, N, N, N, 1, 1, 1, N]
    lab_b = [N, N, N, N, 1, 1, N, 1, 1]
    st_a = answer_starts(a, [sa], ["dark red"], toks_a, lab_a)
    st_b = answer_starts(b, [sb], ["dark red"], toks_b, lab_b)
    assert st_a == [-1, -1, -1, -1, 0, 5, 8, -1]  # " dark" starts at its "d", " red" at its "r"
    assert st_b == [-1, -1, -1, -1, 0, 2, -1, 5, 8]
    keep_a, keep_b = common_starts(st_a, st_b)
    # "dark" (0), "red" (5) and the end of turn (8) start at the same characters on both sides;
    # B's "rk" (2) has no partner
    assert keep_a == [False, False, False, False, True, True, True, False]
    assert keep_b == [False, False, False, False, True, False, False, True, True]


def test_turns_are_told_apart_and_a_repeated_start_keeps_its_first_token():
    full = "u: a\nx: yes<e>u: b\nx: no<e>"
    spans = [(full.index("x:") + 2, full.index("u: b")), (full.rindex("x:") + 2, len(full))]
    toks = _tokens(full, ["u: a\n", "x:", " yes", "<e>", "u: b\n", "x:", " ", "no", "<e>"])
    labels = [N, N, 1, 1, N, N, 1, 1, 1]
    starts = answer_starts(full, spans, ["yes", "no"], toks, labels)
    # " " before "no" is the template's: it starts before the text, so at 0, as "no" does
    assert starts == [-1, -1, 0, 3, -1, -1, TURN_STRIDE, TURN_STRIDE, TURN_STRIDE + 2]
    other = [-1, 0, 3, -1, TURN_STRIDE, TURN_STRIDE + 2]
    keep, keep_other = common_starts(starts, other)
    assert keep == [False, False, True, True, False, False, True, False, True]
    assert sum(keep) == sum(keep_other)


def test_an_answer_a_template_changes_is_left_unaligned():
    full = "x: YES<e>x: no<e>"
    spans = [(2, full.index("x: no")), (full.rindex("x:") + 2, len(full))]
    toks = _tokens(full, ["x:", " YES", "<e>", "x:", " no", "<e>"])
    starts = answer_starts(full, spans, ["yes", "no"], toks, [N, 1, 1, N, 1, 1])
    assert starts == [-1, -1, -1, -1, TURN_STRIDE, TURN_STRIDE + 2]


def test_bpe_and_word_level_answers_pair_word_by_word(processor):
    """The tiny models' byte-level BPE ("Ġred") and a word-level tokenizer ("red"): every answer word
    and the end of turn pair up, in order; a word the BPE writes in pieces pairs with its first."""
    words = with_own_tokenizer(processor, "word", ["what color is the big shape ?", "dark red", "two"])
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "what color is the big shape ?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "dark red"}]},
        {"role": "user", "content": [{"type": "text", "text": "what color is the big shape ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
    ]
    b_enc, w_enc = ChatEncoder(processor), ChatEncoder(words)
    b_ids, b_labels, b_starts = b_enc.encode_with_starts(messages)
    w_ids, w_labels, w_starts = w_enc.encode_with_starts(messages)
    assert (b_ids, b_labels) == tuple(b_enc.encode(messages))
    keep_b, keep_w = common_starts(b_starts, w_starts)
    picked_b = [processor.tokenizer.convert_ids_to_tokens(t) for t, k in zip(b_ids, keep_b, strict=True) if k]
    picked_w = [words.tokenizer.convert_ids_to_tokens(t) for t, k in zip(w_ids, keep_w, strict=True) if k]
    # "dark" is not a word of the tiny BPE: its first piece ("d", after a bare "Ġ") starts where the word does
    assert picked_b == ["d", "Ġred", "<|im_end|>", "Ġtwo", "<|im_end|>"]
    assert picked_w == ["dark", "red", "<|im_end|>", "two", "<|im_end|>"]
    assert all(lab != N for lab, k in zip(w_labels, keep_w, strict=True) if k)
