"""What every backend offers (`Runner`) and what both runners share (`RunnerBase`, `as_image`).

This module imports neither torch nor onnxruntime; `lsd_edge.infer.load_runner`, above both runners,
picks the one a folder needs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from PIL import Image

from lsd_edge.data.questions import EvalItem
from lsd_edge.data.records import BadSample, load_image, open_image_bytes
from lsd_edge.errors import RuntimeModelError
from lsd_edge.runtime.textgen import Generation, SamplingParams


def as_image(image) -> Image.Image | None:
    """What a runner answers about: a PIL image, a path to an image file, or its bytes (None: no image)."""
    if image is None or isinstance(image, Image.Image):
        return image
    try:
        if isinstance(image, str | Path):
            return load_image(Path(image))
        if isinstance(image, bytes | bytearray | memoryview):
            return open_image_bytes(bytes(image))
    except BadSample as e:
        raise RuntimeModelError(f"image: {e}") from None
    raise RuntimeModelError(f"image: give a path, bytes or a PIL image, not {type(image).__name__}")


@runtime_checkable
class Runner(Protocol):
    """One answer to one image and question. `on_text` receives the answer as it grows, piece by piece."""

    name: str
    backend: str  # "torch" or "onnx"

    def generate(
        self,
        image,
        question: str,
        max_new_tokens: int = 64,
        *,
        sampling: SamplingParams | None = None,
        ignore_eos: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation: ...

    def info(self) -> dict: ...


Progress = Callable[[int, int], None]  # (questions answered, questions in all)


class Answerer(Protocol):
    """What the one accuracy path (`lsd_edge.evaluate.accuracy`) asks of a backend: greedy answers,
    in order, to eval items (prompt ids as the chat encoder makes them, and the images they show).

    Both runners are answerers, and so is the GGUF gate's llama.cpp; `batch_size` asks a backend that
    can to answer that many questions at once (PyTorch's batched generate), None one at a time
    through the decode loop."""

    def answers(
        self,
        items: list[EvalItem],
        max_new_tokens: int,
        *,
        batch_size: int | None = None,
        progress: Progress | None = None,
    ) -> list[str]: ...


class RunnerBase:
    """What both runners share: one question about one image is a prompt (`prompt_ids`) and the
    image's model input (`images_input`) handed to `generate_ids`, which decodes with the one loop;
    an eval item is its prompt ids and images handed to it the same way (`answers`)."""

    def generate(
        self,
        image,
        question: str,
        max_new_tokens: int = 64,
        *,
        sampling: SamplingParams | None = None,
        ignore_eos: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        t0 = time.perf_counter()  # preparing the prompt and the image counts toward the first token
        image = as_image(image)
        ids = self.prompt_ids(question, image is not None)
        return self.generate_ids(
            ids,
            self.images_input([] if image is None else [image]),
            max_new_tokens,
            sampling=sampling,
            ignore_eos=ignore_eos,
            on_text=on_text,
            t0=t0,
        )

    def answers(
        self,
        items: list[EvalItem],
        max_new_tokens: int,
        *,
        batch_size: int | None = None,
        progress: Progress | None = None,
    ) -> list[str]:
        """Greedy answers to eval items, one at a time through the decode loop (`Answerer`);
        `batch_size` is for a runner that batches, which overrides this (PyTorch's)."""
        out = []
        for it in items:
            out.append(self.generate_ids(it.prompt_ids, self.images_input(it.images), max_new_tokens).text)
            if progress is not None:
                progress(len(out), len(items))
        return out
