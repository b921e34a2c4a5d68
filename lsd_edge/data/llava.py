"""LLaVA-format data: loading, chat templating, label masks, visual-token positions, collation.

A record is `{"id", "image"?: str | [str], "conversations": [{"from": "human"|"gpt"|"system",
"value": str}, ...]}` with `<image>` placeholders in the text (JSON list or JSONL). Prompts are
rendered with the processor's chat template; each `<image>` becomes the processor's number of
visual tokens. Labels are -100 everywhere except the assistant answers (and their end-of-turn
token). Bad samples are skipped and counted, or stop the run, by the recipe's policy.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from lsd_edge.errors import DataError
from lsd_edge.models import IMAGE_TOKEN, image_token_id, num_image_tokens

IGNORE_INDEX = -100
TEXT_CACHE_RECORDS = 200_000
PIXEL_CACHE_BYTES = 1 << 29  # 512 MiB of decoded images; the embedded default needs about half
TEXT_CACHE_BYTES = 1 << 28  # 256 MiB of token ids and labels; the embedded default needs about 60
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadSample(Exception):
    """A sample that cannot be used; the reason says why."""


@dataclass
class Encoded:
    id: str
    input_ids: torch.Tensor  # (T,) long, visual tokens expanded
    labels: torch.Tensor  # (T,) long, -100 outside assistant answers
    pixel_values: torch.Tensor | None  # (n_images, 3, H, W)
    index: int = -1  # position in its data set (what a teacher cache is keyed by)


@dataclass
class BadSampleLog:
    """Bad samples met so far: counted by reason, with a few ids of each to show."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, sample_id: str, reason: str) -> None:
        kind = reason.split(":")[0]
        self.counts[kind] += 1
        ex = self.examples.setdefault(kind, [])
        if len(ex) < 3:
            ex.append(sample_id)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return "; ".join(
            f"{n} {kind} (e.g. {', '.join(self.examples[kind])})" for kind, n in self.counts.items()
        )

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "by_reason": dict(self.counts), "examples": self.examples}


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
    img = record.get("image")
    if img is None:
        return []
    return [img] if isinstance(img, str) else list(img)


def to_messages(record: dict[str, Any], max_turns: int | None = None) -> tuple[list[dict], int]:
    """LLaVA conversations -> chat-template messages; returns them and the number of images they use."""
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise BadSample("empty conversation: no turns")
    messages: list[dict] = []
    n_images = 0
    answers = 0
    for turn in conv:
        if not isinstance(turn, dict) or "value" not in turn or turn.get("from") not in ROLES:
            raise BadSample("malformed turn: each turn needs 'from' (human/gpt/system) and 'value'")
        role = ROLES[turn["from"]]
        value = str(turn["value"])
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
    if messages and messages[-1]["role"] == "user":
        n_images -= sum(1 for c in messages[-1]["content"] if c["type"] == "image")
        messages.pop()
    return messages, n_images


def load_image(path: Path) -> Image.Image:
    """Open an image as RGB; grayscale, palette and RGBA images are converted (alpha over white)."""
    if not path.is_file():
        raise BadSample(f"missing image: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(bg, rgba).convert("RGB")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadSample(f"corrupt image: {path.name} ({type(e).__name__})") from None


class SharedCache:
    """Decoded data shared by every data set of a process, within a byte budget.

    A run's stages (the teacher's PT and SFT, the student's DPT, SFT and DFT) read the same files, so
    each image is decoded, and each record rendered and tokenized, once per run rather than once per
    stage. Keys name the file by path, size and modification time, and the processor by its
    settings, so an edited file or another processor is decoded again.
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.used = 0
        self._items: dict[tuple, Any] = {}

    def get(self, key: tuple | None) -> Any:
        return None if key is None else self._items.get(key)

    def put(self, key: tuple | None, value: Any, size: int) -> None:
        if key is not None and key not in self._items and self.used + size <= self.budget:
            self._items[key] = value
            self.used += size


def file_key(path: Path) -> tuple | None:
    """A file as a cache key names it: resolved path, size, modification time (None if unreadable)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


SHARED_PIXELS = SharedCache(PIXEL_CACHE_BYTES)
SHARED_TEXT = SharedCache(TEXT_CACHE_BYTES)


class ChatEncoder:
    """Turns messages into token ids and labels with the processor's chat template."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_id = image_token_id(processor)
        self.n_image_tokens = num_image_tokens(processor)
        probe = self.tokenizer(IMAGE_TOKEN, add_special_tokens=False)["input_ids"]
        if probe != [self.image_id]:
            raise DataError(
                f"the tokenizer does not keep {IMAGE_TOKEN} as one token; use the LLaVA processor's"
            )

    @property
    def key(self) -> str:
        """What the encoding of a record depends on: the tokenizer, the chat template, the number
        of visual tokens per image."""
        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        vocab = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
        template = getattr(self.processor, "chat_template", None) or getattr(tok, "chat_template", None)
        return _digest(f"{vocab}\0{template}\0{self.n_image_tokens}\0{self.image_id}")

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _expand(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        out_ids, out_labels = [], []
        for t, lab in zip(ids, labels, strict=True):
            if t == self.image_id:
                out_ids += [t] * self.n_image_tokens
                out_labels += [IGNORE_INDEX] * self.n_image_tokens
            else:
                out_ids.append(t)
                out_labels.append(lab)
        return out_ids, out_labels

    def encode(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Token ids and labels of a whole conversation; labels only on assistant answers."""
        full = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not full.startswith(before) or not full.startswith(upto):
                raise DataError(
                    "the chat template does not render conversations as prefixes; cannot mask labels"
                )
            spans.append((len(before), len(upto)))
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [IGNORE_INDEX] * len(ids)
        for j, (start, end) in enumerate(enc["offset_mapping"]):
            if end <= start:
                continue
            if any(s <= start < e for s, e in spans):
                # Trailing template whitespace after the end-of-turn token is not part of the answer.
                if full[start:end].strip():
                    labels[j] = ids[j]
        return self._expand(ids, labels)

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a prompt ending with the assistant's generation prompt."""
        text = self.render(messages, add_generation_prompt=True)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._expand(ids, [IGNORE_INDEX] * len(ids))[0]


def user_message(question: str, n_images: int = 1) -> dict:
    content: list[dict] = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": question})
    return {"role": "user", "content": content}


class LlavaDataset(torch.utils.data.Dataset):
    """LLaVA-format records, encoded lazily; `__getitem__` returns an `Encoded` or raises `BadSample`."""

    def __init__(
        self,
        path: str | Path,
        image_dir: str | Path | None,
        processor,
        *,
        max_length: int = 2048,
        max_samples: int | None = None,
        max_turns: int | None = None,
        cache: bool | None = None,
    ):
        self.path = Path(path)
        self.records = read_records(self.path)
        if max_samples is not None:
            self.records = self.records[:max_samples]
        if not self.records:
            raise DataError(f"{self.path}: no records; the data set is empty")
        self.image_dir = Path(image_dir) if image_dir is not None else self.path.parent
        self.encoder = ChatEncoder(processor)
        self.image_processor = processor.image_processor
        self.max_length = max_length
        self.max_turns = max_turns
        # Small data sets (the embedded default) are encoded once: token ids per record, decoded
        # pixels per image file, within a memory budget; big ones are encoded on every pass.
        self.cache = len(self.records) <= TEXT_CACHE_RECORDS if cache is None else cache
        if self.cache:
            self._file = file_key(self.path)
            self._text_key = self.encoder.key
            self._pixel_key = _digest(json.dumps(self.image_processor.to_dict(), sort_keys=True, default=str))

    def __len__(self) -> int:
        return len(self.records)

    def sample_id(self, index: int) -> str:
        return str(self.records[index].get("id", f"#{index}"))

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def _image(self, name: str) -> torch.Tensor:
        """(3, H, W) pixel values of one image file, from the process's cache when this data set is
        small enough to cache."""
        path = self.image_dir / name
        where = file_key(path) if self.cache else None
        key = None if where is None else (where, self._pixel_key)
        px = SHARED_PIXELS.get(key)
        if px is None:
            px = self.pixel_values([load_image(path)])[0]
            SHARED_PIXELS.put(key, px, px.numel() * px.element_size())
        return px

    def __getitem__(self, index: int) -> Encoded:
        # Token ids and labels of a record depend on the file, the record, max_turns and the encoder
        # (not max_length: that is checked here, on every read).
        key = (
            None
            if not self.cache or self._file is None
            else (self._file, index, self.max_turns, self._text_key)
        )
        text = SHARED_TEXT.get(key)
        if text is None:
            text = self._encode_text(index)
            ids, labels, _ = text
            SHARED_TEXT.put(key, text, (ids.numel() + labels.numel()) * 8 + 512)
        ids, labels, files = text
        if len(ids) > self.max_length:
            raise BadSample(f"too long: {len(ids)} tokens > data.max_length {self.max_length}")
        pixels = torch.stack([self._image(f) for f in files]) if files else None
        return Encoded(self.sample_id(index), ids, labels, pixels, index)

    def _encode_text(self, index: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        record = self.records[index]
        messages, n_used = to_messages(record, self.max_turns)
        files = record_images(record)
        n_placeholders = sum(
            1
            for turn in record.get("conversations", [])
            for _ in range(str(turn.get("value", "")).count(IMAGE_TOKEN))
        )
        if n_placeholders != len(files):
            raise BadSample(
                f"image count mismatch: {n_placeholders} <image> placeholder(s) but {len(files)} image(s)"
            )
        files = files[:n_used]
        ids, labels = self.encoder.encode(messages)
        if all(lab == IGNORE_INDEX for lab in labels):
            raise BadSample("no answer tokens: every answer is empty")
        return torch.tensor(ids), torch.tensor(labels), files


@dataclass
class Batch:
    ids: list[str]
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 where no loss
    pixel_values: torch.Tensor | None  # (n_images, 3, H, W), images in sample order
    visual_mask: torch.Tensor  # (B, T) bool, True at visual-token positions
    indices: list[int] = field(default_factory=list)  # each sample's position in its data set

    def to(self, device) -> Batch:
        return Batch(
            self.ids,
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            None if self.pixel_values is None else self.pixel_values.to(device),
            self.visual_mask.to(device),
            self.indices,
        )

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(samples: list[Encoded], pad_id: int, image_id: int) -> Batch:
    """Right-pad a list of samples into a batch."""
    T = max(len(s.input_ids) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[i, :n] = s.input_ids
        labels[i, :n] = s.labels
        attention[i, :n] = 1
    pix = [s.pixel_values for s in samples if s.pixel_values is not None]
    pixel_values = torch.cat(pix) if pix else None
    return Batch(
        [s.id for s in samples],
        input_ids,
        attention,
        labels,
        pixel_values,
        input_ids == image_id,
        [s.index for s in samples],
    )


class BatchLoader:
    """Yields batches of a data set in a given order of indices, skipping or refusing bad samples.

    The order is passed in (the trainer owns shuffling and the resume position), so a batch is a
    pure function of (order, position).
    """

    def __init__(
        self, dataset: LlavaDataset, pad_id: int, policy: str = "skip", log: BadSampleLog | None = None
    ):
        self.dataset = dataset
        self.pad_id = pad_id
        self.image_id = dataset.encoder.image_id
        self.policy = policy
        self.log = log if log is not None else BadSampleLog()
        self._bad: set[int] = set()

    def get(self, index: int) -> Encoded | None:
        if index in self._bad:
            return None
        try:
            return self.dataset[index]
        except BadSample as e:
            sid = self.dataset.sample_id(index)
            if self.policy == "error":
                raise DataError(
                    f"sample {sid} in {self.dataset.path}: {e}; fix the sample or set data.bad_samples = 'skip'"
                ) from None
            self._bad.add(index)
            self.log.add(sid, str(e))
            return None

    def batch(self, indices: list[int]) -> Batch | None:
        samples = [s for s in (self.get(i) for i in indices) if s is not None]
        if not samples:
            return None
        return collate(samples, self.pad_id, self.image_id)
