"""What a made folder is tied to, and the one check that refuses it when that changed.

Every folder lsd-edge makes once and reuses later (the ShapesVQA data root, the cached teacher, each
finished stage, regenerated answers, a teacher cache, a bench export of a real architecture) holds
an `identity.json` written by a `Manifest`: the settings and file hashes it was made from, under the
names a user knows (`data.shapes.jitter`, `stages[2].lr`). Reusing the folder compares the stored
identity with the one the current recipe gives, field by field, and a difference is reported in one
form, naming every changed field and what to do:

    the cached teacher in runs/tiny/teacher is stale: teacher.tiny.hidden_size changed (128 -> 256); ...

Settings are recorded as they differ from the defaults (`settings`), so a release that adds an
option with a default keeps every earlier folder valid.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lsd_edge.errors import LsdEdgeError
from lsd_edge.files import jsonable, read_json, write_json

IDENTITY_FILE = "identity.json"
_UNSET = object()


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (configs, hashes)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def settings(section: Any) -> dict[str, Any]:
    """A recipe section as it identifies a made folder: only what differs from the defaults, less the
    settings that change how fast it is made, not what (a section's `NOT_IDENTITY`)."""
    skip = set(getattr(section, "NOT_IDENTITY", ()))
    return section.model_dump(mode="json", exclude_defaults=True, exclude=skip or None)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as {"a.b[0].c": leaf}; an empty dict or list is a leaf of its own."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def _show(value: Any) -> str:
    # Settings are recorded only where they differ from the defaults: a missing one is at its default.
    return "default" if value is _UNSET else repr(value)


@dataclass(frozen=True)
class Manifest:
    """`what` names the folder's kind in messages ("the cached teacher in"); `tied_to` holds what it
    was made from, JSON-able; `labels` give a top-level key a reader's name ("the teacher's weights")."""

    what: str
    tied_to: dict[str, Any]
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def normalized(self) -> dict[str, Any]:
        """`tied_to` as it reads back from JSON (tuples become lists, paths strings)."""
        return jsonable(self.tied_to)

    @property
    def digest(self) -> str:
        return fingerprint(self.normalized)

    def record(self) -> dict[str, Any]:
        """The contents of identity.json."""
        return {"what": self.what, "digest": self.digest, "tied_to": self.normalized}

    def write(self, folder: str | Path) -> None:
        write_json(Path(folder) / IDENTITY_FILE, self.record())

    def problems(self, folder: str | Path) -> list[str]:
        """Why `folder` was not made from this identity: one line per changed field (empty if it was)."""
        path = Path(folder) / IDENTITY_FILE
        if not path.is_file():
            return [f"it has no {IDENTITY_FILE} (made by an earlier lsd-edge, or by hand)"]
        try:
            stored = read_json(path).get("tied_to")
        except (OSError, ValueError, AttributeError):
            stored = None
        if not isinstance(stored, dict):
            return [f"its {IDENTITY_FILE} is damaged"]
        have, want = flatten(stored), flatten(self.normalized)
        out = []
        for key in list(want) + [k for k in have if k not in want]:
            old, new = have.get(key, _UNSET), want.get(key, _UNSET)
            if old == new:
                continue
            label = self.labels.get(key.split(".")[0].split("[")[0])
            if label:
                out.append(f"{label} changed ({key}: {_show(old)} -> {_show(new)})")
            else:
                out.append(f"{key} changed ({_show(old)} -> {_show(new)})")
        return out

    def matches(self, folder: str | Path) -> bool:
        return not self.problems(folder)

    def stale(self, folder: str | Path, problems: list[str], remedy: str) -> str:
        """The one message form of a stale folder."""
        return f"{self.what} {folder} is stale: {'; '.join(problems)}; {remedy}"

    def check(self, folder: str | Path, remedy: str, error: type[LsdEdgeError] = LsdEdgeError) -> None:
        """Raise `error` naming every changed field and `remedy` when `folder` is stale."""
        found = self.problems(folder)
        if found:
            raise error(self.stale(folder, found, remedy))
