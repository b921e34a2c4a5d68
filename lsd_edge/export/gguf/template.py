"""The chat template written into the GGUF file: one that lays out llama.cpp's messages as training did.

llama.cpp (llama-mtmd-cli, llama-server, LM Studio) renders the file's template from messages whose
content is text with its media marker inside (`<__media__>`, put before the question when the user
gives none), not from LLaVA's content lists with image parts. A LLaVA template that writes the images
first, then a newline and the question (the interleave layout) would lay that text out differently,
so when the model's template renders exactly as `MARKER_FIRST` does (checked on a few questions,
the marker standing for `<image>`), `MARKER_FIRST` is written; otherwise the model's own template is,
and the report says so.
"""

from __future__ import annotations

import jinja2

from lsd_edge.data.chat import user_message
from lsd_edge.models.tokens import IMAGE_TOKEN

MEDIA_MARKER = "<__media__>"  # mtmd_default_marker()
# ChatML turns; in a user turn, the media markers first, then a newline and the text without them.
MARKER_FIRST = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- for _ in range((text.split('"
    + MEDIA_MARKER
    + "') | length) - 1) -%}{{- '"
    + MEDIA_MARKER
    + "' -}}{%- endfor -%}"
    "{{- '\\n' + (text | replace('" + MEDIA_MARKER + "', '') | trim) + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
PROBES = ("what color is the circle ?", "how many shapes are there ?")


def _marker_first(messages: list[dict]) -> str:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    return env.from_string(MARKER_FIRST).render(messages=messages, add_generation_prompt=True)


def llama_cpp_template(processor) -> tuple[str | None, str]:
    """(template to write, which one): `MARKER_FIRST` when it renders as the model's template does."""
    own = getattr(processor, "chat_template", None) or processor.tokenizer.chat_template
    if not own:
        return None, "none (the model folder has no chat template)"
    try:
        for q in PROBES:
            for n in (0, 1):
                want = processor.apply_chat_template(
                    [user_message(q, n)], tokenize=False, add_generation_prompt=True
                )
                got = _marker_first([{"role": "user", "content": MEDIA_MARKER * n + q}])
                if got.replace(MEDIA_MARKER, IMAGE_TOKEN) != want:
                    return own, "the model's own (its layout is not ChatML with the images first)"
    except (jinja2.TemplateError, ValueError, TypeError):
        return own, "the model's own (it did not render the probe messages)"
    return MARKER_FIRST, "ChatML with the media marker first, as the model's template lays images out"
