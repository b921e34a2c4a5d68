"""Self-describing checkpoints and the resume state of a run.

A model checkpoint is an HF `save_pretrained` folder (weights + config + processor files) plus
`recipe.toml` (the resolved recipe that made it) and `metrics.json`. Every folder is written to a
temporary sibling and renamed into place, so a run killed at any moment leaves either the old
folder or the new one, never half of one. Mid-stage step states hold what an exact resume needs:
trainable weights, optimizer, scheduler, RNG states and the data position.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsd_edge.errors import TrainingError

DONE = "metrics.json"  # written last: a folder with it is complete


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


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / DONE).is_file()


def save_checkpoint(
    folder: str | Path, model, processor, recipe_toml: str, metrics: dict[str, Any], extra=None
) -> None:
    """An HF folder + recipe.toml + metrics.json (+ extra JSON files), atomically."""
    from lsd_edge.models import save_model

    with atomic_dir(folder) as tmp:
        save_model(model, processor, tmp)
        (tmp / "recipe.toml").write_text(recipe_toml, encoding="utf-8")
        for name, data in (extra or {}).items():
            write_json(tmp / name, data)
        write_json(tmp / DONE, metrics)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (configs), to tie a cache to what made it."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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


# ------------------------------------------------------------------------------------------- step state


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_step_state(state_dir: str | Path, step: int, payload: dict[str, Any], keep: int = 1) -> Path:
    """Write `state_dir/step-XXXXXXX/` atomically and drop older step folders beyond `keep`."""
    state_dir = Path(state_dir)
    final = state_dir / f"step-{step:07d}"
    with atomic_dir(final) as tmp:
        torch.save(payload, tmp / "state.pt")
        write_json(tmp / "step.json", {"step": step})
    steps = sorted(p for p in state_dir.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_step_state(state_dir: str | Path) -> tuple[int, dict[str, Any]] | None:
    state_dir = Path(state_dir)
    for folder in sorted((p for p in state_dir.glob("step-*") if p.is_dir()), reverse=True):
        if not (folder / "step.json").is_file():
            continue
        try:
            payload = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
        except Exception as e:  # a damaged state file: say which, keep the rest
            raise TrainingError(
                f"resume state {folder} is damaged ({type(e).__name__}); delete that folder to resume from "
                "an earlier step, or rerun with --restart"
            ) from None
        return read_json(folder / "step.json")["step"], payload
    return None
