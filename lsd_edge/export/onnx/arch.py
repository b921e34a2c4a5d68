"""ONNX exports of real architectures with random weights, for `lsd-edge bench --arch`: made once,
cached under `runs/bench-arch/<name>-<digest>/` with an identity (config, seed, lsd-edge version), and
made again when it no longer matches.

The parity gate of `lsd-edge export` is not run: random weights have no accuracy to keep, and the
gate is tested on trained tiny models.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlavaConfig

import lsd_edge
from lsd_edge.data.shapes import vocabulary
from lsd_edge.export.onnx.assemble import export_peak_mb, onnx_versions, write_graphs
from lsd_edge.export.onnx.decoder import builder_version
from lsd_edge.export.onnx.package import package
from lsd_edge.export.onnx.quantize import sizes_mb
from lsd_edge.files import atomic_dir, write_json
from lsd_edge.identity import Manifest
from lsd_edge.models.archs import arch_processor
from lsd_edge.models.info import random_model
from lsd_edge.runtime.onnx.layout import LAYOUT, REPORT

# The quantized variants measured beside fp32: llama.cpp's Q8_0 and Q4_0 have these as counterparts.
ARCH_VARIANTS = ("int8", "int4")


def arch_manifest(name: str, config: dict[str, Any], seed: int) -> Manifest:
    return Manifest(
        f"the {name} export in",
        {
            "config": config,
            "seed": seed,
            "lsd_edge": lsd_edge.__version__,
            "layout": LAYOUT,
            "variants": list(ARCH_VARIANTS),
            "decoder_builder": builder_version(),
        },
    )


def arch_export_dir(name: str, config: dict[str, Any], seed: int, cache: Path) -> Path:
    """Where an architecture's ONNX export is cached: named by its identity's digest."""
    return Path(cache) / f"{name}-{arch_manifest(name, config, seed).digest[:10]}"


def is_current(folder: Path, name: str, config: dict[str, Any], seed: int) -> bool:
    return (folder / REPORT).is_file() and arch_manifest(name, config, seed).matches(folder)


def export_arch(
    name: str,
    config: dict[str, Any],
    seed: int,
    out: Path,
    threads: int,
    variants: tuple[str, ...] = ARCH_VARIANTS,
    decoder: str = "auto",
) -> Path:
    """Random weights of the architecture in fp32 -> the three graphs and their `variants` in `out`,
    with the processor files the ONNX runner reads. Run in a worker process (`lsd_edge.bench.worker`):
    the fp32 model and the exporter take several times the weights' memory."""
    torch.set_num_threads(threads)
    llava = LlavaConfig.from_dict(config)
    processor = arch_processor(llava.vision_config.image_size, llava.vision_config.patch_size, vocabulary())
    t0 = time.perf_counter()
    with atomic_dir(Path(out)) as tmp:
        llava.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        model = random_model(llava, torch.float32, torch.device("cpu"), seed)
        made = write_graphs(model, tmp, ["fp32", *variants], decoder=decoder)
        del model
        package(tmp, ["fp32", *variants], variants[0])
        write_json(
            tmp / REPORT,
            {
                "arch": name,
                "random_weights": True,
                "default_variant": variants[0],
                "variants": ["fp32", *variants],
                "decoder": made["decoder"],
                "sizes_mb": sizes_mb(tmp, ["fp32", *variants]),
                "seconds": round(time.perf_counter() - t0, 1),
                "timing_s": made["seconds"],
                "peak_rss_mb": export_peak_mb(made),
                "versions": onnx_versions(),
            },
        )
        arch_manifest(name, config, seed).write(tmp)
    return Path(out)
