"""The one exact-match scorer, torch-free: an answer is right if it equals the reference after normalisation.

Normalisation ignores case, runs of spaces and a trailing period or exclamation mark. Every accuracy
lsd-edge reports (distill's eval split, `lsd-edge eval`, the ONNX and GGUF export gates, the bench's
accuracy column, the demo's agreement line, regenerated data's changed count) compares through
`exact_match`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from lsd_edge.data.questions import EvalItem


def normalize_answer(text: str) -> str:
    """Exact-match normalisation: case, runs of spaces, a trailing period or exclamation mark."""
    text = text.strip().lower()
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s*[.!]+$", "", text)
    return text.strip()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


@dataclass
class EvalResult:
    accuracy: float
    n: int
    correct: int
    by_type: dict[str, dict[str, float | int]]
    bad_samples: dict[str, Any] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "n": self.n,
            "correct": self.correct,
            "by_type": self.by_type,
            "bad_samples": self.bad_samples,
            "examples": self.examples,
        }


def score(items: list[EvalItem], answers: list[str], n_examples: int = 5) -> EvalResult:
    by_type: dict[str, dict[str, float | int]] = {}
    correct = 0
    examples = []
    for it, ans in zip(items, answers, strict=True):
        ok = exact_match(ans, it.answer)
        correct += ok
        t = by_type.setdefault(it.type, {"n": 0, "correct": 0})
        t["n"] += 1
        t["correct"] += int(ok)
        if len(examples) < n_examples:
            examples.append({"id": it.id, "answer": it.answer, "prediction": ans.strip(), "correct": ok})
    for t in by_type.values():
        t["accuracy"] = t["correct"] / t["n"]
    return EvalResult(
        correct / len(items), len(items), correct, dict(sorted(by_type.items())), examples=examples
    )
