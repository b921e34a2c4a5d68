"""Data-loading time per step with 0 and N DataLoader workers at the real recipes' image size.

    python scripts/bench_loading.py [--workers 0,1,2] [--steps 6] [--micro 4] [--accum 8] [--compute 1.0]

Random 640x480 JPEG photos (COCO's typical size) preprocessed as SigLIP-so400m takes them (384 px,
patch 14, resized bicubic and normalised), one image per sample; the data set is read uncached, as
a large one is. A step is `accum` micro-batches of `micro` samples; each worker count reads the same
steps after one warm-up step. Between steps the main process computes for `--compute` seconds on
one thread (a stand-in for the training step, during which workers read ahead); the figure is the
time the loop waits for a step's data, with its ratio to 0 workers. Every worker count must read
the same batches.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lsd_edge.data.dataset import LlavaDataset
from lsd_edge.data.loading import SlotReader, SlotSampler
from lsd_edge.data.records import BadSampleLog
from lsd_edge.data.sampling import IndexStream
from lsd_edge.models.build import tiny_processor

WORDS = "what is in the picture a photo of some objects on table".split()


def write_data(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(
            folder / "images" / f"{i}.jpg", quality=90
        )
        records.append(
            {
                "id": str(i),
                "image": f"{i}.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\nwhat is in the picture"},
                    {"from": "gpt", "value": "a photo of some objects on a table"},
                ],
            }
        )
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def busy(seconds: float) -> None:
    a = torch.randn(256, 256)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)


def seconds_per_step(ds, pad_id: int, workers: int, steps: int, micro: int, accum: int, compute: float):
    sampler = SlotSampler(IndexStream(len(ds), seed=0), 0, micro, micro * accum, list(range(accum)))
    reader = SlotReader(ds, pad_id, "skip", sampler, BadSampleLog(), workers, pin_memory=False)
    try:
        reader.step()  # warm-up: workers start, first batches in flight
        waited, read = 0.0, []
        for _ in range(steps):
            busy(compute)
            t0 = time.perf_counter()
            read.append(reader.step())
            waited += time.perf_counter() - t0
        return waited / steps, read
    finally:
        reader.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--accum", type=int, default=8)
    ap.add_argument("--compute", type=float, default=1.0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    processor = tiny_processor(WORDS, 384, 14)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp), (a.steps + 1) * a.micro * a.accum)
        ds = LlavaDataset(data, Path(tmp) / "images", processor, max_length=2048, cache=False)
        base, first = None, None
        print(f"| workers | data wait per step, s ({a.accum} x {a.micro} images) | vs 0 workers |")
        print("|---|---|---|")
        for w in (int(x) for x in a.workers.split(",")):
            s, read = seconds_per_step(
                ds, processor.tokenizer.pad_token_id, w, a.steps, a.micro, a.accum, a.compute
            )
            pixels = [b.pixel_values for step in read for b in step]
            first = first or pixels
            assert all(torch.equal(x, y) for x, y in zip(first, pixels, strict=True)), "other batches"
            base = base or s
            print(f"| {w} | {s:.3f} | {s / base:.2f} |")


if __name__ == "__main__":
    main()
