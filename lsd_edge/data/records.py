"""LLaVA-format records: reading the file, turning conversations into chat messages, opening images.

A record is `{"id", "image"?: str | [str], "conversations": [{"from": "human"|"gpt"|"system",
"value": str}, ...]}` with `<image>` placeholders in the text (JSON list or JSONL). A sample that
cannot be used raises `BadSample` with the reason; `BadSampleLog` counts them by reason, so a run
skips and reports them (or stops, by the recipe's policy).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from lsd_edge.errors import DataError
from lsd_edge.models.tokens import IMAGE_TOKEN

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadSample(Exception):
    """A sample that cannot be used; the reason says why."""


EXAMPLES = 3  # sample ids kept per reason, to show


@dataclass
class BadSampleLog:
    """Samples met so far that were skipped (`counts`, by reason) or used in part (`kept`: truncated
    at data.max_length), with a few ids of each to show."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    kept: Counter = field(default_factory=Counter)

    def _example(self, kind: str, sample_id: str) -> None:
        ex = self.examples.setdefault(kind, [])
        if len(ex) < EXAMPLES:
            ex.append(sample_id)

    def add(self, sample_id: str, reason: str) -> None:
        """A skipped sample; its reason's text before the first ':' is what it is counted under."""
        kind = reason.split(":")[0]
        self.counts[kind] += 1
        self._example(kind, sample_id)

    def note(self, sample_id: str, kind: str) -> None:
        """A sample used in part (kind: what was done to it, e.g. 'truncated')."""
        self.kept[kind] += 1
        self._example(f"{kind} (kept)", sample_id)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """The skipped samples, by reason: '2 corrupt image (e.g. a, b); 1 missing image (e.g. c)'."""
        return "; ".join(
            f"{n} {kind} (e.g. {', '.join(self.examples[kind])})" for kind, n in self.counts.items()
        )

    def report(self) -> str:
        """One line for the end of a stage: what was skipped and what was used in part ('' if nothing)."""
        parts = [f"skipped {self.total} bad sample(s): {self.summary()}"] if self.total else []
        parts += [
            f"{n} {kind} at data.max_length and kept (e.g. {', '.join(self.examples[f'{kind} (kept)'])})"
            for kind, n in self.kept.items()
        ]
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "by_reason": dict(self.counts),
            "examples": self.examples,
            "kept": dict(self.kept),
        }

    def update(self, part: dict[str, Any]) -> None:
        """Add the counts of another log's `as_dict()` (another process's, or a resume state's)."""
        self.counts.update(part.get("by_reason", {}))
        self.kept.update(part.get("kept", {}))
        for kind, ids in part.get("examples", {}).items():
            ex = self.examples.setdefault(kind, [])
            ex.extend(i for i in ids[: max(0, EXAMPLES - len(ex))])

    @staticmethod
    def merged(parts: list[dict[str, Any]]) -> BadSampleLog:
        log = BadSampleLog()
        for part in parts:
            log.update(part)
        return log


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a LLaVA-format JSON list or JSONL file; a broken file is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file; check the recipe's data paths (or generate ShapesVQA)")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DataError(
            f"{path}: expected a list of records with 'conversations'; got {type(records).__name__}"
        )
    return records


def record_images(record: dict[str, Any]) -> list[str]:
    """The image files a record names, in order (its `image` is one name or a list of them)."""
    img = record.get("image")
    if img is None:
        return []
    if isinstance(img, str):
        return [img]
    if isinstance(img, list) and all(isinstance(i, str) for i in img):
        return list(img)
    raise BadSample("malformed image field: 'image' must be a file name or a list of file names")


def parse_record(record: dict[str, Any], max_turns: int | None = None) -> tuple[list[dict], list[str]]:
    """The chat messages of a record's first `max_turns` answers and the image files they show.

    Every `<image>` of the record must have its file and every file its `<image>` (a record with
    several is a multi-image sample, as LLaVA-Interleave data has: each image is expanded in place).
    """
    messages, n_used = to_messages(record, max_turns)
    files = record_images(record)
    n_placeholders = sum(turn["value"].count(IMAGE_TOKEN) for turn in record["conversations"])
    if n_placeholders != len(files):
        raise BadSample(
            f"image count mismatch: {n_placeholders} <image> placeholder(s) but {len(files)} image(s)"
        )
    return messages, files[:n_used]


def to_messages(record: dict[str, Any], max_turns: int | None = None) -> tuple[list[dict], int]:
    """LLaVA conversations -> chat-template messages; returns them and the number of images they use."""
    conv = record.get("conversations")
    if not isinstance(conv, list):
        raise BadSample("malformed record: no 'conversations' list")
    if not conv:
        raise BadSample("empty conversation: no turns")
    messages: list[dict] = []
    n_images = 0
    answers = spoken = 0
    for turn in conv:
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("value"), str)
            or turn.get("from") not in ROLES
        ):
            raise BadSample("malformed turn: each turn needs 'from' (human/gpt/system) and a text 'value'")
        role = ROLES[turn["from"]]
        value = turn["value"]
        if role == "assistant":
            if IMAGE_TOKEN in value:
                raise BadSample("image in an answer: <image> may appear in human turns only")
            if max_turns is not None and answers >= max_turns:
                # The kept turns must end with an answer; drop the dangling question too.
                if messages and messages[-1]["role"] == "user":
                    n_images -= sum(1 for c in messages[-1]["content"] if c["type"] == "image")
                    messages.pop()
                break
            answers += 1
            spoken += bool(value.strip())
            messages.append({"role": role, "content": [{"type": "text", "text": value}]})
            continue
        content = []
        pieces = value.split(IMAGE_TOKEN)
        for j, piece in enumerate(pieces):
            if j > 0:
                content.append({"type": "image"})
                n_images += 1
                piece = piece.lstrip("\n")
            piece = piece.strip("\n") if j == 0 else piece
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
        messages.append({"role": role, "content": content})
    if answers == 0:
        raise BadSample("no answer: the conversation has no gpt turn")
    if spoken == 0:
        raise BadSample("empty answer: every gpt turn is blank")
    if messages and messages[-1]["role"] == "user":
        n_images -= sum(1 for c in messages[-1]["content"] if c["type"] == "image")
        messages.pop()
    return messages, n_images


def _rgb(im: Image.Image) -> Image.Image:
    """RGB of a decoded image: 16-bit grayscale scaled to 8 bits, alpha composed over white."""
    if im.mode.startswith("I;16"):  # 16-bit grayscale: scale to 8 bits, not clip
        im = im.point(lambda v: v / 257).convert("L")
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def _decode(source, name: str) -> Image.Image:
    """An image file (a path or a file object) decoded as RGB; a corrupt one is a BadSample."""
    try:
        with Image.open(source) as im:
            im.load()
            return _rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadSample(f"corrupt image: {name} ({type(e).__name__})") from None


def load_image(path: Path) -> Image.Image:
    """Open an image as RGB; grayscale, palette, 16-bit and RGBA images are converted (alpha over white)."""
    if not path.is_file():
        raise BadSample(f"missing image: {path}")
    return _decode(path, path.name)


def open_image_bytes(data: bytes) -> Image.Image:
    """An image file's bytes as RGB, as `load_image` opens a file."""
    return _decode(io.BytesIO(data), f"{len(data)} bytes that are not an image")
