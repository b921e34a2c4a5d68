"""The layout of an exported folder: which graphs, which variants, which files; needs no torch.

An export folder (written by `lsd_edge.export`) is laid out as an onnx-community repo is, so that
transformers.js and ONNX Runtime load it unchanged. It holds three graphs under `onnx/`, in fp32 and
optionally in one quantized variant beside them (`onnx/<graph><suffix>.onnx`, transformers.js's
dtype suffixes; weights past 1.5 GB in `<file>_data`):

- `vision_encoder.onnx`: pixel_values (N, 3, H, W) -> image_features (N, K, D), projector included;
- `embed_tokens.onnx`: input_ids (B, S) -> inputs_embeds (B, S, D);
- `decoder_model_merged.onnx`: inputs_embeds, attention_mask (B, P+S), position_ids (B, S),
  past_key_values.{i}.key/value (B, kv_heads, P, head_dim) -> logits (B, S, V), present.{i}.key/value
  (B, kv_heads, P+S, head_dim); P = 0 is the prefill, S = 1 a decode step,

plus, at the top, config.json (with `transformers.js_config`), generation_config.json, the tokenizer
(tokenizer.json, tokenizer_config.json with the chat template inline, and chat_template.jinja), the
image processor (preprocessor_config.json with `processor_class`, processor_config.json with the
LLaVA processor's settings), a model card (README.md) and export_report.json. This module names those files; `OnnxRunner` (`lsd_edge.runtime.onnx.runner`) reads all of them
with onnxruntime, numpy, tokenizers, jinja2 and PIL only.
"""

from __future__ import annotations

import json
from pathlib import Path

from lsd_edge.errors import RuntimeModelError
from lsd_edge.workspace import EXPORT_REPORT

GRAPHS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
GRAPH_DIR = "onnx"
LAYOUT = 2  # 1: graphs beside config.json; 2: under onnx/, as transformers.js reads them
# Precision -> file suffix: transformers.js's dtype names (fp32, int8, q4, fp16) and their suffixes.
VARIANT_SUFFIX = {"fp32": "", "int8": "_int8", "int4": "_q4", "fp16": "_fp16"}
JS_DTYPE = {"fp32": "fp32", "int8": "int8", "int4": "q4", "fp16": "fp16"}
REPORT = EXPORT_REPORT


def graph_file(graph: str, variant: str = "fp32") -> str:
    """A graph's path inside an export folder."""
    return f"{GRAPH_DIR}/{graph}{VARIANT_SUFFIX[variant]}.onnx"


def variants_in(folder: str | Path) -> list[str]:
    """The variants whose three graphs are all in `folder`, fp32 first."""
    folder = Path(folder)
    return [v for v in VARIANT_SUFFIX if all((folder / graph_file(g, v)).is_file() for g in GRAPHS)]


def read_json_file(path: Path, what: str) -> dict:
    if not path.is_file():
        raise RuntimeModelError(
            f"{path}: missing {what}; re-run `lsd-edge export` to write a complete folder"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RuntimeModelError(f"{path}: not valid JSON ({e}); re-run `lsd-edge export`") from None


def first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
