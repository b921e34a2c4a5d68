"""Questions with reference answers, read from a LLaVA-format eval file: the one extractor.

`load_eval_items` asks every assistant turn of every record (the prompt is the conversation up to
it, earlier answers given): what `lsd-edge eval`, distill's eval split and the export's parity gate
score. `first_questions` takes each single-image record's first question and answer, with the
image's path: what the bench's prompts and the demo's examples show, since a runner takes one
image and one question.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lsd_edge.data.chat import ChatEncoder
from lsd_edge.data.records import (
    BadSample,
    BadSampleLog,
    load_image,
    parse_record,
    read_records,
    record_images,
)
from lsd_edge.errors import DataError


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
            messages, files = parse_record(rec)
            images = [load_image(image_dir / f) for f in files]
        except BadSample as e:
            log.add(rid, str(e))
            continue
        qtype = str(rec.get("type", "all"))
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = encoder.encode_prompt(messages[:i])
            shown = images[: n_images(messages[:i])]  # the images placed before this answer
            items.append(EvalItem(rid if i == 1 else f"{rid}/{i // 2}", qtype, prompt, shown, _text(m)))
    if not items:
        raise DataError(
            f"{path}: no usable question to evaluate" + (f" ({log.summary()})" if log.total else "")
        )
    return items[:max_samples] if max_samples is not None else items


@dataclass(frozen=True)
class Question:
    """One image, one question about it, the reference answer and the question's type."""

    image: Path
    question: str
    answer: str
    type: str = "all"


def n_images(messages: list[dict]) -> int:
    """Images shown in chat messages."""
    return sum(1 for m in messages for c in m["content"] if c["type"] == "image")


def _text(message: dict) -> str:
    return " ".join(c["text"] for c in message["content"] if c["type"] == "text")


def first_questions(
    path: str | Path, images: str | Path | None = None, limit: int | None = None, decode: bool = True
) -> list[Question]:
    """Single-image records' first question and answer, in file order, at most `limit` of them.

    Records with another number of images, that do not parse, or whose image is missing (or, with
    `decode`, corrupt: every image is opened) are skipped; a record's later turns are not asked.
    """
    image_dir = Path(images) if images is not None else default_image_dir(path)
    out: list[Question] = []
    for rec in read_records(path):
        if limit is not None and len(out) >= limit:
            break
        try:
            messages, files = parse_record(rec, max_turns=1)
            if len(files) != 1 or len(record_images(rec)) != 1 or not (image_dir / files[0]).is_file():
                continue
            if decode:
                load_image(image_dir / files[0])
        except BadSample:
            continue
        out.append(
            Question(
                image_dir / files[0], _text(messages[0]), _text(messages[1]), str(rec.get("type", "all"))
            )
        )
    return out
