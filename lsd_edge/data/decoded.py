"""The decoded data a process shares among its data sets: images decoded to pixels and records
encoded to token ids, each within a byte budget, keyed so that an edited file or another processor is
decoded again (`lsd_edge.data.dataset` reads and fills them)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

TEXT_CACHE_RECORDS = 200_000
PIXEL_CACHE_BYTES = 1 << 29  # 512 MiB of decoded images; the embedded default needs about half
TEXT_CACHE_BYTES = 1 << 28  # 256 MiB of token ids and labels; the embedded default needs about 60


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


SHARED_PIXELS = SharedCache(PIXEL_CACHE_BYTES)
SHARED_TEXT = SharedCache(TEXT_CACHE_BYTES)


def processor_key(image_processor) -> str:
    """An image processor as a cache key names it: a digest of its settings."""
    settings = json.dumps(image_processor.to_dict(), sort_keys=True, default=str)
    return hashlib.sha1(settings.encode("utf-8")).hexdigest()
