"""Exact-match evaluation of a LLaVA model by batched greedy generation: a model folder
(`lsd-edge eval`) or the model in training (distill's eval split).

Every assistant turn of an eval record is one question (`lsd_edge.data.questions`); PyTorch answers
many at a time with left padding (`lsd_edge.runtime.torch_runner.greedy_answers`) and the one
accuracy path (`lsd_edge.evaluate.accuracy`) scores the answers overall and per question `type`
(ShapesVQA writes one per record).
"""

from __future__ import annotations

from pathlib import Path

from lsd_edge.data.questions import EvalItem, load_eval_items
from lsd_edge.data.records import BadSampleLog
from lsd_edge.evaluate.accuracy import BATCH_SIZE, evaluate_answers
from lsd_edge.evaluate.score import EvalResult
from lsd_edge.models.groups import eager
from lsd_edge.progress import Reporter, ticker
from lsd_edge.recipe.schema import Recipe
from lsd_edge.runtime.runner import Progress
from lsd_edge.runtime.torch_runner import TorchRunner, greedy_answers


class TrainingModel:
    """The model in training as an `Answerer`: batched greedy answers; its train/eval mode, device
    and compiled form are left as they are (a `TorchRunner` would take the model over)."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor

    def answers(
        self,
        items: list[EvalItem],
        max_new_tokens: int,
        *,
        batch_size: int | None = None,
        progress: Progress | None = None,
    ) -> list[str]:
        batch = BATCH_SIZE if batch_size is None else batch_size
        with eager():
            return greedy_answers(self.model, self.processor, items, max_new_tokens, batch, progress)


def evaluate(
    model_dir: str | Path,
    path,
    image_dir=None,
    *,
    max_samples=None,
    max_new_tokens=8,
    batch_size=BATCH_SIZE,
    progress=None,
) -> EvalResult:
    """A model folder's exact match on an eval file, its skipped records in `bad_samples`."""
    runner = TorchRunner(model_dir)
    log = BadSampleLog()
    items = load_eval_items(path, image_dir, runner.processor, max_samples, log)
    result = evaluate_answers(runner, items, max_new_tokens, batch_size=batch_size, progress=progress)
    result.bad_samples = log.as_dict()
    return result


def eval_split(recipe: Recipe, model, processor, label: str, reporter: Reporter) -> dict:
    """The recipe's eval split scored with its [eval] settings, with a progress bar; {} without one."""
    if recipe.data.eval is None:
        return {}
    path, images = recipe.data.resolve(recipe.data.eval)
    ev = recipe.eval
    log = BadSampleLog()
    items = load_eval_items(path, images, processor, ev.max_samples, log)
    reporter.task(f"eval {label}", len(items))
    answerer = TrainingModel(model, processor)
    result = evaluate_answers(
        answerer, items, ev.max_new_tokens, batch_size=ev.batch_size, progress=ticker(reporter)
    )
    result.bad_samples = log.as_dict()
    reporter.advance(0, f"accuracy {result.accuracy:.3f}")
    reporter.done()
    return result.as_dict()
