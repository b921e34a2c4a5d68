"""Files that are never half written: folders and JSON replaced in one rename, and content hashes.

Every folder lsd-edge makes (checkpoints, caches, exports, data) is written to a temporary sibling
and renamed into place, so a run killed at any moment leaves either the old folder or the new one.
`files_hash` ties a cache to the bytes it was made from, not to names or dates; `jsonable` is how
settings (a dataclass, paths inside) become the JSON a report records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_dir(final: str | Path):
    """Yield a temporary folder; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def jsonable(value: Any) -> Any:
    """`value` as it reads back from JSON: a dataclass as a dict, tuples as lists, paths (and anything
    else JSON has no type for) as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=str))


WEIGHT_FILES = ("config.json", "*.safetensors", "tokenizer.json")


def files_hash(path: str | Path, patterns: tuple[str, ...] = WEIGHT_FILES) -> str:
    """A short hash of file contents: one file, or the files of a folder matching `patterns` (a model
    folder's weights, config and tokenizer), so a cache is tied to bytes, not to names or dates."""
    path = Path(path)
    files = [path] if path.is_file() else sorted({f for p in patterns for f in path.glob(p) if f.is_file()})
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
    return h.hexdigest()[:16]
