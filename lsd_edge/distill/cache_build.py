"""Making a top-k teacher cache: the teacher run once over a stage's data set, its targets written in shards.

The format is `lsd_edge.distill.teacher_cache`'s (which reads it): per sample, the top-k log-probs
at every response and visual position plus the tail mass, the relation matrices and the projector
features of its images, and a row of `index.npy` saying where they are.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsd_edge.data.batch import Batch
from lsd_edge.data.dataset import BatchLoader, LlavaDataset
from lsd_edge.data.records import BadSampleLog
from lsd_edge.distill import losses
from lsd_edge.distill.teacher_cache import FORMAT, token_checksum
from lsd_edge.files import atomic_dir, write_json
from lsd_edge.identity import Manifest
from lsd_edge.models.tokens import IGNORE_INDEX
from lsd_edge.progress import QuietReporter, Reporter


class ShardWriter:
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


def _top_k(
    dense: losses.DenseTargets | losses.LogProbTargets, k: int, temperature: float, rows: int, chunk: int
):
    """Top-k targets of dense teacher targets (or of log-probs made already: a pooled visual mixture),
    `chunk` positions of logits at a time -> numpy arrays."""
    ids, logp, tail = [], [], []
    for start in range(0, len(dense), chunk):
        part = dense.rows(slice(start, start + chunk))
        if isinstance(part, losses.LogProbTargets):
            t = losses.top_k_of_log_probs(part.logp, k)
        else:
            t = losses.top_k_targets(part.logits(rows), k, temperature, rows)
        ids.append(t.ids.to(torch.int32).cpu())
        logp.append(t.logp.float().cpu())
        tail.append(t.tail.float().cpu())
    if not ids:
        k = min(k, rows)
        return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), np.zeros((0,), np.float32)
    return torch.cat(ids).numpy(), torch.cat(logp).numpy(), torch.cat(tail).numpy()


def _split(a: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    return np.split(a, np.cumsum(counts)[:-1])


def _batch_rows(
    t: losses.TeacherTargets,
    batch: Batch,
    parts: list[str],
    k: int,
    temperature: float,
    vocab_rows: int,
    chunk: int,
    n_tok: int,
) -> tuple[dict[str, list[np.ndarray]], dict[str, list[int]]]:
    """One batch's cached arrays split per sample, and each sample's response / visual / image counts
    and length."""
    resp = batch.labels[:, 1:] != IGNORE_INDEX
    n_vis = batch.visual_mask.sum(1).tolist()
    counts = {
        "response": resp.sum(1).tolist(),
        "visual": n_vis,
        "images": [v // max(1, n_tok) for v in n_vis],
        "lengths": batch.attention_mask.sum(1).tolist(),
    }
    per_sample: dict[str, list[np.ndarray]] = {}
    for part, prefix, dense in (("response", "resp", t.response), ("visual", "vis", t.visual)):
        if part in parts:
            arrays = _top_k(dense, k, temperature, vocab_rows, chunk)
            for name, a in zip((f"{prefix}_ids", f"{prefix}_logp", f"{prefix}_tail"), arrays, strict=True):
                per_sample[name] = _split(a, counts[part])
    if "relation" in parts and t.visual_tokens is not None:
        rel = losses.relation_matrix(t.visual_tokens).cpu().numpy()  # (I, K, K)
        per_sample["relation"] = _split(rel, counts["images"])
    if "projector" in parts and t.image_features is not None:
        per_sample["projector"] = _split(t.image_features.float().cpu().numpy(), counts["images"])
    if "vision" in parts and t.vision_features is not None:
        per_sample["vision"] = _split(t.vision_features.float().cpu().numpy(), counts["images"])
    return per_sample, counts


def _manifest(
    tmp: Path,
    stage: str,
    parts,
    k: int,
    teacher_hidden: tuple[int, int],
    n_tok: int,
    n: int,
    log: BadSampleLog,
    totals: dict[str, int],
    shards: int,
    started: float,
) -> dict[str, Any]:
    """What a cache holds, for the stage that reads it and for the user (sizes, positions, time)."""
    size = sum(f.stat().st_size for f in tmp.rglob("*.npy"))
    positions = totals["response"] * ("response" in parts) + totals["visual"] * ("visual" in parts)
    return {
        "format": FORMAT,
        "stage": stage,
        "parts": parts,
        "top_k": k,
        "teacher_hidden": teacher_hidden[0],
        "teacher_vision_hidden": teacher_hidden[1],
        "image_tokens": n_tok,
        "samples": n,
        "bad_samples": log.as_dict(),
        "positions": {"response": totals["response"], "visual": totals["visual"]},
        "images": totals["images"],
        "shards": shards,
        "bytes": size,
        # top-k ids (int32) + log-probs (fp32) + the tail (fp32) of one position
        "topk_bytes_per_position": 8 * k + 4,
        "bytes_per_position": round(size / max(1, positions), 1),
        "seconds": round(time.perf_counter() - started, 2),
    }


def build_cache(
    out: str | Path,
    dataset: LlavaDataset,
    online: Callable[[Batch], losses.TeacherTargets],
    *,
    stage: str,
    identity: Manifest,
    parts: list[str],
    top_k: int,
    temperature: float,
    vocab_rows: int,
    teacher_hidden: int,
    teacher_vision_hidden: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    policy: str = "skip",
    shard_samples: int = 4096,
    chunk: int = 1024,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Run the teacher (`online`: a batch -> its dense targets) over every sample of `dataset` and
    write the cache folder `out` atomically; returns the manifest. `dataset` is the stage's own (the
    student's encoding; with the teacher's view where it sees with another grid), and `online` gives
    targets on the student's grid, so the rows are the ones the stage gathers."""
    reporter = reporter or QuietReporter()
    n, n_tok, k = len(dataset), dataset.encoder.n_image_tokens, min(top_k, vocab_rows)
    log = BadSampleLog()
    loader = BatchLoader(dataset, dataset.encoder.tokenizer.pad_token_id, policy, log)
    index = np.full((n, 9), -1, np.int64)
    started = time.perf_counter()
    totals = {"response": 0, "visual": 0, "images": 0}
    reporter.task(f"teacher cache {stage}", n)
    with atomic_dir(Path(out)) as tmp:
        writer = ShardWriter(tmp, shard_samples)
        for start in range(0, n, batch_size):
            idx = list(range(start, min(n, start + batch_size)))
            batch = loader.batch(idx)
            if batch is not None:
                batch = batch.to(device)
                with torch.no_grad():
                    t = online(batch)
                per_sample, c = _batch_rows(t, batch, parts, k, temperature, vocab_rows, chunk, n_tok)
                for b, i in enumerate(batch.indices):
                    arrays = {name: arrs[b] for name, arrs in per_sample.items()}
                    row = writer.add(arrays, c["response"][b], c["visual"][b], c["images"][b])
                    ids = batch.input_ids[b, : c["lengths"][b]]
                    index[i] = row + [c["lengths"][b], token_checksum(ids)]
                for key in totals:
                    totals[key] += sum(c[key])
            reporter.advance(len(idx))
        writer.flush()
        np.save(tmp / "index.npy", index)
        manifest = _manifest(
            tmp,
            stage,
            parts,
            k,
            (teacher_hidden, teacher_vision_hidden),
            n_tok,
            n,
            log,
            totals,
            writer.shard,
            started,
        )
        write_json(tmp / "manifest.json", manifest)
        identity.write(tmp)
    reporter.done()
    return manifest
