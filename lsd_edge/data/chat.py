"""Chat encoding: messages -> token ids and labels with the processor's chat template.

Each `<image>` becomes the processor's number of visual tokens. Labels are -100 everywhere except
the assistant answers (and their end-of-turn token).

Two tokenizers of the same conversation are aligned by the answers' text, not by position
(`answer_starts`, `common_starts`): a teacher with another tokenizer than its student reads the same
record in its own tokens, and their next-token distributions are compared where both tokenizations
start a token at the same character of the same answer.
"""

from __future__ import annotations

import hashlib
import json

from lsd_edge.errors import DataError
from lsd_edge.models.tokens import IGNORE_INDEX, IMAGE_TOKEN, image_token_id, num_image_tokens


def text_digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class ChatEncoder:
    """Turns messages into token ids and labels with the processor's chat template."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_id = image_token_id(processor)
        self.n_image_tokens = num_image_tokens(processor)
        probe = self.tokenizer(IMAGE_TOKEN, add_special_tokens=False)["input_ids"]
        if probe != [self.image_id]:
            raise DataError(
                f"the tokenizer does not keep {IMAGE_TOKEN} as one token; use the LLaVA processor's"
            )

    @property
    def key(self) -> str:
        """What the encoding of a record depends on: the tokenizer, the chat template, the number
        of visual tokens per image."""
        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        vocab = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
        template = getattr(self.processor, "chat_template", None) or getattr(tok, "chat_template", None)
        return text_digest(f"{vocab}\0{template}\0{self.n_image_tokens}\0{self.image_id}")

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _expand(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        out_ids, out_labels = [], []
        for t, lab in zip(ids, labels, strict=True):
            if t == self.image_id:
                out_ids += [t] * self.n_image_tokens
                out_labels += [IGNORE_INDEX] * self.n_image_tokens
            else:
                out_ids.append(t)
                out_labels.append(lab)
        return out_ids, out_labels

    def encode(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Token ids and labels of a whole conversation; labels only on assistant answers."""
        ids, labels, _ = self.encode_with_starts(messages)
        return ids, labels

    def encode_with_starts(self, messages: list[dict]) -> tuple[list[int], list[int], list[int]]:
        """`encode`, plus where each labelled token starts in its answer's text (`answer_starts`):
        -1 at every position without a label (visual tokens expanded as in the ids)."""
        full = self.render(messages)
        spans, contents = [], []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not full.startswith(before) or not full.startswith(upto):
                raise DataError(
                    "the chat template does not render conversations as prefixes; cannot mask labels"
                )
            spans.append((len(before), len(upto)))
            contents.append(answer_text(m["content"]))
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [IGNORE_INDEX] * len(ids)
        for j, (start, end) in enumerate(enc["offset_mapping"]):
            if end <= start:
                continue
            if any(s <= start < e for s, e in spans):
                # Trailing template whitespace after the end-of-turn token is not part of the answer.
                if full[start:end].strip():
                    labels[j] = ids[j]
        starts = answer_starts(full, spans, contents, enc["offset_mapping"], labels)
        ids_x, labels_x = self._expand(ids, labels)
        starts_x = [s for t, s in zip(ids, starts, strict=True) for _ in range(self._width(t))]
        return ids_x, labels_x, starts_x

    def _width(self, token: int) -> int:
        return self.n_image_tokens if token == self.image_id else 1

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a prompt ending with the assistant's generation prompt."""
        text = self.render(messages, add_generation_prompt=True)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._expand(ids, [IGNORE_INDEX] * len(ids))[0]


def answer_text(content: str | list[dict]) -> str:
    """An answer's text: the content string, or its text parts joined."""
    if isinstance(content, str):
        return content
    return "".join(c.get("text", "") for c in content if c.get("type") == "text")


# A labelled token's place as `answer_starts` gives it: answer turn * TURN_STRIDE + character offset.
TURN_STRIDE = 1 << 32


def answer_starts(
    full: str,
    spans: list[tuple[int, int]],
    contents: list[str],
    offsets: list[tuple[int, int]],
    labels: list[int],
) -> list[int]:
    """Where each labelled token starts in the text of its answer, as one int: turn * TURN_STRIDE +
    offset (-1 at unlabelled positions). `full` is the rendered conversation, `spans` each answer's
    rendered turn (start, end) in it, `contents` each answer's text, `offsets` the tokens' (start,
    end) characters in `full`.

    A token starts at its first character that is not whitespace, so a byte-level BPE's " red" and a
    word-level "red" start at the same "r". The offset is counted from the first character of the
    answer's text, found in its rendered turn, so two chat templates that put other characters
    around an answer (the tiny models' space before it, another end-of-turn token after it) give the
    same offsets to the same characters; a token that starts before the text counts as starting at
    0, and the end-of-turn token starts at the text's length. An answer whose text a template
    changes cannot be found: its tokens get -1 (no logit term across tokenizers; CE still trains).
    """
    found = []
    for (lo, hi), text in zip(spans, contents, strict=True):
        found.append((lo, hi, full.find(text, lo, hi)))
    out = [-1] * len(labels)
    for j, ((start, end), lab) in enumerate(zip(offsets, labels, strict=True)):
        if lab == IGNORE_INDEX:
            continue
        piece = full[start:end]
        start += len(piece) - len(piece.lstrip())  # " red" starts at its "r"
        turn = next(k for k, (lo, hi, _) in enumerate(found) if lo <= start < hi)
        if found[turn][2] >= 0:
            out[j] = turn * TURN_STRIDE + max(0, start - found[turn][2])
    return out


def common_starts(student: list[int], teacher: list[int]) -> tuple[list[bool], list[bool]]:
    """Which tokens of two tokenizations of one conversation are compared: (student, teacher) masks
    over their positions, True at a token whose start (`answer_starts`: -1 = no label) the other side
    also has. Where one side has several tokens at the same start, its first one is kept. Starts grow
    along a sequence, so the kept tokens of both sides pair up in order: the k-th True of one mask
    with the k-th of the other. Both models' next-token distributions *predicting* a kept token (one
    position before it) are what the logit terms compare."""
    shared = {s for s in student if s >= 0} & {t for t in teacher if t >= 0}

    def keep(starts: list[int]) -> list[bool]:
        seen: set[int] = set()
        mask = []
        for s in starts:
            mask.append(s in shared and s not in seen)
            seen.add(s)
        return mask

    return keep(student), keep(teacher)


def user_message(question: str, n_images: int = 1) -> dict:
    content: list[dict] = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": question})
    return {"role": "user", "content": content}
