"""The chat template written into the GGUF file: one that lays out llama.cpp's messages as training did.

llama.cpp (llama-mtmd-cli, llama-server, LM Studio) renders the file's template from messages whose
content is text with its media marker inside (`<__media__>`, put before the question when the user
gives none), not from LLaVA's content lists with image parts, so a LLaVA template run on them lays
the text out otherwise than training did (the marker glued to the question, where training had
`<image>` and a newline). `LAYOUTS` are ChatML templates over such messages, one per image layout
lsd-edge knows (LLaVA-interleave's, the tiny models'); the first that renders every probe
conversation exactly as the model's own template does (one question with 0 to 2 images, and a
second turn after an answer; the marker standing for `<image>`) is written. Otherwise the model's
own template is, and the report says so.
"""

from __future__ import annotations

import jinja2

from lsd_edge.data.chat import user_message
from lsd_edge.models.tokens import IMAGE_TOKEN

MEDIA_MARKER = "<__media__>"  # mtmd_default_marker()


def marker_template(after_marker: str, before_text: str, before_answer: str) -> str:
    """A ChatML template over llama.cpp's messages: in a user (or system) turn each media marker
    followed by `after_marker`, then `before_text` and the text without the markers; an assistant
    turn is `before_answer` and its text."""
    return (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
        "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') "
        "| map(attribute='text') | join('') -%}{%- endif -%}"
        "{%- if message['role'] == 'assistant' -%}{{- " + repr(before_answer) + " + (text | trim) -}}"
        "{%- else -%}"
        "{%- for _ in range((text.split('" + MEDIA_MARKER + "') | length) - 1) -%}"
        "{{- '" + MEDIA_MARKER + "' + " + repr(after_marker) + " -}}{%- endfor -%}"
        "{{- " + repr(before_text) + " + (text | replace('" + MEDIA_MARKER + "', '') | trim) -}}"
        "{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


# LLaVA-interleave's layout (llava-hf's Qwen LLaVAs): the images, then a newline and the text; an
# answer after a newline too.
MARKER_FIRST = marker_template("", "\n", "\n")
# lsd-edge's tiny models' (`lsd_edge.models.tokens.CHAT_TEMPLATE`): each image and a newline, then
# the text; an answer after one space, as its byte-level BPE reads the answer's word.
MARKER_EACH_LINE = marker_template("\n", "", " ")
LAYOUTS = (
    (MARKER_FIRST, "ChatML with the media markers first, as the model's template lays images out"),
    (MARKER_EACH_LINE, "ChatML with each media marker on its line, as the model's template lays images out"),
)
PROBES = ("what color is the circle ?", "how many shapes are there ?")
ANSWER = "red"


def _render(template: str, messages: list[dict]) -> str:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)


def _probes() -> list[tuple[list[dict], list[dict]]]:
    """(the model's messages, llama.cpp's) for each probe: one question with 0 to 2 images, and a
    second question after an answer (what a chat sends back on its next turn)."""
    out = []
    for q in PROBES:
        for n in (0, 1, 2):
            out.append(([user_message(q, n)], [{"role": "user", "content": MEDIA_MARKER * n + q}]))
    answer = {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}
    out.append(
        (
            [user_message(PROBES[0], 1), answer, user_message(PROBES[1], 0)],
            [
                {"role": "user", "content": MEDIA_MARKER + PROBES[0]},
                {"role": "assistant", "content": ANSWER},
                {"role": "user", "content": PROBES[1]},
            ],
        )
    )
    return out


def llama_cpp_template(processor) -> tuple[str | None, str]:
    """(template to write, which one): the first of `LAYOUTS` that renders every probe as the model's
    template does, else the model's own."""
    own = getattr(processor, "chat_template", None) or processor.tokenizer.chat_template
    if not own:
        return None, "none (the model folder has no chat template)"
    try:
        wants = [
            processor.apply_chat_template(model_side, tokenize=False, add_generation_prompt=True)
            for model_side, _ in _probes()
        ]
    except (jinja2.TemplateError, ValueError, TypeError):
        return own, "the model's own (it did not render the probe messages)"
    for template, note in LAYOUTS:
        got = [
            _render(template, llama_side).replace(MEDIA_MARKER, IMAGE_TOKEN) for _, llama_side in _probes()
        ]
        if got == wants:
            return template, note
    return own, "the model's own (its layout is none lsd-edge writes with llama.cpp's media marker)"
