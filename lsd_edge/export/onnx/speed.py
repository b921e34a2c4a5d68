"""Decode speed of PyTorch and of each ONNX variant of an export, on one prompt, in one process.

A quick figure for the export report; `lsd-edge bench` measures each model in its own process.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from lsd_edge.runtime.machine import machine_label
from lsd_edge.runtime.onnx.runner import OnnxRunner


def decode_speed(runners: dict[str, Any], image, question: str, tokens: int, repeats: int) -> dict[str, dict]:
    """Best decode tokens/s of each runner over `repeats` rounds after a warm-up, every run `tokens` long
    (stop tokens ignored). Each round runs every runner once, so a busy machine slows them alike."""
    for r in runners.values():
        r.generate(image, question, min(tokens, 4), ignore_eos=True)
    gens: dict[str, list] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, r in runners.items():
            gens[name].append(r.generate(image, question, tokens, ignore_eos=True))
    return {
        name: {
            "decode_tokens_per_s": round(max(g.decode_tokens_per_s for g in gs), 1),
            "ttft_ms": round(1000 * statistics.median(g.ttft_s for g in gs), 2),
            "prompt_tokens": gs[0].prompt_tokens,
            "new_tokens": gs[0].new_tokens,
        }
        for name, gs in gens.items()
    }


def speed_report(
    torch_runner, folder: Path, variants: list[str], image, tokens: int, repeats: int
) -> dict[str, Any]:
    """Decode tokens/s of PyTorch and of each ONNX variant on one prompt, and the last variant's ratio."""
    runners = {"torch": torch_runner}  # ONNX: fresh sessions, each graph on the threads its size is worth
    runners.update({f"onnx_{v}": OnnxRunner(folder, variant=v) for v in variants})
    speed: dict[str, Any] = decode_speed(runners, image, "describe the image .", tokens, repeats)
    base = speed["torch"]["decode_tokens_per_s"] or float("nan")
    speed["onnx_vs_torch_decode"] = round(speed[f"onnx_{variants[-1]}"]["decode_tokens_per_s"] / base, 2)
    speed["machine"] = machine_label(torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    # what each session was given (OnnxRunner's graph_threads, per variant and graph), not a default's name
    speed["threads"] = {
        "torch": torch.get_num_threads(),
        "onnxruntime": {v: dict(runners[f"onnx_{v}"].graph_threads) for v in variants},
    }
    return speed
