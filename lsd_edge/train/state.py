"""A stage's resume state: one typed record (`TrainingProgress`), saved and loaded in one call each.

Every `run.checkpoint_every` steps a stage writes `state/<key>/step-N/` atomically: its trainable
weights, the latent projections, optimizer and scheduler states, every RNG state, the data stream
position and the bad samples met so far. `--resume` loads the newest one before the loop starts, so
a run killed at any moment continues as if it had not stopped.
"""

from __future__ import annotations

import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsd_edge.data.records import BadSampleLog
from lsd_edge.errors import TrainingError
from lsd_edge.files import atomic_dir, read_json, write_json


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
            # weights_only: tensors, numbers, strings and containers of them; a state that holds
            # anything else (a planted pickle runs code when loaded) is refused, never unpickled
            payload = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise TrainingError(
                f"resume state {folder} holds objects other than tensors and numbers, which could run code "
                "if loaded; it was not loaded: delete that folder (or rerun with --restart)"
            ) from None
        except Exception as e:  # a damaged state file: say which, keep the rest
            raise TrainingError(
                f"resume state {folder} is damaged ({type(e).__name__}); delete that folder to resume from "
                "an earlier step, or rerun with --restart"
            ) from None
        return read_json(folder / "step.json")["step"], payload
    return None


@dataclass
class TrainingProgress:
    """Where a stage is: steps done, the data stream position, and the states to continue from."""

    step: int
    position: int
    trainable: dict[str, torch.Tensor]
    latent: dict[str, Any] | None
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    bad: dict[str, Any]  # BadSampleLog.as_dict() of every process so far

    @classmethod
    def capture(
        cls, step, position, model, latent, optimizer, scheduler, bad: dict[str, Any]
    ) -> TrainingProgress:
        return cls(
            step=step,
            position=position,
            trainable={n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
            latent=None if latent is None else latent.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            rng=rng_state(),
            bad=bad,
        )

    def restore(self, model, latent, optimizer, scheduler, bad: BadSampleLog, main: bool) -> None:
        """Put every state back; the bad-sample counts (all processes') are carried on by rank 0 only."""
        named = dict(model.named_parameters())
        with torch.no_grad():
            for n, v in self.trainable.items():
                named[n].copy_(v)
        if latent is not None and self.latent is not None:
            latent.load_state_dict(self.latent)
        optimizer.load_state_dict(self.optimizer)
        scheduler.load_state_dict(self.scheduler)
        set_rng_state(self.rng)
        if main:
            bad.update(self.bad)

    def save(self, state_dir: str | Path) -> Path:
        payload = {k: v for k, v in self.__dict__.items() if k != "step"}
        return save_step_state(state_dir, self.step, payload)

    @classmethod
    def load(cls, state_dir: str | Path) -> TrainingProgress | None:
        """The newest step state of a stage, or None when it has none."""
        found = latest_step_state(state_dir)
        if found is None:
            return None
        step, payload = found
        fields = {k: payload.get(k) for k in cls.__dataclass_fields__ if k != "step"}
        fields["bad"] = fields["bad"] or {}
        return cls(step=step, **fields)
