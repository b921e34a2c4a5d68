"""A LLaVA-format data set encoded lazily, and batches of it.

`LlavaDataset[i]` is one encoded sample (`lsd_edge.data.batch.Encoded`: token ids, labels, pixel
values) or raises `BadSample`; `BatchLoader` turns a list of indices into a `Batch` (collated by
`lsd_edge.data.batch.collate`), skipping or refusing bad samples. The order
of indices is the trainer's (`lsd_edge.data.sampling`), so a batch is a pure function of it.

A student that sees with another visual grid than its teacher (METHOD.md, "edge vision") trains on
batches that carry the teacher's view of the same samples (`Batch.teacher`): the same text, each
image's run of the student's visual tokens replaced by the teacher's, and the images made by the
teacher's image processor (`TeacherView`). A teacher with another tokenizer than its student reads
each record in its own tokens (`TeacherView.encoder`): its view is then the record encoded by its
chat encoder, and both sides mark the answer tokens where the two tokenizations start a token at the
same character of the same answer (`Encoded.kd`, `lsd_edge.data.chat.common_starts`): the logit
terms compare the distributions predicting those tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lsd_edge.data.batch import Batch, Encoded, collate
from lsd_edge.data.chat import ChatEncoder, common_starts
from lsd_edge.data.decoded import (
    SHARED_PIXELS,
    SHARED_TEXT,
    TEXT_CACHE_RECORDS,
    file_key,
    processor_key,
)
from lsd_edge.data.records import BadSample, BadSampleLog, load_image, parse_record, read_records
from lsd_edge.errors import DataError
from lsd_edge.models.tokens import IGNORE_INDEX, image_tokens_at


@dataclass(frozen=True)
class TeacherView:
    """How the teacher sees what the student sees with another grid: its image processor and the
    visual tokens it gives one image (`n_image_tokens`); with another tokenizer, its chat encoder
    (`encoder`: the teacher reads each record in its own tokens)."""

    image_processor: Any
    n_image_tokens: int
    encoder: ChatEncoder | None = None


def regrid(ids: torch.Tensor, labels: torch.Tensor, image_id: int, per_image: int, new_per_image: int):
    """ids and labels (T,) with each image's run of `per_image` visual tokens made `new_per_image`
    long (the text, labels included, unchanged): a sample as a model with another grid reads it."""
    is_img = ids == image_id
    first = is_img & (torch.cumsum(is_img.long(), 0) % per_image == 1 % per_image)
    keep = ~is_img | first
    repeats = torch.where(first, new_per_image, 1)[keep]
    return ids[keep].repeat_interleave(repeats), labels[keep].repeat_interleave(repeats)


def truncate(
    ids: torch.Tensor, labels: torch.Tensor, n_images: int, image_id: int, per_image: int, max_length: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A sample cut to at most `max_length` tokens, never inside an image's visual tokens (an image
    cut in part is dropped whole, with every token after it); returns ids, labels and the images kept."""
    cut = max_length
    at = (ids == image_id).nonzero().flatten()
    kept = int((at < cut).sum()) // per_image
    if kept < n_images:
        cut = min(cut, int(at[kept * per_image]))
    return ids[:cut], labels[:cut], kept


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
        teacher_view: TeacherView | None = None,
    ):
        self.path = Path(path)
        self.teacher_view = teacher_view
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
            self._pixel_key = processor_key(self.image_processor)
            if teacher_view is not None:
                self._teacher_pixel_key = processor_key(teacher_view.image_processor)

    def __len__(self) -> int:
        return len(self.records)

    def sample_id(self, index: int) -> str:
        return str(self.records[index].get("id", f"#{index}"))

    def _pixels(self, path: Path, image_processor, pixel_key: str | None) -> torch.Tensor:
        """(3, H, W) pixel values of one image file by `image_processor`, from the process's cache
        when this data set is small enough to cache."""
        where = file_key(path) if self.cache else None
        key = None if where is None else (where, pixel_key)
        px = SHARED_PIXELS.get(key)
        if px is None:
            px = image_processor(images=[load_image(path)], return_tensors="pt")["pixel_values"][0]
            SHARED_PIXELS.put(key, px, px.numel() * px.element_size())
        return px

    def _image(self, name: str) -> torch.Tensor:
        """(3, H, W) pixel values of one image file; refused when the vision tower would give it
        another number of visual tokens than `<image>` expands to (an image processor that keeps each
        image's own size)."""
        px = self._pixels(self.image_dir / name, self.image_processor, self.cache and self._pixel_key)
        n = image_tokens_at(self.encoder.processor, px.shape[-2], px.shape[-1])
        if n != self.encoder.n_image_tokens:
            raise BadSample(
                f"image token mismatch: {name} becomes {px.shape[-2]}x{px.shape[-1]} pixels, {n} visual "
                f"tokens, but <image> expands to {self.encoder.n_image_tokens}"
            )
        return px

    def __getitem__(self, index: int) -> Encoded:
        # Token ids and labels of a record depend on the file, the record, max_turns and the encoder
        # (not max_length: a sample is cut to it here, on every read).
        key = (
            None
            if not self.cache or self._file is None
            else (self._file, index, self.max_turns, self._text_key)
        )
        return self._sample(index, *self._text(index, self.encoder, key))

    def rewritten(self, index: int, messages: list[dict], files: list[str]) -> Encoded:
        """Sample `index` encoded from chat `messages` showing image `files` instead of its record (its
        answers rewritten, say; a blank answer is one too, its label the end of the turn), as
        `__getitem__` encodes a record: cut to max_length, with the teacher's view; never cached."""
        encoded = self._encode_messages(messages, files, self.encoder)
        return self._sample(index, *encoded, source=(messages, files))

    def pixels(self, files: list[str]) -> list[torch.Tensor]:
        """(3, H, W) pixel values of image files of this data set, as its samples hold them."""
        return [self._image(f) for f in files]

    def _sample(
        self,
        index: int,
        ids: torch.Tensor,
        labels: torch.Tensor,
        files: list[str],
        starts: torch.Tensor,
        source: tuple[list[dict], list[str]] | None = None,
    ) -> Encoded:
        """A sample from its token ids, labels, image files and answer starts: cut to max_length, its
        pixels, the teacher's view. `source`: the messages and files it was encoded from, where they
        are not its record's (a teacher with another tokenizer encodes the same)."""
        cut = len(ids) > self.max_length
        if cut:
            n = len(ids)
            ids, labels, kept = truncate(
                ids, labels, len(files), self.encoder.image_id, self.encoder.n_image_tokens, self.max_length
            )
            files = files[:kept]
            if not (labels[1:] != IGNORE_INDEX).any():
                raise BadSample(
                    f"truncated: no answer left within data.max_length {self.max_length} ({n} tokens); "
                    "raise data.max_length or shorten the sample"
                )
        pixels = torch.stack(self.pixels(files)) if files else None
        sample = Encoded(self.sample_id(index), ids, labels, pixels, index, cut)
        if self.teacher_view is not None and self.teacher_view.encoder is not None:
            sample.teacher = self._teacher_tokens(sample, files, starts[: len(ids)], source)
        elif self.teacher_view is not None:
            sample.teacher = self._teacher_side(sample, files)
        return sample

    def _text(self, index: int, encoder: ChatEncoder, key: tuple | None):
        """(ids, labels, image files, answer starts) of a record by `encoder`, from the process's cache."""
        text = SHARED_TEXT.get(key)
        if text is None:
            text = self._encode_text(index, encoder)
            ids, labels, _, starts = text
            SHARED_TEXT.put(key, text, (ids.numel() + labels.numel() + starts.numel()) * 8 + 512)
        return text

    def _teacher_tokens(
        self,
        sample: Encoded,
        files: list[str],
        starts: torch.Tensor,
        source: tuple[list[dict], list[str]] | None = None,
    ) -> Encoded:
        """The teacher's view of a sample where it has another tokenizer: the record (or `source`'s
        messages and files) encoded by its own chat encoder, cut to the images the student kept (an
        image the student's cut dropped is dropped with every token after it), its pixels; both
        sides' `kd` masks of the answer tokens whose starts both tokenizations share (`common_starts`)."""
        view = self.teacher_view
        enc = view.encoder
        if source is not None:
            ids, labels, t_files, t_starts = self._encode_messages(*source, enc)
        else:
            key = (
                None
                if not self.cache or self._file is None
                else (self._file, sample.index, self.max_turns, enc.key)
            )
            ids, labels, t_files, t_starts = self._text(sample.index, enc, key)
        if len(t_files) > len(files):
            at = (ids == enc.image_id).nonzero().flatten()
            cut = int(at[len(files) * enc.n_image_tokens])
            ids, labels, t_starts = ids[:cut], labels[:cut], t_starts[:cut]
        s_keep, t_keep = common_starts(starts.tolist(), t_starts.tolist())
        sample.kd = torch.tensor(s_keep, dtype=torch.bool)
        key = self.cache and self._teacher_pixel_key
        pixels = [self._pixels(self.image_dir / f, view.image_processor, key) for f in files]
        return Encoded(
            sample.id,
            ids,
            labels,
            torch.stack(pixels) if pixels else None,
            sample.index,
            sample.truncated,
            kd=torch.tensor(t_keep, dtype=torch.bool),
            pad_image=(enc.tokenizer.pad_token_id or 0, enc.image_id),  # padding is masked out
        )

    def _teacher_side(self, sample: Encoded, files: list[str]) -> Encoded:
        """The teacher's view of an encoded sample: the same tokens with its visual-token runs, its pixels."""
        view = self.teacher_view
        ids, labels = regrid(
            sample.input_ids,
            sample.labels,
            self.encoder.image_id,
            self.encoder.n_image_tokens,
            view.n_image_tokens,
        )
        key = self.cache and self._teacher_pixel_key
        pixels = [self._pixels(self.image_dir / f, view.image_processor, key) for f in files]
        return Encoded(
            sample.id, ids, labels, torch.stack(pixels) if pixels else None, sample.index, sample.truncated
        )

    def _encode_text(
        self, index: int, encoder: ChatEncoder
    ) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
        return self._encode_messages(*parse_record(self.records[index], self.max_turns), encoder)

    def _encode_messages(
        self, messages: list[dict], files: list[str], encoder: ChatEncoder
    ) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
        """(ids, labels, image files, answer starts) of chat `messages` showing `files`, by `encoder`."""
        ids, labels, starts = encoder.encode_with_starts(messages)
        ids_t = torch.tensor(ids)
        n_vis = int((ids_t == encoder.image_id).sum())
        if n_vis != len(files) * encoder.n_image_tokens:
            raise BadSample(
                f"image token mismatch: the text holds {n_vis} image tokens, not {len(files)} image(s) x "
                f"{encoder.n_image_tokens} (an image token typed in the text?)"
            )
        if all(lab == IGNORE_INDEX for lab in labels[1:]):
            raise BadSample("no answer tokens: every answer is empty")
        return ids_t, torch.tensor(labels), files, torch.tensor(starts)


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
        self._cut: set[int] = set()

    def get(self, index: int) -> Encoded | None:
        if index in self._bad:
            return None
        try:
            sample = self.dataset[index]
        except BadSample as e:
            sid = self.dataset.sample_id(index)
            if self.policy == "error":
                raise DataError(
                    f"sample {sid} in {self.dataset.path}: {e}; fix the sample or set data.bad_samples = 'skip'"
                ) from None
            self._bad.add(index)
            self.log.add(sid, str(e))
            return None
        if sample.truncated and index not in self._cut:
            self._cut.add(index)
            self.log.note(sample.id, "truncated")
        return sample

    def batch(self, indices: list[int]) -> Batch | None:
        samples = [s for s in (self.get(i) for i in indices) if s is not None]
        if not samples:
            return None
        return collate(samples, self.pad_id, self.image_id)
