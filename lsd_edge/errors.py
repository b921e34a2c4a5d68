"""The one exception family of lsd-edge.

Library code raises these with a message a user can act on (what is wrong, and what to do);
only `lsd_edge.cli` catches them and turns them into one red line and exit status 1.
"""

from __future__ import annotations


class LsdEdgeError(Exception):
    """Base of every error a user can cause and fix."""


class RecipeError(LsdEdgeError):
    """A recipe that cannot be read or does not validate; holds every problem found."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        head = (
            f"{source}: {len(problems)} problem(s) in the recipe"
            if len(problems) > 1
            else f"{source}: {problems[0]}"
        )
        super().__init__(head)

    def lines(self) -> list[str]:
        if len(self.problems) == 1:
            return [str(self)]
        return [str(self)] + [f"  {p}" for p in self.problems]


class DataError(LsdEdgeError):
    """A data set or sample that cannot be used."""


class ModelError(LsdEdgeError):
    """A model path, config or tokenizer that cannot be used."""


class TrainingError(LsdEdgeError):
    """A training run that cannot go on (a NaN loss, a stale checkpoint, ...)."""


class ExportError(LsdEdgeError):
    """An ONNX export, quantization or parity check that failed."""


class RuntimeModelError(LsdEdgeError):
    """An exported model that cannot be loaded or run."""


class BenchError(LsdEdgeError):
    """A benchmark that cannot run: bad settings, nothing to measure, or a row's worker failed."""
