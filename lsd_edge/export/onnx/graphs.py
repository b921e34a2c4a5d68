"""The three ONNX graphs of a LlavaForConditionalGeneration, traced with `torch.onnx.export(dynamo=True)`.

Each graph is traced from a small wrapper module, so its inputs and outputs carry the names ONNX
Runtime and web users know (`past_key_values.{i}.key`, `present.{i}.value`) and its batch, sequence
and past axes stay dynamic: the vision encoder with the projector folded in, the token embeddings,
and one decoder for prefill and decode with a KV cache (`lsd_edge.runtime.onnx.layout`).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir
import torch
from torch import nn
from transformers import DynamicCache

from lsd_edge.errors import ExportError
from lsd_edge.runtime.onnx.layout import GRAPH_DIR, GRAPHS, graph_file


class VisionEncoder(nn.Module):
    """pixel_values (N, 3, H, W) -> projected image features (N, K, D).

    What `LlavaModel.get_image_features` computes, without its per-image list, which would pin N to
    the traced batch.
    """

    def __init__(self, model):
        super().__init__()
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        layer = model.config.vision_feature_layer
        self.layers = [layer] if isinstance(layer, int) else list(layer)
        self.drop_cls = model.config.vision_feature_select_strategy == "default"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixel_values, output_hidden_states=True, return_dict=True)
        hs = [out.hidden_states[i] for i in self.layers]  # each (N, P, C)
        if self.drop_cls:
            hs = [h[:, 1:] for h in hs]
        return self.projector(torch.cat(hs, dim=-1))  # (N, K, D)


class EmbedTokens(nn.Module):
    """input_ids (B, S) -> inputs_embeds (B, S, D)."""

    def __init__(self, model):
        super().__init__()
        self.embed = model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class MergedDecoder(nn.Module):
    """The language model and lm_head over a KV cache given as flat tensors.

    inputs_embeds (B, S, D), attention_mask (B, P+S), position_ids (B, S), past: 2L tensors
    (B, kv_heads, P, head_dim) -> logits (B, S, V), 2L present tensors (B, kv_heads, P+S, head_dim).
    P = 0 is a prefill, so one graph serves prefill and decode.
    """

    def __init__(self, model):
        super().__init__()
        self.lm = model.model.language_model
        self.lm_head = model.lm_head
        self.n_layers = model.config.text_config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, past: list[torch.Tensor]):
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.n_layers)])
        out = self.lm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        present = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
        return (self.lm_head(out.last_hidden_state).float(), *present)


def kv_names(n_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def kv_shape(text_config) -> tuple[int, int]:
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return text_config.num_key_value_heads, head_dim


def check_exportable(model) -> None:
    tc = model.config.text_config
    kinds = set(getattr(tc, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ExportError(
            f"the language model has {', '.join(sorted(kinds - {'full_attention'}))} layers; the ONNX export "
            "supports full-attention decoders only"
        )


@contextlib.contextmanager
def quiet():
    """Silence the exporter's and quantizers' chatter (per-node INFO lines, 'consider pre-processing')."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(before)


def weight_mb(module: nn.Module) -> float:
    seen, n = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel() * p.element_size()
    return n / 2**20


def trace(module, args, names_in, names_out, dynamic_shapes, path: Path, opset: int, external: bool) -> None:
    """torch.onnx.export(dynamo=True) of one wrapper to `path`, node metadata stripped."""
    with quiet(), torch.no_grad():
        try:
            prog = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=names_in,
                output_names=names_out,
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
        except Exception as e:  # the tracer's failures are long; keep the first line and the graph name
            text = str(e).strip().splitlines()
            raise ExportError(
                f"tracing {path.stem} failed: {text[0][:300] if text else type(e).__name__}; "
                "run with --debug for the full trace"
            ) from e
    # The exporter records each node's Python stack trace and FX node: large, and local paths.
    for node in prog.model.graph.all_nodes():
        node.metadata_props.clear()
        node.doc_string = None
    prog.model.producer_name = "lsd-edge"
    onnx_ir.save(prog.model, str(path), external_data=f"{path.name}_data" if external else None)
    _drop_value_info(path)


def _drop_value_info(path: Path) -> None:
    """Remove the shapes of intermediate values: ONNX Runtime infers them at load, and on small models
    they are a tenth of the file. The weights (inline or in <file>_data) are not touched."""
    model = onnx.load(str(path), load_external_data=False)
    del model.graph.value_info[:]
    onnx.save_model(model, str(path))


@dataclass
class GraphSpec:
    """One graph to trace: the wrapper, example inputs, I/O names and dynamic axes."""

    module: nn.Module
    args: tuple
    inputs: list[str]
    outputs: list[str]
    dynamic_shapes: dict[str, Any]


def graph_specs(model) -> dict[str, GraphSpec]:
    """The three graphs of a LlavaForConditionalGeneration, with example inputs sized above 1 on every
    dynamic axis (the tracer pins axes of size 0 or 1); a past of length 0 still runs."""
    tc, vc = model.config.text_config, model.config.vision_config
    n_layers = tc.num_hidden_layers
    kv_heads, head_dim = kv_shape(tc)
    Dim = torch.export.Dim
    batch, seq = Dim("batch_size"), Dim("sequence_length")
    B, S, P = 2, 5, 3
    return {
        "vision_encoder": GraphSpec(
            VisionEncoder(model).eval(),
            (torch.randn(B, vc.num_channels, vc.image_size, vc.image_size),),
            ["pixel_values"],
            ["image_features"],
            {"pixel_values": {0: Dim("num_images")}},
        ),
        "embed_tokens": GraphSpec(
            EmbedTokens(model).eval(),
            (torch.randint(0, tc.vocab_size, (B, S)),),
            ["input_ids"],
            ["inputs_embeds"],
            {"input_ids": {0: batch, 1: seq}},
        ),
        "decoder_model_merged": GraphSpec(
            MergedDecoder(model).eval(),
            (
                torch.randn(B, S, tc.hidden_size),
                torch.ones(B, P + S, dtype=torch.long),
                torch.arange(P, P + S).expand(B, S).contiguous(),
                [torch.randn(B, kv_heads, P, head_dim) for _ in range(2 * n_layers)],
            ),
            ["inputs_embeds", "attention_mask", "position_ids", *kv_names(n_layers, "past_key_values")],
            ["logits", *kv_names(n_layers, "present")],
            {
                "inputs_embeds": {0: batch, 1: seq},
                "attention_mask": {0: batch, 1: Dim("total_sequence_length")},
                "position_ids": {0: batch, 1: seq},
                "past": [{0: batch, 2: Dim("past_sequence_length")} for _ in range(2 * n_layers)],
            },
        ),
    }


def export_graphs(
    model, out: Path, opset: int = 18, external_data_mb: float = 1536.0, graphs: tuple[str, ...] = GRAPHS
) -> dict[str, float]:
    """Trace the fp32 `graphs` of a LlavaForConditionalGeneration into `out`; seconds per graph."""
    check_exportable(model)
    (out / GRAPH_DIR).mkdir(exist_ok=True)
    times = {}
    for name, g in graph_specs(model.float().eval()).items():
        if name not in graphs:
            continue
        t0 = time.perf_counter()
        external = weight_mb(g.module) > external_data_mb
        trace(
            g.module, g.args, g.inputs, g.outputs, g.dynamic_shapes, out / graph_file(name), opset, external
        )
        times[name] = time.perf_counter() - t0
    return times
