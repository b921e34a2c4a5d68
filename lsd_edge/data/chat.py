"""Chat encoding: messages -> token ids and labels with the processor's chat template.

Each `<image>` becomes the processor's number of visual tokens. Labels are -100 everywhere except
the assistant answers (and their end-of-turn token).
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
        full = self.render(messages)
        spans = []
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
        return self._expand(ids, labels)

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a prompt ending with the assistant's generation prompt."""
        text = self.render(messages, add_generation_prompt=True)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._expand(ids, [IGNORE_INDEX] * len(ids))[0]


def user_message(question: str, n_images: int = 1) -> dict:
    content: list[dict] = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": question})
    return {"role": "user", "content": content}
