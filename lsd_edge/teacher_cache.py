"""The top-k teacher cache: the teacher run once over a stage's data, stored so the stage can train
without it.

For every sample of the stage's data set, encoded exactly as the stage encodes it, the cache holds at
each response position and each visual-token position the teacher's top-k log-probs at the stage's
temperature plus the log of the remaining mass (a proper (k + 1)-bucket distribution), and per image
the teacher's relation matrix R_t (K x K, for RDist) and its projector output (K x Dt, for
('projector', 'projector') latent pairs). Arrays are `.npy` shards read memory-mapped; `index.npy`
says where each sample's rows are, with its length and a checksum of its tokens; `manifest.json`
ties the cache to the teacher's weights, the data file and the settings that decide the positions
(max_length, max_samples, max_turns, temperature, tokenizer size), so a stale cache is refused.

    <cache>/manifest.json  index.npy  shard-00000/{resp,vis}_{ids,logp,tail}.npy relation.npy projector.npy
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsd_edge import losses
from lsd_edge.checkpoint import atomic_dir, read_json, write_json
from lsd_edge.config import StageConfig
from lsd_edge.data.llava import IGNORE_INDEX, BadSampleLog, Batch, BatchLoader, LlavaDataset
from lsd_edge.errors import TrainingError
from lsd_edge.progress import QuietReporter, Reporter

FORMAT = 1
PARTS = ("response", "visual", "relation", "projector")
# index.npy columns; SHARD is -1 for a sample the data set could not use (a bad sample).
SHARD, RESP_AT, N_RESP, VIS_AT, N_VIS, IMG_AT, N_IMG, LENGTH, CHECKSUM = range(9)
# What each identity key means, for the message that refuses a stale cache.
IDENTITY_NAMES = {
    "teacher": "the teacher's weights",
    "data": "the data file",
    "images": "the image folder",
    "max_length": "data.max_length",
    "max_samples": "max_samples",
    "max_turns": "max_turns",
    "temperature": "loss.temperature",
    "vocab_rows": "the tokenizer's size",
}


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
    return parts


def token_checksum(ids: torch.Tensor) -> int:
    """CRC32 of a sample's token ids: a cache row is used only for the very tokens it was made from."""
    return zlib.crc32(ids.to(torch.int32).cpu().numpy().tobytes())


def _remedy(stage: str) -> str:
    return f"make it again with `lsd-edge cache-teacher RECIPE --stage {stage}` (or delete the folder)"


# -------------------------------------------------------------------------------------------- writing


class _ShardWriter:
    """Buffers per-sample rows and writes them as one folder of .npy arrays every `limit` samples."""

    GROUPS = {"resp": ("resp_ids", "resp_logp", "resp_tail"), "vis": ("vis_ids", "vis_logp", "vis_tail")}

    def __init__(self, root: Path, limit: int):
        self.root, self.limit = root, limit
        self.shard = 0
        self._reset()

    def _reset(self) -> None:
        self.buf: dict[str, list[np.ndarray]] = {}
        self.at = {"resp": 0, "vis": 0, "img": 0}
        self.samples = 0

    def add(self, arrays: dict[str, np.ndarray], n_resp: int, n_vis: int, n_img: int) -> list[int]:
        row = [self.shard, self.at["resp"], n_resp, self.at["vis"], n_vis, self.at["img"], n_img]
        for name, a in arrays.items():
            self.buf.setdefault(name, []).append(a)
        self.at["resp"] += n_resp
        self.at["vis"] += n_vis
        self.at["img"] += n_img
        self.samples += 1
        if self.samples >= self.limit:
            self.flush()
        return row

    def flush(self) -> None:
        if self.samples == 0:
            return
        folder = self.root / f"shard-{self.shard:05d}"
        folder.mkdir()
        for name, parts in self.buf.items():
            np.save(folder / f"{name}.npy", np.concatenate(parts))
        self.shard += 1
        self._reset()


def _top_k(dense: losses.DenseTargets, k: int, temperature: float, rows: int, chunk: int):
    """Top-k targets of dense teacher targets, `chunk` positions of logits at a time -> numpy arrays."""
    ids, logp, tail = [], [], []
    for start in range(0, len(dense), chunk):
        t = losses.top_k_targets(dense.rows(slice(start, start + chunk)).logits(rows), k, temperature, rows)
        ids.append(t.ids.to(torch.int32).cpu())
        logp.append(t.logp.float().cpu())
        tail.append(t.tail.float().cpu())
    if not ids:
        k = min(k, rows)
        return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), np.zeros((0,), np.float32)
    return torch.cat(ids).numpy(), torch.cat(logp).numpy(), torch.cat(tail).numpy()


def _split(a: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    return np.split(a, np.cumsum(counts)[:-1])


def build_cache(
    out: str | Path,
    dataset: LlavaDataset,
    online: Callable[[Batch], losses.TeacherTargets],
    *,
    stage: str,
    identity: dict[str, Any],
    parts: list[str],
    top_k: int,
    temperature: float,
    vocab_rows: int,
    teacher_hidden: int,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    policy: str = "skip",
    shard_samples: int = 4096,
    chunk: int = 1024,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Run the teacher (`online`: a batch -> its dense targets) over every sample of `dataset` and
    write the cache folder `out` atomically; returns the manifest."""
    reporter = reporter or QuietReporter()
    out = Path(out)
    n = len(dataset)
    n_tok = dataset.encoder.n_image_tokens
    k = min(top_k, vocab_rows)
    log = BadSampleLog()
    loader = BatchLoader(dataset, dataset.encoder.tokenizer.pad_token_id, policy, log)
    index = np.full((n, 9), -1, np.int64)
    started = time.perf_counter()
    totals = {"response": 0, "visual": 0, "images": 0}
    reporter.task(f"teacher cache {stage}", n)
    with atomic_dir(out) as tmp:
        writer = _ShardWriter(tmp, shard_samples)
        for start in range(0, n, batch_size):
            idx = list(range(start, min(n, start + batch_size)))
            batch = loader.batch(idx)
            if batch is not None:
                batch = batch.to(device)
                with torch.no_grad():
                    t = online(batch)
                resp = batch.labels[:, 1:] != IGNORE_INDEX
                n_resp = resp.sum(1).tolist()
                n_vis = batch.visual_mask.sum(1).tolist()
                n_img = [v // max(1, n_tok) for v in n_vis]
                lengths = batch.attention_mask.sum(1).tolist()
                per_sample: dict[str, list[np.ndarray]] = {}
                if "response" in parts:
                    arrays = _top_k(t.response, k, temperature, vocab_rows, chunk)
                    for name, a in zip(("resp_ids", "resp_logp", "resp_tail"), arrays, strict=True):
                        per_sample[name] = _split(a, n_resp)
                if "visual" in parts:
                    arrays = _top_k(t.visual, k, temperature, vocab_rows, chunk)
                    for name, a in zip(("vis_ids", "vis_logp", "vis_tail"), arrays, strict=True):
                        per_sample[name] = _split(a, n_vis)
                if "relation" in parts and t.visual_tokens is not None:
                    rel = losses.relation_matrix(t.visual_tokens).cpu().numpy()  # (I, K, K)
                    per_sample["relation"] = _split(rel, n_img)
                if "projector" in parts and t.image_features is not None:
                    per_sample["projector"] = _split(t.image_features.float().cpu().numpy(), n_img)
                for b, i in enumerate(batch.indices):
                    row = writer.add(
                        {name: arrs[b] for name, arrs in per_sample.items()}, n_resp[b], n_vis[b], n_img[b]
                    )
                    ids = batch.input_ids[b, : lengths[b]]
                    index[i] = row + [lengths[b], token_checksum(ids)]
                totals["response"] += sum(n_resp)
                totals["visual"] += sum(n_vis)
                totals["images"] += sum(n_img)
            reporter.advance(len(idx))
        writer.flush()
        np.save(tmp / "index.npy", index)
        size = sum(f.stat().st_size for f in tmp.rglob("*.npy"))
        positions = totals["response"] * ("response" in parts) + totals["visual"] * ("visual" in parts)
        manifest = {
            "format": FORMAT,
            "stage": stage,
            "identity": identity,
            "parts": parts,
            "top_k": k,
            "teacher_hidden": teacher_hidden,
            "image_tokens": n_tok,
            "samples": n,
            "bad_samples": log.as_dict(),
            "positions": {"response": totals["response"], "visual": totals["visual"]},
            "images": totals["images"],
            "shards": writer.shard,
            "bytes": size,
            # top-k ids (int32) + log-probs (fp32) + the tail (fp32) of one position
            "topk_bytes_per_position": 8 * k + 4,
            "bytes_per_position": round(size / max(1, positions), 1),
            "seconds": round(time.perf_counter() - started, 2),
        }
        write_json(tmp / "manifest.json", manifest)
    reporter.done()
    return manifest


# -------------------------------------------------------------------------------------------- reading


class TeacherCache:
    """A cache folder opened for training: `targets(batch)` gives the teacher side of a micro-batch."""

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

    def problems(self, identity: dict[str, Any], parts: list[str]) -> list[str]:
        """Why this cache cannot serve a stage with this identity and these needs (empty if it can)."""
        have = self.manifest.get("identity", {})
        out = [
            f"{IDENTITY_NAMES.get(key, key)} changed ({key}: {have.get(key)!r} -> {value!r})"
            for key, value in identity.items()
            if have.get(key) != value
        ]
        missing = [p for p in parts if p not in self.parts]
        if missing:
            out.append(f"it holds no {', '.join(missing)} targets (made when those loss weights were 0)")
        return out

    def check(self, identity: dict[str, Any], parts: list[str]) -> None:
        found = self.problems(identity, parts)
        if found:
            raise TrainingError(
                f"teacher cache {self.folder} is stale: {'; '.join(found)}; {_remedy(self.stage)}"
            )

    def _array(self, shard: int, name: str) -> np.ndarray:
        key = (shard, name)
        if key not in self._arrays:
            path = self.folder / f"shard-{shard:05d}" / f"{name}.npy"
            try:
                self._arrays[key] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise TrainingError(
                    f"teacher cache {self.folder}: cannot read {path.name} of shard {shard} "
                    f"({type(e).__name__}); {_remedy(self.stage)}"
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
                    f"positions differ from the data's): the cache is stale; {_remedy(self.stage)}"
                )

    def targets(self, batch: Batch) -> losses.TeacherTargets:
        """The cached teacher side of a batch, rows in the order loss_terms gathers positions."""
        if not batch.indices or max(batch.indices) >= len(self.index):
            raise TrainingError(
                f"teacher cache {self.folder} has {len(self.index)} samples, fewer than the data set; "
                f"{_remedy(self.stage)}"
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
        )
