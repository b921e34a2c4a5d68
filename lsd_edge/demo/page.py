"""The side-by-side page: teacher and student answer the same image and question, streaming.

`build_app(teacher, students, examples, limits)` builds the `gr.Blocks`. Its one handler answers
with both models at once and is also the API endpoint `/ask` (image, question, student backend, max
new tokens -> both answers, their figures and a JSON summary), so the page can be scripted with
`gradio_client`. `launch` serves the app on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import os

# A local demo sends nothing home: Gradio's and gradio_client's telemetry read these at import or call.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import gradio as gr  # noqa: E402

from lsd_edge.demo.answering import fit_image, stream_answers  # noqa: E402
from lsd_edge.demo.examples import Example  # noqa: E402
from lsd_edge.demo.format import FOOTER, agree, agreement, facts, header, speed, summary  # noqa: E402
from lsd_edge.errors import LsdEdgeError  # noqa: E402
from lsd_edge.runtime.runner import Runner  # noqa: E402

TEACHER = "teacher"
STUDENT = "student"
# System fonts only: the default theme's fonts are served by Gradio itself, but a page that asks no
# font server for anything works the same offline.
THEME = gr.themes.Soft(
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
)
CSS = """
#agreement { text-align: center; font-size: 1.1em; min-height: 1.6em; }
.figures p { margin: 0.15em 0; }
#image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
"""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how many requests the server takes at once."""

    max_pixels: int = 1024 * 1024  # bigger images are downscaled (aspect kept) before either model sees them
    max_question_chars: int = 500
    max_new_tokens: int = 64  # the most a request may ask for
    default_new_tokens: int = 24
    queue_size: int = 64  # requests waiting beyond this are refused with "queue full"
    concurrency: int = 2  # requests answered at once; each runs both models
    max_file_size: str = "10mb"  # uploads, before decoding


class DemoError(LsdEdgeError):
    """A demo that cannot start (the port is taken, ...)."""


def _answer_box(side: str) -> gr.Textbox:
    gr.Markdown(f"## {side.title()}")
    return gr.Textbox(label="Answer", lines=3, interactive=False, elem_id=f"{side}-answer", buttons=["copy"])


def _figures(side: str, text: str) -> gr.Markdown:
    return gr.Markdown(text, elem_id=f"{side}-stats", elem_classes="figures")


def _check_request(question: str, backend: str, n: int, backends: list[str], limits: Limits) -> None:
    if not question:
        raise gr.Error("Type a question first.")
    if len(question) > limits.max_question_chars:
        raise gr.Error(
            f"The question is {len(question)} characters long; the limit is {limits.max_question_chars}."
        )
    if backend not in backends:
        raise gr.Error(f"Unknown student backend {backend!r}; choose one of {', '.join(backends)}.")
    if not 1 <= n <= limits.max_new_tokens:
        raise gr.Error(f"max_new_tokens must be between 1 and {limits.max_new_tokens}.")


def _handler(teacher: Runner, students: dict[str, Runner], infos: dict, limits: Limits):
    """The page's one handler (and the `/ask` endpoint): both answers as they grow, and their figures."""

    def ask(image, question, backend, max_new_tokens):
        question = (question or "").strip()
        n = int(max_new_tokens)
        _check_request(question, backend, n, list(students), limits)
        image_note = None
        if image is not None:
            original = image.size
            image, shrunk = fit_image(image, limits.max_pixels)
            image_note = {"size": list(image.size), "downscaled_from": list(original) if shrunk else None}
        runners = {TEACHER: teacher, STUDENT: students[backend]}
        t_info, s_info = infos[TEACHER], infos[backend]
        for answers in stream_answers(runners, image, question, n):
            t, s = answers[TEACHER], answers[STUDENT]
            same = agree(t, s)
            result = {
                "question": question,
                "image": image_note,
                "student_backend": backend,
                TEACHER: summary(t, t_info),
                STUDENT: summary(s, s_info),
                "agree": same,
            }
            yield (
                t.text,
                speed(t) + "\n\n" + facts(t_info),
                s.text,
                speed(s) + "\n\n" + facts(s_info),
                agreement(same),
                result,
            )

    return ask


def _inputs(limits: Limits, examples: Sequence[Example]):
    """The left column: image, question, token limit, the button, the examples."""
    image = gr.Image(
        type="pil",
        image_mode="RGB",
        sources=["upload", "clipboard"],
        label="Image",
        height=240,
        elem_id="image",
    )
    question = gr.Textbox(
        label="Question",
        placeholder="what color is the circle ?",
        max_length=limits.max_question_chars,
        elem_id="question",
    )
    max_tokens = gr.Slider(
        1,
        limits.max_new_tokens,
        value=min(limits.default_new_tokens, limits.max_new_tokens),
        step=1,
        label="Max new tokens",
        elem_id="max-new-tokens",
    )
    ask_button = gr.Button("Ask both", variant="primary", elem_id="ask")
    if examples:
        gr.Examples(
            [[str(e.image), e.question] for e in examples],
            inputs=[image, question],
            label="ShapesVQA examples (held-out scenes)",
            examples_per_page=8,
        )
    return image, question, max_tokens, ask_button


def build_app(
    teacher: Runner,
    students: dict[str, Runner],
    examples: Sequence[Example] = (),
    limits: Limits = Limits(),
    notes: Sequence[str] = (),
) -> gr.Blocks:
    """The page, with its queue set up; `students` maps a backend label ("PyTorch", "ONNX int8") to a runner."""
    if not students:
        raise ValueError("build_app needs at least one student runner")
    backends = list(students)
    student_infos = {b: r.info() for b, r in students.items()}
    infos = {TEACHER: teacher.info(), **student_infos}
    with gr.Blocks(title="lsd-edge demo", analytics_enabled=False) as app:
        gr.Markdown(header(infos[TEACHER], student_infos, notes))
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=280):
                image, question, max_tokens, ask_button = _inputs(limits, examples)
            with gr.Column(scale=2):
                with gr.Row(equal_height=False):
                    with gr.Column(min_width=280):
                        t_answer = _answer_box(TEACHER)
                        t_stats = _figures(TEACHER, facts(infos[TEACHER]))
                    with gr.Column(min_width=280):
                        s_answer = _answer_box(STUDENT)
                        backend = gr.Radio(backends, value=backends[0], label="Backend", elem_id="backend")
                        s_stats = _figures(STUDENT, facts(student_infos[backends[0]]))
                agreement_md = gr.Markdown("", elem_id="agreement")
        with gr.Accordion("Result as JSON (what the /ask endpoint returns last)", open=False):
            result_json = gr.JSON(elem_id="result")
        gr.Markdown(FOOTER)
        gr.on(
            [ask_button.click, question.submit],
            _handler(teacher, students, infos, limits),
            inputs=[image, question, backend, max_tokens],
            outputs=[t_answer, t_stats, s_answer, s_stats, agreement_md, result_json],
            api_name="ask",
            concurrency_limit=limits.concurrency,
            show_progress="minimal",
        )
        backend.change(
            lambda b: ("", facts(student_infos[b])),
            backend,
            [s_answer, s_stats],
            api_visibility="private",
            queue=False,
        )
    app.queue(max_size=limits.queue_size, default_concurrency_limit=limits.concurrency)
    app.demo_limits = limits  # launch() reads the upload cap from here
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> list[str]:
    """Start serving the app in the background; returns its URLs (local, and the public one with `share`).

    `app.block_thread()` then waits until Ctrl+C; `app.close()` stops the server.
    """
    limits = getattr(app, "demo_limits", Limits())
    try:
        app.launch(
            server_name=host,
            server_port=port,
            share=share,
            prevent_thread_lock=True,
            quiet=True,
            show_error=True,
            max_file_size=limits.max_file_size,
            footer_links=["api"],
            run_history=False,
            enable_monitoring=False,
            ssr_mode=False,
            mcp_server=False,
            pwa=False,
            theme=THEME,
            css=CSS,
        )
    except OSError:  # Gradio reports a taken port as an OSError
        raise DemoError(
            f"cannot serve on {host}:{port}: the port is taken or the address is not this machine's; "
            "pass another --port (or --host)"
        ) from None
    return [u for u in (app.local_url, app.share_url) if u]
