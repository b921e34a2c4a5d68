"""A stage's resume state: one typed record (`TrainingProgress`) plus the trainable weights and the
optimizer state as a torch distributed checkpoint, saved and loaded in one call each.

Every `run.checkpoint_every` steps a stage writes `state/<key>/step-N/`: `weights/` (DCP: each
process writes its own shards, so a sharded optimizer state is never gathered on one process, and a
state loads on any number of processes, resharded as it is read), `progress.pt` (steps, data
stream position, scheduler, RNG states, bad samples) and `step.json`, written last: a folder without
it is unfinished and ignored. Nothing is unpickled but tensors, numbers, strings and the checkpoint
format's own metadata records. What the tensors are is the training backend's business
(`lsd_edge.train.backends`: `state_dicts`, `load_state`); every backend writes the same layout, so a
state moves between ZeRO, FSDP2, DDP and one process.
"""

from __future__ import annotations

import pickle
import random
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element

from lsd_edge.errors import TrainingError
from lsd_edge.files import read_json, write_json

PROGRESS_FILE = "progress.pt"
WEIGHTS_DIR = "weights"
DONE_FILE = "step.json"
NOT_METADATA = "is not part of a checkpoint's metadata"  # DCP re-raises a reader's error as text


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors, numbers and strings only (so a state loads with weights_only)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _MetadataUnpickler(pickle.Unpickler):
    """Reads a checkpoint's `.metadata` (a pickle) allowing only the classes that format writes."""

    MODULES = ("torch.distributed.checkpoint.metadata",)
    NAMES = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "Path"),
    }

    def find_class(self, module: str, name: str):
        if module in self.MODULES or (module, name) in self.NAMES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} {NOT_METADATA}")


class SafeReader(FileSystemReader):
    """A checkpoint reader that unpickles no code: metadata through `_MetadataUnpickler`, tensors
    with `weights_only` (the file reader's own), other values through `SafePlanner`."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """The default planner, reading non-tensor values (optimizer settings) with `weights_only`."""

    def load_bytes(self, read_item, value) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _refuse(folder: Path, error: Exception) -> TrainingError:
    if isinstance(error, pickle.UnpicklingError) or NOT_METADATA in str(error):
        return TrainingError(
            f"resume state {folder} holds objects other than tensors and numbers, which could run code "
            "if loaded; it was not loaded: delete that folder (or rerun with --restart)"
        )
    return TrainingError(
        f"resume state {folder} is damaged or was written by another run ({type(error).__name__}); "
        "delete that folder to resume from an earlier step, or rerun with --restart"
    )


def _single() -> bool:
    """A one-process run: the checkpoint is written and read without a process group."""
    return not torch.distributed.is_initialized()


@contextmanager
def _quiet_single():
    """DCP warns on every save and load without a process group that it assumes one process: that
    is what a one-process run asks for (no_dist), and a new user's run should print nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
        )
        yield


def _save(state: dict[str, Any], folder: Path) -> None:
    with _quiet_single():
        dcp.save(state, checkpoint_id=folder, no_dist=_single())


@dataclass
class TrainingProgress:
    """Where a stage is: steps done, the data stream position, and the states to continue from."""

    step: int
    position: int
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    bad: dict[str, Any]  # BadSampleLog.as_dict() of every process so far

    @classmethod
    def capture(cls, step: int, position: int, scheduler, bad: dict[str, Any]) -> TrainingProgress:
        return cls(step, position, scheduler.state_dict(), rng_state(), bad)

    def save(self, state_dir: str | Path, backend, prepared, keep: int = 1) -> Path:
        """Write `state_dir/step-N/` (every process writes its shards of `backend.state_dicts`; rank 0
        the rest) and drop older step folders beyond `keep`. Called by every process."""
        dist = backend.dist
        state_dir = Path(state_dir)
        final = state_dir / f"step-{self.step:07d}"
        if dist.main:
            shutil.rmtree(final, ignore_errors=True)  # a folder left unfinished by a kill
        dist.barrier()
        _save(backend.state_dicts(prepared), final / WEIGHTS_DIR)
        if dist.main:
            torch.save({k: v for k, v in asdict(self).items() if k != "step"}, final / PROGRESS_FILE)
            write_json(final / DONE_FILE, {"step": self.step, "processes": dist.world})
            for old in sorted(p for p in state_dir.glob("step-*") if p.is_dir())[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    @classmethod
    def load(cls, state_dir: str | Path) -> tuple[TrainingProgress, Path] | None:
        """The newest finished step state of a stage and its folder, or None when it has none."""
        for folder in sorted((p for p in Path(state_dir).glob("step-*") if p.is_dir()), reverse=True):
            if not (folder / DONE_FILE).is_file():
                continue
            try:
                # weights_only: tensors, numbers, strings and containers of them; a state that holds
                # anything else (a planted pickle runs code when loaded) is refused, never unpickled
                payload = torch.load(folder / PROGRESS_FILE, map_location="cpu", weights_only=True)
            except Exception as e:
                raise _refuse(folder, e) from None
            step = read_json(folder / DONE_FILE)["step"]
            fields = {k: payload.get(k) for k in cls.__dataclass_fields__ if k != "step"}
            fields["bad"] = fields["bad"] or {}
            return cls(step=step, **fields), folder
        return None

    def restore(self, folder: Path, backend, prepared) -> None:
        """Load the weights and optimizer state (resharded to this run's processes, through
        `backend.load_state`) and put every other state back."""

        def read(state: dict[str, Any]) -> None:
            try:
                reader = SafeReader(folder / WEIGHTS_DIR)
                drop_unsaved_optimizer_state(state, reader.read_metadata().state_dict_metadata)
                with _quiet_single():
                    dcp.load(state, storage_reader=reader, planner=SafePlanner(), no_dist=_single())
            except (Exception, CheckpointException) as e:  # the latter is a BaseException
                raise _refuse(folder, e) from None

        backend.load_state(prepared, read)
        prepared.scheduler.load_state_dict(self.scheduler)
        set_rng_state(self.rng)


def drop_unsaved_optimizer_state(state: dict[str, Any], saved: dict[str, Any]) -> None:
    """Take out of a load template the optimizer state of parameters the saved state has none for.

    AdamW keeps no state for a trainable parameter that has had no gradient yet (a SigLIP tower's
    post_layernorm, which LLaVA's feature layer never reads), so a resume state holds none for it,
    while a template made by a fresh optimizer (`state_dicts` initialises every parameter's state)
    asks for it. Loaded without it, the parameter has no state again, as in the run that was cut.
    Weights are never taken out: a state without one of them is refused as damaged."""
    optim_state = state.get("optim", {}).get("state")
    if not isinstance(optim_state, dict):
        return
    held = {key.rsplit(".", 1)[0] for key in saved if key.startswith("optim.state.")}
    for name in [n for n in optim_state if f"optim.state.{n}" not in held]:
        del optim_state[name]


def has_state(state_dir: str | Path) -> bool:
    return any((p / DONE_FILE).is_file() for p in Path(state_dir).glob("step-*"))
