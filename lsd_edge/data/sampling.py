"""The order a stage reads its data set in: an endless stream of sample indices, one number per position."""

from __future__ import annotations

import torch


class IndexStream:
    """An endless stream of sample indices: epoch e is a permutation seeded by (seed, e).

    A stream position is a plain integer, so the data position of a resume state is one number.
    """

    def __init__(self, n: int, seed: int):
        self.n = n
        self.seed = seed
        self._perm: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def take(self, position: int, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            epoch, offset = divmod(position, self.n)
            chunk = self._permutation(epoch)[offset : offset + count - len(out)].tolist()
            out += chunk
            position += len(chunk)
        return out
