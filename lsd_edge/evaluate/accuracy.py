"""The one accuracy path, torch-free: a backend's greedy answers to eval items, scored by `score`.

PyTorch, ONNX Runtime and llama.cpp answer through the `Answerer` protocol (`lsd_edge.runtime.runner`)
and are scored here the same way: `lsd-edge eval`, distill's eval split, the ONNX and GGUF export
gates and the bench's accuracy column all call `evaluate_answers`.
"""

from __future__ import annotations

from lsd_edge.data.questions import EvalItem
from lsd_edge.evaluate.score import EvalResult, score
from lsd_edge.runtime.runner import Answerer, Progress

BATCH_SIZE = 64  # questions PyTorch answers at once, as `lsd-edge eval` does by default


def evaluate_answers(
    answerer: Answerer,
    items: list[EvalItem],
    max_new_tokens: int,
    *,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> EvalResult:
    """Exact match of `answerer`'s greedy answers to `items`, overall and per question type.

    `batch_size` lets a backend that batches (PyTorch) answer that many at once; None answers one at a
    time through the decode loop (what the bench times and the ONNX gate runs)."""
    return score(items, answerer.answers(items, max_new_tokens, batch_size=batch_size, progress=progress))
