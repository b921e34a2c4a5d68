"""Decode and prefill of ONNX exports (lsd-edge's runner) and GGUF files (llama-bench) in alternating
rounds, best of ROUNDS per row: on a machine whose load moves, every row meets the same moments.

    python scripts/bench_decode.py --threads 2 --rounds 2 --onnx DIR:int8 --onnx DIR:int4 \
        --llama-bench build/bin/llama-bench --gguf qwen05b-Q8_0.gguf --gguf qwen05b-Q4_0.gguf

Decode: `--new-tokens` tokens after one image and a question (the runner's `generate`, stop tokens
ignored; llama-bench `-n N -d <the prompt's length>`). Prefill: the prompt through the decoder alone
(one decoder call; llama-bench `-p <length> -n 0`), no vision encoder. Roofline: decode tokens/s x
the decoder's weight bytes / the bench's copy bandwidth on as many threads. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lsd_edge.bench.llama_cpp import measure_gguf
from lsd_edge.bench.machine import memory_bandwidth
from lsd_edge.bench.worker import onnx_decode_bytes
from lsd_edge.runtime.onnx.runner import OnnxRunner

QUESTION = "what color is the circle ?"


def onnx_round(runner: OnnxRunner, image, new_tokens: int) -> tuple[float, float, int]:
    g = runner.generate(image, QUESTION, new_tokens, ignore_eos=True)
    ids = runner.prompt_ids(QUESTION, True)
    embeds = runner.embed(ids, runner.pixel_values(image))
    t0 = time.perf_counter()
    runner.decode(embeds, runner.new_cache(len(ids) + 1))
    return g.decode_tokens_per_s, len(ids) / (time.perf_counter() - t0), len(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", action="append", default=[], help="EXPORT_DIR:VARIANT (repeatable)")
    ap.add_argument("--gguf", action="append", default=[], help="a GGUF file for --llama-bench (repeatable)")
    ap.add_argument("--llama-bench", default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    a = ap.parse_args()
    runners = {}
    for spec in a.onnx:
        folder, _, variant = spec.rpartition(":")
        runners[f"{Path(folder).name} (onnx {variant})"] = OnnxRunner(
            folder, variant=variant, threads=a.threads
        )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (384, 384, 3), dtype=np.uint8))
    for r in runners.values():  # warm-up
        r.generate(image, QUESTION, 4, ignore_eos=True)
    best: dict[str, list[float]] = {}
    depth = 740
    for _ in range(a.rounds):
        for name, runner in runners.items():
            dec, pre, depth = onnx_round(runner, image, a.new_tokens)
            b = best.setdefault(name, [0.0, 0.0, onnx_decode_bytes(runner)])
            b[0], b[1] = max(b[0], dec), max(b[1], pre)
        for gguf in a.gguf:
            m = measure_gguf(Path(a.llama_bench), Path(gguf), a.threads, depth, a.new_tokens, repeats=1)
            b = best.setdefault(
                f"{Path(gguf).stem} (llama.cpp)", [0.0, 0.0, m["weight_mb_per_token"] * 2**20]
            )
            b[0], b[1] = max(b[0], m["decode_tokens_per_s"]), max(b[1], m["prefill_tokens_per_s"])
    bandwidth = memory_bandwidth(1024, a.threads)
    print(f"{a.threads} thread(s), {depth} tokens of context, copy bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print("| row | decoder MB | decode tok/s | prefill tok/s | roofline |\n|---|---:|---:|---:|---:|")
    for name, (dec, pre, size) in best.items():
        print(
            f"| {name} | {size / 2**20:.0f} | {dec:.1f} | {pre:.0f} | {100 * dec * size / bandwidth:.0f}% |"
        )


if __name__ == "__main__":
    main()
