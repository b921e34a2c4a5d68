"""The side-by-side page: teacher and student answer the same image and question, streaming.

`build_app(teacher, students, examples, limits)` builds the `gr.Blocks`. Its one handler answers
with both models at once and is also the API endpoint `/ask` (image, question, student backend, max
new tokens -> both answers, their figures and a JSON summary), so the page can be scripted with
`gradio_client`. `stream_answers` runs the models and knows nothing of Gradio. `launch` serves the
app on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import os

# A local demo sends nothing home: Gradio's and gradio_client's telemetry read these at import or call.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import queue  # noqa: E402
import threading  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from lsd_edge.errors import LsdEdgeError  # noqa: E402
from lsd_edge.evaluate import normalize_answer  # noqa: E402
from lsd_edge.infer import Runner  # noqa: E402
from lsd_edge.textgen import Generation  # noqa: E402

from .loading import Example  # noqa: E402

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


# ------------------------------------------------------------------------------------------- answering


@dataclass
class Answer:
    """One model's answer so far: text grows while streaming; then a generation or an error ends it."""

    text: str = ""
    generation: Generation | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.generation is not None or self.error is not None


class _Cancelled(Exception):
    pass


def _one_line(e: Exception) -> str:
    if isinstance(e, LsdEdgeError):
        return str(e)
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def stream_answers(
    runners: dict[str, Runner],
    image: Image.Image | None,
    question: str,
    max_new_tokens: int,
    cancel: threading.Event | None = None,
) -> Iterator[dict[str, Answer]]:
    """Every runner answers the same question at once, each in its own thread.

    Yields the answers (one dict, updated in place) each time any of them grows or ends, until all
    have ended. An exception in one runner ends its answer with an error and leaves the others
    running. Closing the iterator (a client that went away) stops the runners at their next token.
    """
    cancel = cancel or threading.Event()
    events: queue.Queue = queue.Queue()
    answers = {key: Answer() for key in runners}

    def work(key: str, runner: Runner) -> None:
        def on_text(piece: str) -> None:
            if cancel.is_set():
                raise _Cancelled
            events.put((key, "text", piece))

        try:
            events.put((key, "done", runner.generate(image, question, max_new_tokens, on_text=on_text)))
        except _Cancelled:
            events.put((key, "error", "cancelled"))
        except Exception as e:  # whatever one model raises, the other one's answer still arrives
            events.put((key, "error", _one_line(e)))

    for key, runner in runners.items():
        threading.Thread(target=work, args=(key, runner), name=f"demo-{key}", daemon=True).start()
    try:
        while not all(a.done for a in answers.values()):
            batch = [events.get()]
            while True:  # take whatever else arrived meanwhile, so one update carries it all
                try:
                    batch.append(events.get_nowait())
                except queue.Empty:
                    break
            for key, kind, value in batch:
                a = answers[key]
                if kind == "text":
                    a.text += value
                elif kind == "done":
                    a.generation, a.text = value, value.text  # the full decode is the answer of record
                else:
                    a.error = value
            yield answers
    finally:
        cancel.set()


def fit_image(image: Image.Image, max_pixels: int) -> tuple[Image.Image, bool]:
    """RGB, downscaled (aspect kept) to at most `max_pixels`; returns it and whether it was shrunk."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    w, h = image.size
    if w * h <= max_pixels:
        return image, False
    scale = (max_pixels / (w * h)) ** 0.5
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    return image.resize(size, Image.Resampling.LANCZOS), True


# ------------------------------------------------------------------------------------------ formatting


def _mib(x: float) -> str:
    return f"{x / 1024:.2f} GiB" if x >= 1024 else f"{x:.1f} MiB"


def facts(info: dict) -> str:
    """Markdown: what the model is (backend, parameters, size) and the memory it took."""
    where = info.get("device", "cpu")
    if info.get("backend") == "onnx":
        kind = f"ONNX Runtime, {info.get('variant', 'fp32')}, on {where}"
    else:
        kind = f"PyTorch, {info.get('dtype', '')}, on {where}"
    params = info.get("params")
    lines = [
        f"**model** {kind} · "
        + (f"{params / 1e6:.2f} M parameters" if params else "parameters unknown")
        + f" · {info.get('size_mb', 0):.2f} MB of weights on disk"
    ]
    m = info.get("memory")
    if m:
        parts = []
        if "weights_mib" in m:
            parts.append(f"weights {_mib(m['weights_mib'])}")
        if "cuda_peak_mib" in m:
            parts.append(f"CUDA peak {_mib(m['cuda_peak_mib'])}")
        parts.append(f"process RSS +{_mib(m['peak_rss_mib'])}")
        lines.append(
            "**peak memory** " + " · ".join(parts) + " (loading and answering, measured alone at start-up)"
        )
    else:
        lines.append("**peak memory** not measured")
    return "\n\n".join(lines)


def speed(a: Answer) -> str:
    """Markdown: this answer's time to first token, decode speed and length, or its error."""
    if a.error:
        return f"**error** {a.error}"
    g = a.generation
    if g is None:
        return "_answering…_" if a.text else "_waiting for the first token…_"
    end = "end of answer" if g.stopped == "stop" else "token limit"
    rate = f"{g.decode_tokens_per_s:.1f} tokens/s" if g.new_tokens > 1 else "n/a (one token)"
    tokens = f"{g.new_tokens} token" + ("s" if g.new_tokens != 1 else "")
    return f"**first token** {1000 * g.ttft_s:.0f} ms · **decode** {rate} · {tokens} ({end})"


def agree(teacher: Answer, student: Answer) -> bool | None:
    """Whether both finished answers say the same (exact match after normalization); None until both end."""
    if teacher.generation is None or student.generation is None:
        return None
    return normalize_answer(teacher.text) == normalize_answer(student.text)


def agreement(same: bool | None) -> str:
    if same is None:
        return ""
    return "✓ **The answers agree**" if same else "✗ **The answers differ**"


def summary(a: Answer, info: dict) -> dict:
    """One model's answer and figures as plain JSON."""
    g = a.generation
    return {
        "model": info.get("path", info.get("name")),
        "backend": info.get("backend"),
        "answer": a.text,
        "done": a.done,
        "error": a.error,
        "ttft_s": None if g is None else round(g.ttft_s, 6),
        "decode_tokens_per_s": None if g is None else round(g.decode_tokens_per_s, 3),
        "new_tokens": None if g is None else g.new_tokens,
        "stopped": None if g is None else g.stopped,
    }


# ---------------------------------------------------------------------------------------------- the page


def _header(teacher: dict, students: dict[str, dict], notes: Sequence[str]) -> str:
    student_paths = ", ".join(f"{k}: `{v.get('path')}`" for k, v in students.items())
    text = (
        "# lsd-edge: teacher vs distilled student\n"
        "Ask one question about one image; both models answer at once, token by token. "
        f"Teacher `{teacher.get('path')}`; student {student_paths}."
    )
    for note in notes:
        text += f"\n\n_Note: {note}._"
    return text


FOOTER = """\
**How to read the figures.** *First token*: from the call to the first new token (image preprocessing,
vision encoder, prefill). *Decode*: tokens after the first, per second. Both models run at the same
time on the same machine, so each one's speed is measured while the other shares its cores.
*Peak memory* is measured once per model at start-up, alone. *Agree*: the two answers are equal
after lower-casing and dropping a final full stop, as the exact-match accuracy compares them.

**Scripting.** The page's handler is the API endpoint `/ask`:
`Client(URL).predict(handle_file("scene.png"), "what color is the circle ?", "PyTorch", 24, api_name="/ask")`
returns the teacher's answer, its figures, the student's answer, its figures, the agreement and a JSON summary.
"""


def _answer_box(side: str) -> gr.Textbox:
    gr.Markdown(f"## {side.title()}")
    return gr.Textbox(label="Answer", lines=3, interactive=False, elem_id=f"{side}-answer", buttons=["copy"])


def _figures(side: str, text: str) -> gr.Markdown:
    return gr.Markdown(text, elem_id=f"{side}-stats", elem_classes="figures")


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
    teacher_info = teacher.info()
    student_infos = {b: r.info() for b, r in students.items()}

    def ask(image, question, backend, max_new_tokens):
        question = (question or "").strip()
        if not question:
            raise gr.Error("Type a question first.")
        if len(question) > limits.max_question_chars:
            raise gr.Error(
                f"The question is {len(question)} characters long; the limit is {limits.max_question_chars}."
            )
        if backend not in students:
            raise gr.Error(f"Unknown student backend {backend!r}; choose one of {', '.join(backends)}.")
        n = int(max_new_tokens)
        if not 1 <= n <= limits.max_new_tokens:
            raise gr.Error(f"max_new_tokens must be between 1 and {limits.max_new_tokens}.")
        image_note = None
        if image is not None:
            original = image.size
            image, shrunk = fit_image(image, limits.max_pixels)
            image_note = {"size": list(image.size), "downscaled_from": list(original) if shrunk else None}
        runners = {TEACHER: teacher, STUDENT: students[backend]}
        s_info = student_infos[backend]
        for answers in stream_answers(runners, image, question, n):
            t, s = answers[TEACHER], answers[STUDENT]
            same = agree(t, s)
            result = {
                "question": question,
                "image": image_note,
                "student_backend": backend,
                TEACHER: summary(t, teacher_info),
                STUDENT: summary(s, s_info),
                "agree": same,
            }
            yield (
                t.text,
                speed(t) + "\n\n" + facts(teacher_info),
                s.text,
                speed(s) + "\n\n" + facts(s_info),
                agreement(same),
                result,
            )

    with gr.Blocks(title="lsd-edge demo", analytics_enabled=False) as app:
        gr.Markdown(_header(teacher_info, student_infos, notes))
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=280):
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
            with gr.Column(scale=2):
                with gr.Row(equal_height=False):
                    with gr.Column(min_width=280):
                        t_answer = _answer_box(TEACHER)
                        t_stats = _figures(TEACHER, facts(teacher_info))
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
            ask,
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
