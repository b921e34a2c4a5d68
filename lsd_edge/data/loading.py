"""A stage's micro-batches decoded ahead of the loop by DataLoader workers, in exactly the order a
run without workers reads them.

`SlotSampler` yields, from a stream position on, this process's micro-batch slots of every step:
slot k of a step holds samples [position + k*B, position + (k+1)*B) of the one global stream. The
order is a pure function of the start position, so a resume state needs one integer and rebuilds
it exactly on any number of processes; a loader state saved per process (a StatefulDataLoader's)
could not move to another process count. `SlotData` decodes and collates one slot in a worker and
returns it with the bad samples it met; `SlotReader` counts each bad sample once, whichever worker
met it, and turns a refused sample into an error raised in the loop, not in the worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Sampler

from lsd_edge.data.batch import Batch
from lsd_edge.data.dataset import BatchLoader, LlavaDataset
from lsd_edge.data.records import BadSampleLog
from lsd_edge.data.sampling import IndexStream
from lsd_edge.errors import DataError

MAX_AUTO_WORKERS = 8


def auto_workers(local_processes: int) -> int:
    """`data.num_workers` when the recipe leaves it out: the cores each process has, less the one
    that trains, at most 8 (0 on a machine with one core per process)."""
    cores = os.cpu_count() or 1
    return max(0, min(MAX_AUTO_WORKERS, cores // max(1, local_processes) - 1))


class SlotSampler(Sampler):
    """Endless: the sample indices of each of this process's slots, step after step (() = no slot)."""

    def __init__(
        self, stream: IndexStream, start: int, per_micro: int, per_step: int, slots: list[int | None]
    ):
        self.stream, self.start, self.per_micro, self.per_step, self.slots = (
            stream,
            start,
            per_micro,
            per_step,
            slots,
        )

    def __iter__(self):
        position = self.start
        while True:
            for k in self.slots:
                yield (
                    ()
                    if k is None
                    else tuple(self.stream.take(position + k * self.per_micro, self.per_micro))
                )
            position += self.per_step


@dataclass
class Slot:
    batch: Batch | None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (sample id, reason)
    truncated: list[str] = field(default_factory=list)
    error: str | None = None

    def pin_memory(self) -> Slot:
        return Slot(
            None if self.batch is None else self.batch.pin_memory(), self.skipped, self.truncated, self.error
        )


class _Events:
    """What a BatchLoader met in one slot (it calls `add` and `note` as on a BadSampleLog)."""

    def __init__(self):
        self.skipped: list[tuple[str, str]] = []
        self.truncated: list[str] = []

    def add(self, sample_id: str, reason: str) -> None:
        self.skipped.append((sample_id, reason))

    def note(self, sample_id: str, kind: str) -> None:
        self.truncated.append(sample_id)


class SlotData(torch.utils.data.Dataset):
    def __init__(self, dataset: LlavaDataset, pad_id: int, policy: str):
        self.loader = BatchLoader(dataset, pad_id, policy)

    def __getitem__(self, indices: tuple[int, ...]) -> Slot:
        if not indices:
            return Slot(None)
        events = _Events()
        self.loader.log = events
        try:
            batch = self.loader.batch(list(indices))
        except DataError as e:  # raised in the loop, as one line, not as a worker's traceback
            return Slot(None, error=str(e))
        return Slot(batch, events.skipped, events.truncated)

    def __len__(self) -> int:
        return len(self.loader.dataset)


def _as_is(slot: Slot) -> Slot:
    return slot


class SlotReader:
    """This process's micro-batches of each step, from `num_workers` worker processes (0: read here)."""

    def __init__(
        self,
        dataset: LlavaDataset,
        pad_id: int,
        policy: str,
        sampler: SlotSampler,
        log: BadSampleLog,
        num_workers: int,
        pin_memory: bool,
    ):
        self.slots = len(sampler.slots)
        self.log = log
        self._seen: set[tuple[str, str]] = set()
        loader = DataLoader(
            SlotData(dataset, pad_id, policy),
            sampler=sampler,
            batch_size=None,
            collate_fn=_as_is,
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=4 if num_workers else None,
            persistent_workers=num_workers > 0,
            # its own seed source: the loader's iterator draws one, and the run's RNG must not move
            generator=torch.Generator().manual_seed(0),
        )
        self._it = iter(loader)

    def step(self) -> list[Batch | None]:
        """The next step's slots (None: nothing to run); a sample refused under bad_samples = 'error'
        raises DataError here."""
        out, error = [], None
        for _ in range(self.slots):
            slot: Slot = next(self._it)
            error = error or slot.error
            for sid, reason in slot.skipped:
                if ("skip", sid) not in self._seen:
                    self._seen.add(("skip", sid))
                    self.log.add(sid, reason)
            for sid in slot.truncated:
                if ("cut", sid) not in self._seen:
                    self._seen.add(("cut", sid))
                    self.log.note(sid, "truncated")
            out.append(slot.batch)
        if error is not None:
            raise DataError(error)
        return out

    def close(self) -> None:
        """Stop the workers (the sampler is endless, so they would wait for more)."""
        self._it = None
