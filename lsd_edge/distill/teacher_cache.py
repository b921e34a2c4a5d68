"""The top-k teacher cache: the teacher run once over a stage's data, stored so the stage can train
without it. This module reads a cache and owns its format; `lsd_edge.distill.cache_build` makes one.

For every sample of the stage's data set, encoded exactly as the stage encodes it, the cache holds at
each response position and each visual-token position the teacher's top-k log-probs at the stage's
temperature plus the log of the remaining mass (a proper (k + 1)-bucket distribution), and per image
the teacher's relation matrix R_t (K x K, for RDist) and its projector output (K x Dt, for
('projector', 'projector') latent pairs). Arrays are `.npy` shards read memory-mapped; `index.npy`
says where each sample's rows are, with its length and a checksum of its tokens; `manifest.json`
describes it and `identity.json` (`lsd_edge.identity.Manifest`) ties it to the teacher's weights, the
data file and the settings that decide the positions (max_length, max_samples, max_turns,
temperature, tokenizer size), so a stale cache is refused.

    <cache>/manifest.json identity.json index.npy shard-00000/{resp,vis}_{ids,logp,tail}.npy relation.npy projector.npy
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsd_edge.data.batch import Batch
from lsd_edge.distill import losses
from lsd_edge.errors import TrainingError
from lsd_edge.files import read_json
from lsd_edge.identity import Manifest
from lsd_edge.models.tokens import IGNORE_INDEX
from lsd_edge.recipe.schema import StageConfig

FORMAT = 1
PARTS = ("response", "visual", "relation", "projector", "vision")
# index.npy columns; SHARD is -1 for a sample the data set could not use (a bad sample).
SHARD, RESP_AT, N_RESP, VIS_AT, N_VIS, IMG_AT, N_IMG, LENGTH, CHECKSUM = range(9)
# What an identity key means, for the message that refuses a stale cache (others are named as they are).
IDENTITY_LABELS = {
    "teacher": "the teacher's weights",
    "data": "the data file",
    "images": "the image folder",
    "max_length": "data.max_length",
    "temperature": "loss.temperature",
    "vocab_rows": "the tokenizer's size",
    "student_grid": "the student's visual grid",
}


def cache_manifest(identity: dict[str, Any]) -> Manifest:
    """A teacher cache's identity: everything that decides its content apart from k."""
    return Manifest("the teacher cache in", identity, IDENTITY_LABELS)


def needed_parts(stage: StageConfig) -> list[str]:
    """What a stage's loss weights need from the teacher: a subset of PARTS."""
    lc = stage.loss
    parts = []
    if lc.weight("response_kl") > 0:
        parts.append("response")
    if lc.weight("visual_kl") > 0:
        parts.append("visual")
    if lc.weight("relation") > 0:
        parts.append("relation")
    if lc.weight("latent") > 0 and any(p[0] == "projector" for p in lc.latent_pairs):
        parts.append("projector")
    if lc.weight("vision") > 0:
        parts.append("vision")
    return parts


def token_checksum(ids: torch.Tensor) -> int:
    """CRC32 of a sample's token ids: a cache row is used only for the very tokens it was made from."""
    return zlib.crc32(ids.to(torch.int32).cpu().numpy().tobytes())


def remedy(stage: str) -> str:
    return f"make it again with `lsd-edge cache-teacher RECIPE --stage {stage}` (or delete the folder)"


class TeacherCache:
    """A cache folder opened for training; a `lsd_edge.distill.teacher.Teacher` with no model in memory."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / "manifest.json").is_file():
            raise TrainingError(
                f"{self.folder}: no teacher cache there (no manifest.json); make one with "
                "`lsd-edge cache-teacher RECIPE --stage NAME`"
            )
        try:
            self.manifest = read_json(self.folder / "manifest.json")
            self.index = np.load(self.folder / "index.npy")
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise TrainingError(
                f"{self.folder}: damaged teacher cache ({type(e).__name__}); delete it and make it again"
            ) from None
        if self.manifest.get("format") != FORMAT or self.index.ndim != 2 or self.index.shape[1] != 9:
            raise TrainingError(
                f"{self.folder}: a teacher cache of another format; delete it and make it again"
            )
        self.stage = str(self.manifest.get("stage", "NAME"))
        self._arrays: dict[tuple[int, str], np.ndarray] = {}

    @property
    def parts(self) -> list[str]:
        return list(self.manifest["parts"])

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    @property
    def teacher_hidden(self) -> int:
        return int(self.manifest["teacher_hidden"])

    @property
    def hidden_size(self) -> int:
        return self.teacher_hidden

    @property
    def vision_hidden_size(self) -> int:
        return int(self.manifest.get("teacher_vision_hidden", 0))

    def problems(self, identity: Manifest, parts: list[str]) -> list[str]:
        """Why this cache cannot serve a stage with this identity and these needs (empty if it can)."""
        out = identity.problems(self.folder)
        missing = [p for p in parts if p not in self.parts]
        if missing:
            out.append(f"it holds no {', '.join(missing)} targets (made when those loss weights were 0)")
        return out

    def check(self, identity: Manifest, parts: list[str]) -> None:
        found = self.problems(identity, parts)
        if found:
            raise TrainingError(identity.stale(self.folder, found, remedy(self.stage)))

    def _array(self, shard: int, name: str) -> np.ndarray:
        key = (shard, name)
        if key not in self._arrays:
            path = self.folder / f"shard-{shard:05d}" / f"{name}.npy"
            try:
                self._arrays[key] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise TrainingError(
                    f"teacher cache {self.folder}: cannot read {path.name} of shard {shard} "
                    f"({type(e).__name__}); {remedy(self.stage)}"
                ) from None
        return self._arrays[key]

    def _gather(self, rows: np.ndarray, at: int, count: int, name: str, tail: tuple[int, ...], dtype):
        pieces = [self._array(int(r[SHARD]), name)[r[at] : r[at] + r[count]] for r in rows if r[count] > 0]
        if not pieces:
            return torch.zeros((0, *tail), dtype=dtype)
        return torch.from_numpy(np.concatenate(pieces))

    def _verify(self, batch: Batch, rows: np.ndarray) -> None:
        resp = batch.labels[:, 1:] != IGNORE_INDEX
        n_resp = resp.sum(1).tolist()
        n_vis = batch.visual_mask.sum(1).tolist()
        lengths = batch.attention_mask.sum(1).tolist()
        for b, r in enumerate(rows):
            same = (
                r[SHARD] >= 0
                and r[N_RESP] == n_resp[b]
                and r[N_VIS] == n_vis[b]
                and r[LENGTH] == lengths[b]
                and r[CHECKSUM] == token_checksum(batch.input_ids[b, : lengths[b]])
            )
            if not same:
                raise TrainingError(
                    f"teacher cache {self.folder} does not match sample {batch.ids[b]} (its tokens or answer "
                    f"positions differ from the data's): the cache is stale; {remedy(self.stage)}"
                )

    def targets(self, batch: Batch, need_hidden: bool = False) -> losses.TeacherTargets:
        """The cached teacher side of a batch, rows in the order loss_terms gathers positions (a cache
        holds no per-layer hidden states: the recipe refuses layer latent pairs with a cache)."""
        if not batch.indices or max(batch.indices) >= len(self.index):
            raise TrainingError(
                f"teacher cache {self.folder} has {len(self.index)} samples, fewer than the data set; "
                f"{remedy(self.stage)}"
            )
        rows = self.index[batch.indices]
        self._verify(batch, rows)
        device = batch.input_ids.device
        k, n_tok, width = self.top_k, int(self.manifest["image_tokens"]), self.teacher_hidden

        def topk(prefix: str, at: int, count: int) -> losses.TopKTargets:
            ids = self._gather(rows, at, count, f"{prefix}_ids", (k,), torch.int32)
            logp = self._gather(rows, at, count, f"{prefix}_logp", (k,), torch.float32)
            tail = self._gather(rows, at, count, f"{prefix}_tail", (), torch.float32)
            return losses.TopKTargets(ids.long().to(device), logp.to(device), tail.to(device))

        def images(name: str, tail: tuple[int, ...]) -> torch.Tensor:
            return self._gather(rows, IMG_AT, N_IMG, name, tail, torch.float32).to(device)

        parts = self.parts
        return losses.TeacherTargets(
            response=topk("resp", RESP_AT, N_RESP) if "response" in parts else None,
            visual=topk("vis", VIS_AT, N_VIS) if "visual" in parts else None,
            relation=images("relation", (n_tok, n_tok)) if "relation" in parts else None,
            image_features=images("projector", (n_tok, width)) if "projector" in parts else None,
            vision_features=images("vision", (n_tok, self.vision_hidden_size)) if "vision" in parts else None,
        )
