"""Prompts without transformers: the saved chat template rendered with jinja2, tokenized with `tokenizers`.

`PromptBuilder` gives the same prompt ids as `lsd_edge.data.chat.ChatEncoder.encode_prompt` and the
same decoded text as the transformers tokenizer, so the ONNX runner answers like the PyTorch one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from lsd_edge.errors import RuntimeModelError
from lsd_edge.models.tokens import IMAGE_TOKEN
from lsd_edge.runtime.onnx.layout import first_line, read_json_file


def token_text(tok) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or a dict with 'content'."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class PromptBuilder:
    """Chat template + tokenizer, as `ChatEncoder.encode_prompt` renders and tokenizes a question."""

    def __init__(self, folder: Path, n_image_tokens: int):
        tok_path = folder / "tokenizer.json"
        if not tok_path.is_file():
            raise RuntimeModelError(f"{tok_path}: missing tokenizer; re-run `lsd-edge export`")
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # a damaged tokenizer file is a bad input
            raise RuntimeModelError(f"{tok_path}: cannot read the tokenizer ({first_line(e)})") from None
        tok_config = read_json_file(folder / "tokenizer_config.json", "tokenizer config")
        proc_config = (
            read_json_file(folder / "processor_config.json", "processor config")
            if (folder / "processor_config.json").is_file()
            else {}
        )
        self.template_text = self._template(folder, tok_config, proc_config)
        # The environment transformers renders chat templates in, so the same template gives the same text.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: (
            json.dumps(
                x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
            )
        )
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        self.template = env.from_string(self.template_text)
        self.special = {
            k: token_text(tok_config.get(k))
            for k in (
                "bos_token",
                "eos_token",
                "unk_token",
                "sep_token",
                "pad_token",
                "cls_token",
                "mask_token",
            )
            if token_text(tok_config.get(k)) is not None
        }
        self.cleanup = bool(tok_config.get("clean_up_tokenization_spaces", False)) and (
            type(self.tokenizer.model).__name__ != "BPE"
        )
        image_token = proc_config.get("image_token", IMAGE_TOKEN)
        self.image_id = self.tokenizer.token_to_id(image_token)
        if self.image_id is None:
            raise RuntimeModelError(
                f"{tok_path}: the tokenizer has no {image_token} token; re-run `lsd-edge export`"
            )
        self.n_image_tokens = n_image_tokens
        self.eos_token = self.special.get("eos_token")

    @staticmethod
    def _template(folder: Path, tok_config: dict, proc_config: dict) -> str:
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        for cfg in (proc_config, tok_config):
            if isinstance(cfg.get("chat_template"), str):
                return cfg["chat_template"]
        raise RuntimeModelError(
            f"{folder}: no chat template (chat_template.jinja); re-run `lsd-edge export` from a model folder that has one"
        )

    def prompt_ids(self, question: str, with_image: bool) -> list[int]:
        """Token ids of a one-turn prompt ending with the assistant's generation prompt; `<image>` expanded."""
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
        text = self.template.render(
            messages=[{"role": "user", "content": content}], add_generation_prompt=True, **self.special
        )
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        out: list[int] = []
        for t in ids:
            out.extend([t] * self.n_image_tokens if t == self.image_id else [t])
        return out

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if self.cleanup:  # transformers' clean_up_tokenization, for tokenizers configured with it
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't")):
                text = text.replace(a, b)
            for a, b in ((" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def vocab_rows(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


def _raise_template_error(message: str):
    raise jinja2.exceptions.TemplateError(message)
