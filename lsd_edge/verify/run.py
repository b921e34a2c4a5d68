"""`lsd-edge verify EXPORT...`: every row the folders hold answers the same eval questions; each is
scored by the one accuracy path (`lsd_edge.evaluate.accuracy.evaluate_answers`), compared with
PyTorch's answers and, where the runtime gives logits, PyTorch's first-token distribution, and held
to its bounds. A runtime that cannot run here is a skipped row saying why (a failure when required).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from lsd_edge.data.questions import EvalItem, Question
from lsd_edge.errors import LsdEdgeError
from lsd_edge.evaluate.accuracy import evaluate_answers
from lsd_edge.progress import QuietReporter, Reporter, ticker
from lsd_edge.recipe.load import folder_recipe
from lsd_edge.runtime.onnx.layout import first_line
from lsd_edge.runtime.torch_runner import TorchRunner
from lsd_edge.verify.browser import BrowserSide, browser_missing
from lsd_edge.verify.local import LlamaCppSide, OnnxSide, TorchSide, llama_missing
from lsd_edge.verify.node import NodeSide, node_missing
from lsd_edge.verify.plan import REFERENCE, Row, VerifyError, eval_data, eval_questions, make_plan
from lsd_edge.verify.report import Bounds, RowResult, VerifyResult, agreement, first_token_kl, judge

MISSING = {"node": node_missing, "browser": browser_missing, "llama.cpp": llama_missing}
DEFAULT_MAX_NEW_TOKENS = 8


@dataclass
class VerifySettings:
    n: int = 100  # eval questions every row answers
    data: Path | None = None  # LLaVA-format eval JSON; default: the recipe's eval split
    images: Path | None = None
    pytorch: Path | None = None  # default: the folder the exports' reports name
    only: list[str] | None = None  # runtimes to run (PyTorch always runs)
    max_new_tokens: int | None = None  # default: the recipe's [eval], else 8
    bounds: Bounds = field(default_factory=Bounds)


class Recorded:
    """An `Answerer` that keeps the answers it gave, for the agreement with PyTorch's."""

    def __init__(self, answerer):
        self.answerer, self.given = answerer, []

    def answers(self, items, max_new_tokens, *, batch_size=None, progress=None):
        self.given = self.answerer.answers(items, max_new_tokens, batch_size=batch_size, progress=progress)
        return self.given


@dataclass
class Session:
    """What every row is measured against: the questions, PyTorch and its answers and logits."""

    torch_runner: TorchRunner
    questions: dict[str, Question]
    items: list[EvalItem]
    max_new_tokens: int
    reporter: Reporter
    answers: list[str] = field(default_factory=list)
    logits: list = field(default_factory=list)

    def side(self, row: Row):
        if row.runtime == REFERENCE:
            return TorchSide(self.torch_runner)
        if row.runtime == "onnx":
            return OnnxSide(row)
        if row.runtime == "llama.cpp":
            return LlamaCppSide(row, self.torch_runner)
        cls = NodeSide if row.runtime == "node" else BrowserSide
        return cls(row.folder, row.variant, self.questions)

    def measure(self, row: Row) -> RowResult:
        res = RowResult(row.key, row.runtime, row.variant, str(row.model or row.folder))
        missing = MISSING.get(row.runtime, lambda: None)()
        if missing is not None:
            res.status, res.reason = "skipped", missing
            return res
        self.reporter.task(f"verify {row.key}", len(self.items))
        t0 = time.perf_counter()
        try:
            side = self.side(row)
            try:
                rec = Recorded(side.answerer)
                score = evaluate_answers(
                    rec,
                    self.items,
                    self.max_new_tokens,
                    batch_size=side.batch_size,
                    progress=ticker(self.reporter),
                )
                logits = side.first_logits(self.items)
            finally:
                side.close()
        except LsdEdgeError as e:
            res.status, res.reason = "error", first_line(e)
            return res
        finally:
            self.reporter.done()
        res.accuracy, res.questions = score.accuracy, score.n
        res.seconds = round(time.perf_counter() - t0, 2)
        if row.runtime == REFERENCE:
            self.answers, self.logits = rec.given, logits
        res.agreement = agreement(self.answers, rec.given)
        if logits is not None:
            res.first_token_kl = first_token_kl(self.logits, logits)
        return res


def verify(folders: list[Path], settings: VerifySettings, reporter: Reporter | None = None) -> VerifyResult:
    """Every row of `folders` measured and judged; the result names the rows below their bounds."""
    reporter = reporter or QuietReporter()
    plan = make_plan([Path(f) for f in folders], settings.pytorch, settings.only)
    data, images = eval_data(plan, settings.data, settings.images)
    torch_runner = TorchRunner(plan.reference, device="cpu", dtype="float32")
    questions, items = eval_questions(data, settings.images or images, settings.n, torch_runner.processor)
    recipe = folder_recipe(plan.reference)
    max_new = settings.max_new_tokens or (recipe.eval.max_new_tokens if recipe else DEFAULT_MAX_NEW_TOKENS)
    session = Session(
        torch_runner, {it.id: q for it, q in zip(items, questions, strict=True)}, items, max_new, reporter
    )
    result = VerifyResult(
        str(plan.reference), str(data), len(items), max_new, bounds=settings.bounds.as_dict()
    )
    reference = session.measure(plan.rows[0])
    if reference.status != "ok":
        raise VerifyError(f"{plan.reference}: PyTorch could not answer ({reference.reason})")
    result.rows.append(reference)
    for row in plan.rows[1:]:
        result.rows.append(session.measure(row))
    for row in result.rows:
        result.failures += judge(row, reference, settings.bounds)
    return result
