"""Every graph of an export, for every variant, and the versions of the tools that made them: what
`lsd-edge export` and the bench's architecture exports share.

The vision encoder and the token embeddings are traced by lsd-edge (`lsd_edge.export.onnx.graphs`) and
quantized by it (`lsd_edge.export.onnx.quantize`); the decoder of each variant comes from
onnxruntime-genai's model builder where it supports the LLM (`lsd_edge.export.onnx.decoder`), else it is
traced and quantized like the other two.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import onnx
import onnxruntime

from lsd_edge.export.gated import versions
from lsd_edge.export.onnx.decoder import (
    DECODER,
    builder_version,
    decoder_plans,
    decoder_report,
    start_builds,
)
from lsd_edge.export.onnx.graphs import export_graphs
from lsd_edge.export.onnx.quantize import quantize_graphs
from lsd_edge.runtime.memory import peak_rss_mb
from lsd_edge.runtime.onnx.layout import GRAPHS

BUILDER_QUANT = {  # a builder run of its own per variant (CUDA): fp16 activations and KV cache
    "int8": "onnxruntime-genai model builder: MatMulNBits, 8 bits, block 32, fp16 activations",
    "int4": "onnxruntime-genai model builder: MatMulNBits, 4 bits, block 32, fp16 activations",
    "fp16": "onnxruntime-genai model builder: float16 weights, activations and KV cache",
}


def write_graphs(
    model,
    out: Path,
    variants: list[str],
    target: str = "cpu",
    opset: int = 18,
    external_data_mb: float = 1536.0,
    decoder: str = "auto",
) -> dict[str, Any]:
    """The graphs of `variants` (fp32 first) into `out`, which holds the model's tokenizer; what was
    made and how long each part took: {"decoder": per-variant source, "quantization": ..., "seconds"}.

    The model builder's runs (subprocesses) go on while the vision encoder and the embeddings are
    traced and quantized here: on a 2-core machine that is most of the export's time."""
    plans = decoder_plans(model.config.text_config, variants, target, decoder)
    builder = plans["fp32"].builder
    traced = tuple(g for g in GRAPHS if not (builder and g == DECODER))
    t0 = time.perf_counter()
    wait = start_builds(model, out, plans, external_data_mb)
    done: dict[str, Any] = {"decoder": decoder_report(plans)}
    try:
        by_graph = export_graphs(model, out, opset, external_data_mb, traced)
        t1 = time.perf_counter()
        for v in variants[1:]:
            done["quantization"] = quantize_graphs(out, v, target, traced)
            if builder:
                done["quantization"]["graphs"][DECODER] = plans[v].quantized or BUILDER_QUANT[v]
        t2 = time.perf_counter()
    except BaseException:
        with contextlib.suppress(Exception):  # the first failure is the one to report
            wait()
        raise
    by_variant, done["builder_peak_mb"] = wait()
    done["seconds"] = {
        "trace_by_graph": {g: round(s, 2) for g, s in by_graph.items()},
        "decoder_builder_by_variant": {v: round(s, 2) for v, s in by_variant.items()},
        "trace": round(t1 - t0, 2),
        "quantize": round(t2 - t1, 2),
        "builder_wait": round(time.perf_counter() - t2, 2),  # after the rest was done: the builder's share
        "graphs": round(time.perf_counter() - t0, 2),
    }
    return done


def export_peak_mb(made: dict[str, Any]) -> dict[str, float]:
    """Peak resident memory of this process and of the model builder's runs (`write_graphs`), MiB."""
    return {"process": round(peak_rss_mb(), 1), "subprocess": round(made["builder_peak_mb"], 1)}


def onnx_versions() -> dict[str, str | None]:
    """The versions an ONNX export report records: PyTorch's, transformers' and the exporters'."""
    return versions(
        onnx=onnx.__version__,
        onnxruntime=onnxruntime.__version__,
        onnxruntime_genai=builder_version() or "not installed",
    )
