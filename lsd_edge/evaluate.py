"""Exact-match evaluation of a LLaVA model on LLaVA-format questions, by greedy generation.

Every assistant turn of an eval record is one question: the prompt is the conversation up to it
(earlier answers given), the model answers greedily, and the answer is right if it equals the
reference after normalisation (case, spaces, a trailing period). Scores come overall and per
question `type` (ShapesVQA writes one per record).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lsd_edge.data.llava import (
    BadSample,
    BadSampleLog,
    ChatEncoder,
    load_image,
    read_records,
    record_images,
    to_messages,
)
from lsd_edge.errors import DataError
from lsd_edge.textgen import normalize_answer  # torch-free: the ONNX runner scores with it too


def default_image_dir(path: str | Path) -> Path:
    """Images next to the JSON, or in an `images/` folder beside it (ShapesVQA's layout)."""
    parent = Path(path).parent
    return parent / "images" if (parent / "images").is_dir() else parent


@dataclass
class EvalItem:
    id: str
    type: str
    prompt_ids: list[int]
    images: list  # PIL images
    answer: str


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


def load_eval_items(
    path: str | Path,
    image_dir: str | Path | None,
    processor,
    max_samples: int | None = None,
    log: BadSampleLog | None = None,
) -> list[EvalItem]:
    """One item per assistant turn of each record; bad records are skipped and logged."""
    records = read_records(path)
    image_dir = Path(image_dir) if image_dir is not None else default_image_dir(path)
    encoder = ChatEncoder(processor)
    log = log if log is not None else BadSampleLog()
    items: list[EvalItem] = []
    for k, rec in enumerate(records):
        if max_samples is not None and len(items) >= max_samples:
            break
        rid = str(rec.get("id", f"#{k}"))
        try:
            messages, n_images = to_messages(rec)
            files = record_images(rec)
            if n_images != len(files):
                raise BadSample(
                    f"image count mismatch: {n_images} <image> placeholder(s) but {len(files)} image(s)"
                )
            images = [load_image(image_dir / f) for f in files]
        except BadSample as e:
            log.add(rid, str(e))
            continue
        qtype = str(rec.get("type", "all"))
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            answer = " ".join(c["text"] for c in m["content"] if c["type"] == "text")
            items.append(
                EvalItem(
                    rid if i == 1 else f"{rid}/{i // 2}",
                    qtype,
                    encoder.encode_prompt(messages[:i]),
                    images,
                    answer,
                )
            )
    if not items:
        raise DataError(
            f"{path}: no usable question to evaluate" + (f" ({log.summary()})" if log.total else "")
        )
    return items[:max_samples] if max_samples is not None else items


@torch.no_grad()
def greedy_answers(
    model, processor, items: list[EvalItem], max_new_tokens: int = 8, batch_size: int = 64, progress=None
) -> list[str]:
    """Greedy answers for eval items, batched with left padding."""
    from lsd_edge.models import stop_token_ids

    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop_token_ids(processor)[0]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        T = max(len(it.prompt_ids) for it in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, it in enumerate(chunk):
            ids[i, T - len(it.prompt_ids) :] = torch.tensor(it.prompt_ids)
            mask[i, T - len(it.prompt_ids) :] = 1
        imgs = [im for it in chunk for im in it.images]
        kwargs = {}
        if imgs:
            kwargs["pixel_values"] = processor.image_processor(images=imgs, return_tensors="pt")[
                "pixel_values"
            ].to(device, dtype=next(model.parameters()).dtype)
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_token_ids(processor, model),
            pad_token_id=pad,
            **kwargs,
        )
        for row in gen[:, T:]:
            out.append(tok.decode(row, skip_special_tokens=True))
        if progress is not None:
            progress(min(start + batch_size, len(items)), len(items))
    model.train(was_training)
    return out


def score(items: list[EvalItem], answers: list[str], n_examples: int = 5) -> EvalResult:
    by_type: dict[str, dict[str, float | int]] = {}
    correct = 0
    examples = []
    for it, ans in zip(items, answers, strict=True):
        ok = normalize_answer(ans) == normalize_answer(it.answer)
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


def evaluate(
    model,
    processor,
    path,
    image_dir=None,
    *,
    max_samples=None,
    max_new_tokens=8,
    batch_size=64,
    progress=None,
) -> EvalResult:
    log = BadSampleLog()
    items = load_eval_items(path, image_dir, processor, max_samples, log)
    answers = greedy_answers(model, processor, items, max_new_tokens, batch_size, progress)
    result = score(items, answers)
    result.bad_samples = log.as_dict()
    return result
