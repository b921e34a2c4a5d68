"""Teacher and student answering the same question at once, each in its own thread, streaming.

`stream_answers` runs the models and knows nothing of Gradio: the page (`lsd_edge.demo.page`) only
turns its updates into components.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from lsd_edge.errors import LsdEdgeError
from lsd_edge.runtime.runner import Runner
from lsd_edge.runtime.textgen import Generation


@dataclass
class Answer:
    """One model's answer so far: text grows while streaming; then a generation or an error ends it."""

    text: str = ""
    generation: Generation | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.generation is not None or self.error is not None


class Cancelled(Exception):
    pass


def one_line(e: Exception) -> str:
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
                raise Cancelled
            events.put((key, "text", piece))

        try:
            events.put((key, "done", runner.generate(image, question, max_new_tokens, on_text=on_text)))
        except Cancelled:
            events.put((key, "error", "cancelled"))
        except Exception as e:  # whatever one model raises, the other one's answer still arrives
            events.put((key, "error", one_line(e)))

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
