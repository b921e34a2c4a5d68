"""Quantized variants of the fp32 graphs, written beside them, and the files' sizes.

- int8 on cpu: ONNX Runtime dynamic quantization, per-channel int8 weights, on every MatMul with a
  constant weight (lm_head included: on real models it is up to a third of the decoder, and its
  per-channel scales are per vocabulary row); MatMuls between activations stay float.
- int8 on cuda, and int4 anywhere: weight-only MatMulNBits (8 or 4 bits, blocks of 32, symmetric),
  because dynamic int8 ops fall back to the CPU under the CUDA execution provider.
- The embedding table: tied embeddings are untied by the three-graph layout (embed_tokens.onnx
  gathers from the table, the decoder multiplies by it as lm_head). In every quantized variant the
  table is stored int8 with one scale per row (token): a Gather reads whole rows, so per-row scales
  cost nothing and keep each token's row within 1/254 of its own range, where ONNX Runtime's
  dynamic Gather quantization would use one scale for the whole table.
- fp16: every float weight and op in float16, inputs and outputs kept float32 (so one runner serves
  all variants).

The quantizers are imported when a variant is asked for (they are heavy, and an fp32 export does
not need them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lsd_edge.export.onnx.graphs import quiet
from lsd_edge.runtime.onnx.layout import GRAPHS, graph_file


def is_external(path: Path) -> bool:
    return (path.parent / f"{path.name}_data").is_file()


def save_proto(model, path: Path, external: bool) -> None:
    del model.graph.value_info[:]  # as _drop_value_info: ONNX Runtime infers them
    for p in (path, path.parent / f"{path.name}_data"):
        p.unlink(missing_ok=True)
    if external:
        onnx.save_model(  # small tensors stay inline: ONNX Runtime reads shape constants from the graph
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{path.name}_data",
        )
    else:
        onnx.save_model(model, str(path))


def quantize_gather_rows(model):
    """Store the table of every Gather on a float initializer as int8 with one scale per row.

    Gather(W, ids) becomes Cast(Gather(W_q, ids)) * Gather(scales, ids): W (V, D) float ->
    W_q (V, D) int8 and scales (V, 1) float, symmetric per row.
    """

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    new_nodes = []
    for node in g.node:
        if node.op_type != "Gather" or node.input[0] not in inits:
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[0]])
        if w.dtype != np.float32 or w.ndim != 2:
            new_nodes.append(node)
            continue
        scale = np.abs(w).max(axis=1, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        name = node.input[0]
        g.initializer.remove(inits[name])
        g.initializer.extend(
            [
                numpy_helper.from_array(q, f"{name}_int8"),
                numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"),
            ]
        )
        out = node.output[0]
        new_nodes += [
            helper.make_node("Gather", [f"{name}_int8", node.input[1]], [f"{out}_q"], axis=0),
            helper.make_node("Gather", [f"{name}_scale", node.input[1]], [f"{out}_s"], axis=0),
            helper.make_node("Cast", [f"{out}_q"], [f"{out}_f"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [f"{out}_f", f"{out}_s"], [out]),
        ]
    del g.node[:]
    g.node.extend(new_nodes)
    return model


def _dynamic_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = dst.with_name(f".{dst.name}.tmp")
    quantize_dynamic(
        str(src),
        str(tmp),
        per_channel=True,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        use_external_data_format=is_external(src),
    )
    model = onnx.load(str(tmp))
    save_proto(model, dst, is_external(src))
    for p in tmp.parent.glob(f"{tmp.name}*"):
        p.unlink()


def matmul_nbits(src: Path, dst: Path, bits: int, accuracy_level: int | None = None) -> None:
    """Weight-only `bits`-bit MatMulNBits (blocks of 32, symmetric) of every constant-weight MatMul;
    `accuracy_level` 4 computes in int8 on the CPU."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(
        onnx.load(str(src)), bits=bits, block_size=32, is_symmetric=True, accuracy_level=accuracy_level
    )
    q.process()
    save_proto(q.model.model, dst, is_external(src))


def _fp16(src: Path, dst: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, disable_shape_infer=True)
    save_proto(model, dst, is_external(src))


def quantize_graphs(out: Path, variant: str, target: str, graphs: tuple[str, ...] = GRAPHS) -> dict[str, Any]:
    """Write the `variant` of `graphs` beside their fp32 ones in `out`; returns what was done to each."""
    done: dict[str, Any] = {"variant": variant, "target": target, "graphs": {}}
    for graph in graphs:
        src, dst = out / graph_file(graph), out / graph_file(graph, variant)
        with quiet():
            if variant == "fp16":
                _fp16(src, dst)
                how = "float16 weights and ops, float32 inputs and outputs"
            elif graph == "embed_tokens":
                save_proto(quantize_gather_rows(onnx.load(str(src))), dst, is_external(src))
                how = "table int8, one scale per row"
            elif variant == "int8" and target == "cpu":
                _dynamic_int8(src, dst)
                how = "dynamic quantization: MatMul weights int8 per channel (MatMulInteger)"
            else:
                bits = 8 if variant == "int8" else 4
                matmul_nbits(src, dst, bits)
                how = f"weight-only MatMulNBits, {bits} bits, block 32, symmetric"
        done["graphs"][graph] = how
    return done


# ------------------------------------------------------------------------------------------- sizes


def file_mb(path: Path) -> float:
    data = path.parent / f"{path.name}_data"
    return (path.stat().st_size + (data.stat().st_size if data.is_file() else 0)) / 2**20


def sizes_mb(out: Path, variants: list[str]) -> dict[str, dict[str, float]]:
    sizes = {}
    for v in variants:
        row = {g: round(file_mb(out / graph_file(g, v)), 4) for g in GRAPHS}
        row["total"] = round(sum(row.values()), 4)
        sizes[v] = row
    return sizes
