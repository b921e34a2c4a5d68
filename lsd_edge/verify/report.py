"""What `lsd-edge verify` reports: one `RowResult` per runtime and variant (exact match, agreement
with PyTorch's answers, first-token KL against PyTorch's logits), the bounds each row is held to
(`Bounds`, set for every row or for one runtime or row), the failures, and the JSON.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lsd_edge.verify.plan import RUNTIMES, VerifyError

SCHEMA = 1
DEFAULT_MAX_DROP = 1.0  # points of exact match below PyTorch's, as the gates hold


@dataclass
class RowResult:
    key: str  # runtime/variant
    runtime: str
    variant: str
    folder: str
    status: str = "ok"  # ok | failed | skipped | error
    reason: str | None = None  # why skipped, errored or failed
    accuracy: float | None = None
    agreement: float | None = None  # share of answers identical to PyTorch's
    first_token_kl: float | None = None  # mean KL(PyTorch || runtime) of the first answer token
    questions: int = 0
    seconds: float | None = None


@dataclass
class VerifyResult:
    reference: str
    data: str
    questions: int
    max_new_tokens: int
    rows: list[RowResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    bounds: dict[str, Any] = field(default_factory=dict)  # as given: '' for every row, else a runtime or row
    schema: int = SCHEMA

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_bound(specs: list[str], option: str) -> dict[str, float]:
    """`--max-drop 1 --max-drop llama.cpp=3 --max-drop onnx/int4=2`: a default ('') and per runtime
    or per row values."""
    out: dict[str, float] = {}
    for spec in specs:
        target, _, value = spec.rpartition("=")
        if target and target.split("/")[0] not in RUNTIMES:
            raise VerifyError(f"{option} {spec}: name a runtime ({', '.join(RUNTIMES)}) or runtime/variant")
        try:
            out[target] = float(value)
        except ValueError:
            raise VerifyError(f"{option} {spec}: give a number, or RUNTIME=NUMBER") from None
    return out


@dataclass
class Bounds:
    """Per row: exact match at most `max_drop` points below PyTorch's; optionally agreement at least
    `min_agreement` and first-token KL at most `max_kl`. Runtimes in `require` may not be skipped."""

    max_drop: dict[str, float] = field(default_factory=lambda: {"": DEFAULT_MAX_DROP})
    min_agreement: dict[str, float] = field(default_factory=dict)
    max_kl: dict[str, float] = field(default_factory=dict)
    require: set[str] = field(default_factory=set)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "require": sorted(self.require)}

    @staticmethod
    def pick(values: dict[str, float], row: RowResult) -> float | None:
        """The most specific value given: the row's, its runtime's, then everyone's."""
        for k in (row.key, row.runtime, ""):
            if k in values:
                return values[k]
        return None


def first_token_kl(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Mean over prompts of KL(softmax(ref) || softmax(got)) of the first answer token's logits."""
    kls = []
    for a, b in zip(ref, got, strict=True):
        n = min(len(a), len(b))
        la, lb = _log_softmax(a[:n]), _log_softmax(b[:n])
        kls.append(float(np.sum(np.exp(la) * (la - lb))))
    return float(np.mean(kls)) if kls else math.nan


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def agreement(ref: list[str], got: list[str]) -> float:
    return sum(a.strip() == b.strip() for a, b in zip(ref, got, strict=True)) / max(1, len(ref))


def judge(row: RowResult, reference: RowResult, bounds: Bounds) -> list[str]:
    """Why `row` falls below its bounds, each a line naming the row and the figure."""
    if row.status == "skipped":
        if row.runtime in bounds.require:
            return [f"{row.key}: required (--require {row.runtime}) but skipped: {row.reason}"]
        return []
    if row.status == "error":
        return [f"{row.key}: {row.reason}"]
    if row is reference:
        return []
    out = []
    drop = Bounds.pick(bounds.max_drop, row)
    # `not <=`: NaN figures (a broken runtime) fail every bound
    if drop is not None and not row.accuracy >= reference.accuracy - drop / 100 - 1e-9:
        out.append(
            f"{row.key}: exact match {100 * row.accuracy:.1f}% is "
            f"{100 * (reference.accuracy - row.accuracy):.1f} points below PyTorch's "
            f"{100 * reference.accuracy:.1f}% (bound {drop:g})"
        )
    least = Bounds.pick(bounds.min_agreement, row)
    if least is not None and not row.agreement >= least:
        out.append(
            f"{row.key}: agrees with PyTorch on {100 * row.agreement:.1f}% of answers, below {100 * least:g}%"
        )
    most = Bounds.pick(bounds.max_kl, row)
    if most is not None and row.first_token_kl is not None and not row.first_token_kl <= most:
        out.append(f"{row.key}: first-token KL {row.first_token_kl:.3g} against PyTorch's > {most:g}")
    return out
