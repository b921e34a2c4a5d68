"""ONNX export of a LLaVA model folder: three graphs, a quantized variant, a parity gate, a report.

`export(model_dir, settings)` writes the layout `lsd_edge.onnx_runner` documents (vision encoder
with the projector folded in, token embeddings, one decoder for prefill and decode with a KV cache),
quantizes it for the target, then compares it with PyTorch on eval samples: fp32 logits and greedy
tokens (the gate every export must pass), and exact-match accuracy of the quantized variant. A
folder that fails the gate is kept beside the output as `<output>.failed`, with the reason in its
export_report.json, and the call raises `ExportError`.

Each graph is traced with `torch.onnx.export(dynamo=True)` from a small wrapper module, so the
graph's inputs and outputs carry the names ONNX Runtime and web users know (`past_key_values.{i}.key`,
`present.{i}.value`) and its batch, sequence and past axes stay dynamic.

Quantization choices (sizes before and after go to the report):
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
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lsd_edge.checkpoint import atomic_dir, read_json, write_json
from lsd_edge.errors import ExportError, LsdEdgeError
from lsd_edge.onnx_runner import GRAPHS, REPORT, graph_file
from lsd_edge.parity import check_data, parity_report, speed_report
from lsd_edge.progress import QuietReporter, Reporter

RUNS_ROOT = Path("runs")
# Files of a model folder that an export folder carries over (configs, tokenizer, processor).
CARRIED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
    "recipe.toml",
)
# Quantize choice -> the variant written beside the fp32 graphs.
VARIANT_OF = {"none": "fp32", "int8": "int8", "int4": "int4", "fp16": "fp16"}


@dataclass
class ExportSettings:
    """What an export does; `from_model_dir` fills it from the recipe the model was trained with."""

    quantize: str = "int8"  # none | int8 | int4 | fp16
    target: str = "cpu"  # cpu | cuda
    opset: int = 18
    parity_samples: int = 16
    max_rel_logit_diff: float = 1e-3
    max_accuracy_drop: float = 0.02
    data: Path | None = None  # LLaVA-format eval JSON; default: the recipe's eval split
    images: Path | None = None
    eval_samples: int | None = None  # accuracy questions; default: the recipe's eval.max_samples (all)
    max_new_tokens: int = 8
    bench_tokens: int = 32
    bench_repeats: int = 3
    external_data_mb: float = 1536.0  # graphs with more weights than this keep them in <file>_data
    note: str | None = None  # why the recipe's eval data is not used, shown to the user

    @classmethod
    def from_model_dir(cls, model_dir: Path, **overrides: Any) -> ExportSettings:
        """Defaults from the model folder's recipe.toml ([export], [eval], [bench], eval data), then overrides."""
        values: dict[str, Any] = {}
        recipe = _model_recipe(model_dir)
        if recipe is not None:
            ex = recipe.export
            values.update(
                quantize=ex.quantize,
                target=ex.target,
                opset=ex.opset,
                parity_samples=ex.parity_samples,
                max_rel_logit_diff=ex.max_rel_logit_diff,
                max_accuracy_drop=ex.max_accuracy_drop,
                eval_samples=recipe.eval.max_samples,
                max_new_tokens=recipe.eval.max_new_tokens,
                bench_tokens=recipe.bench.max_new_tokens,
                bench_repeats=recipe.bench.repeats,
            )
            if recipe.data.eval is not None:
                path, images = recipe.data.resolve(recipe.data.eval)
                if path.is_file():
                    values.update(data=path, images=images)
                else:  # exported from another folder than the run's: check on synthetic inputs
                    values["note"] = (
                        f"the recipe's eval data {path} is not here; pass --data to compare accuracy"
                    )
        if overrides.get("data") is not None:  # the user's data: neither the recipe's images nor its note
            values.pop("note", None)
            values.pop("images", None)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        if settings.quantize not in VARIANT_OF:
            raise ExportError(f"quantize '{settings.quantize}': choose one of {', '.join(VARIANT_OF)}")
        if settings.target not in ("cpu", "cuda"):
            raise ExportError(f"target '{settings.target}': choose cpu or cuda")
        return settings

    @property
    def variant(self) -> str:
        return VARIANT_OF[self.quantize]


def _model_recipe(model_dir: Path):
    from lsd_edge.config import load_recipe

    path = model_dir / "recipe.toml"
    if not path.is_file():
        return None
    try:
        return load_recipe(path)
    except LsdEdgeError:  # an old or foreign recipe: export with defaults rather than refuse
        return None


# ------------------------------------------------------------------------------------------ locating


def latest_student(runs_root: Path = RUNS_ROOT) -> Path:
    """The student of the most recent finished run: runs/*/student whose report.json is newest."""
    runs = [
        p.parent for p in runs_root.glob("*/report.json") if (p.parent / "student" / "config.json").is_file()
    ]
    if not runs:
        raise ExportError(
            f"no model folder given and no finished run under {runs_root}/ (a run folder with student/ and "
            "report.json); give one, e.g. `lsd-edge export runs/tiny/student`"
        )
    return max(runs, key=lambda r: (r / "report.json").stat().st_mtime) / "student"


def default_output(model_dir: Path) -> Path:
    """`<run>/onnx` for a run's student (runs/tiny/student -> runs/tiny/onnx), else `<folder>-onnx` beside it."""
    model_dir = Path(model_dir)
    if model_dir.name == "student":
        return model_dir.parent / "onnx"
    return model_dir.with_name(model_dir.name + "-onnx")


# ---------------------------------------------------------------------------------------- wrappers


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
        from transformers import DynamicCache

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


def _kv_shape(text_config) -> tuple[int, int]:
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


# ------------------------------------------------------------------------------------------ tracing


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's and quantizers' chatter (per-node INFO lines, 'consider pre-processing')."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(before)


def _weight_mb(module: nn.Module) -> float:
    seen, n = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel() * p.element_size()
    return n / 2**20


def _trace(module, args, names_in, names_out, dynamic_shapes, path: Path, opset: int, external: bool) -> None:
    """torch.onnx.export(dynamo=True) of one wrapper to `path`, node metadata stripped."""
    import onnx_ir

    with _quiet(), torch.no_grad():
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
    import onnx

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
    kv_heads, head_dim = _kv_shape(tc)
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


def export_graphs(model, out: Path, opset: int = 18, external_data_mb: float = 1536.0) -> dict[str, float]:
    """Trace the three fp32 graphs of a LlavaForConditionalGeneration into `out`; seconds per graph."""
    check_exportable(model)
    times = {}
    for name, g in graph_specs(model.float().eval()).items():
        t0 = time.perf_counter()
        external = _weight_mb(g.module) > external_data_mb
        _trace(
            g.module, g.args, g.inputs, g.outputs, g.dynamic_shapes, out / graph_file(name), opset, external
        )
        times[name] = time.perf_counter() - t0
    return times


# ------------------------------------------------------------------------------------- quantization


def _is_external(path: Path) -> bool:
    return (path.parent / f"{path.name}_data").is_file()


def _save_proto(model, path: Path, external: bool) -> None:
    import onnx

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
    import onnx
    from onnx import helper, numpy_helper

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
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = dst.with_name(f".{dst.name}.tmp")
    quantize_dynamic(
        str(src),
        str(tmp),
        per_channel=True,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        use_external_data_format=_is_external(src),
    )
    model = onnx.load(str(tmp))
    _save_proto(model, dst, _is_external(src))
    for p in tmp.parent.glob(f"{tmp.name}*"):
        p.unlink()


def _matmul_nbits(src: Path, dst: Path, bits: int) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, block_size=32, is_symmetric=True)
    q.process()
    _save_proto(q.model.model, dst, _is_external(src))


def _fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, disable_shape_infer=True)
    _save_proto(model, dst, _is_external(src))


def quantize_graphs(out: Path, variant: str, target: str) -> dict[str, Any]:
    """Write the `variant` graphs beside the fp32 ones in `out`; returns what was done to each."""
    import onnx

    done: dict[str, Any] = {"variant": variant, "target": target, "graphs": {}}
    for graph in GRAPHS:
        src, dst = out / graph_file(graph), out / graph_file(graph, variant)
        with _quiet():
            if variant == "fp16":
                _fp16(src, dst)
                how = "float16 weights and ops, float32 inputs and outputs"
            elif graph == "embed_tokens":
                _save_proto(quantize_gather_rows(onnx.load(str(src))), dst, _is_external(src))
                how = "table int8, one scale per row"
            elif variant == "int8" and target == "cpu":
                _dynamic_int8(src, dst)
                how = "dynamic quantization: MatMul weights int8 per channel (MatMulInteger)"
            else:
                bits = 8 if variant == "int8" else 4
                _matmul_nbits(src, dst, bits)
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


# ------------------------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    output: Path
    report: dict[str, Any] = field(default_factory=dict)


def _carry_files(model_dir: Path, out: Path) -> None:
    for name in CARRIED:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)


def _gate(settings: ExportSettings, fp32: dict, acc_torch, acc_onnx) -> list[str]:
    reasons = []
    if fp32["max_rel_logit_diff"] > settings.max_rel_logit_diff:
        reasons.append(
            f"fp32 logits differ from PyTorch by {fp32['max_rel_logit_diff']:.2e} (relative) > "
            f"{settings.max_rel_logit_diff:.0e}"
        )
    if fp32["greedy_agreement"] < 1.0:
        reasons.append(
            f"fp32 greedy tokens match PyTorch on {100 * fp32['greedy_agreement']:.0f}% of samples, not all"
        )
    if (
        acc_torch is not None
        and acc_onnx is not None
        and acc_onnx < acc_torch - settings.max_accuracy_drop - 1e-9
    ):
        reasons.append(
            f"{settings.variant} accuracy {100 * acc_onnx:.1f}% is more than {100 * settings.max_accuracy_drop:.0f} "
            f"points below PyTorch's {100 * acc_torch:.1f}%"
        )
    return reasons


def export(
    model_dir: str | Path | None,
    output: str | Path | None = None,
    settings: ExportSettings | dict[str, Any] | None = None,
    reporter: Reporter | None = None,
    runs_root: Path = RUNS_ROOT,
) -> ExportResult:
    """Export, quantize, check parity, measure speed; returns the report (also in <output>/export_report.json).

    `model_dir` None: the student of the most recent run under `runs_root`. `settings` as a dict:
    overrides of what the model folder's recipe says (`ExportSettings.from_model_dir`).
    """
    from lsd_edge.infer import TorchRunner

    reporter = reporter or QuietReporter()
    picked = model_dir is None
    model_dir = latest_student(runs_root) if picked else Path(model_dir)
    if picked:
        reporter.message(f"exporting the student of the most recent run: {model_dir}")
    if not model_dir.is_dir():
        raise ExportError(f"{model_dir}: no such model folder; give a folder written by lsd-edge distill")
    if not isinstance(settings, ExportSettings):
        settings = ExportSettings.from_model_dir(model_dir, **(settings or {}))
    if settings.data is not None:
        check_data(settings.data)
    out_final = Path(output) if output is not None else default_output(model_dir)
    failed = out_final.with_name(out_final.name + ".failed")
    variant = settings.variant
    variants = ["fp32"] if variant == "fp32" else ["fp32", variant]
    started = time.perf_counter()
    reporter.task(f"export {model_dir.name}", 4 + 2 * (variant != "fp32"))

    torch_runner = TorchRunner(model_dir, device="cpu", dtype="float32")
    model, processor = torch_runner.model, torch_runner.processor
    report: dict[str, Any] = {
        "model_dir": str(model_dir),
        "picked_latest_run": picked,
        "output": str(out_final),
        "default_variant": variant,
        "variants": variants,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
    }
    with atomic_dir(out_final) as tmp:
        t0 = time.perf_counter()
        graph_s = export_graphs(model, tmp, settings.opset, settings.external_data_mb)
        _carry_files(model_dir, tmp)
        reporter.advance(1, "graphs traced")
        t1 = time.perf_counter()
        if variant != "fp32":
            report["quantization"] = quantize_graphs(tmp, variant, settings.target)
            reporter.advance(1, f"{variant} written")
        t2 = time.perf_counter()
        report.update(size_report(tmp, model_dir, variants))
        report["parity"] = parity = parity_report(
            model,
            processor,
            tmp,
            variants,
            settings.data,
            settings.images,
            settings.parity_samples,
            settings.eval_samples,
            settings.max_new_tokens,
            reporter,
        )
        if parity["accuracy_onnx"] is None:
            reporter.message(
                f"[yellow]{settings.note or 'no eval data'}: accuracy is not compared; logits and greedy tokens "
                "are checked on random images[/yellow]"
            )
        t3 = time.perf_counter()
        reasons = _gate(
            settings, parity["variants"]["fp32"], parity["accuracy_torch"], parity["accuracy_onnx"]
        )
        report["gate"] = {
            "passed": not reasons,
            "reasons": reasons,
            "max_rel_logit_diff": settings.max_rel_logit_diff,
            "max_accuracy_drop": settings.max_accuracy_drop,
        }
        if not reasons:
            report["speed"] = speed_report(
                torch_runner,
                tmp,
                variants,
                parity["bench_image"],
                settings.bench_tokens,
                settings.bench_repeats,
            )
            reporter.advance(1, "speed")
        parity.pop("bench_image")
        report["timing_s"] = {
            "trace": round(t1 - t0, 2),
            "trace_by_graph": {g: round(s, 2) for g, s in graph_s.items()},
            "quantize": round(t2 - t1, 2),
            "export": round(t2 - t0, 2),
            "parity": round(t3 - t2, 2),
            "total": round(time.perf_counter() - started, 2),
        }
        report["versions"] = _versions()
        write_json(tmp / REPORT, report)
        reporter.done()
        if reasons:
            shutil.rmtree(failed, ignore_errors=True)
            os.replace(tmp, failed)  # keep what was made for inspection; an earlier good export stays
            report["output"] = str(failed)
            write_json(failed / REPORT, report)
            raise ExportError(f"parity gate failed: {'; '.join(reasons)}; the export is kept in {failed}")
    shutil.rmtree(failed, ignore_errors=True)
    return ExportResult(out_final, report)


def size_report(out: Path, model_dir: Path, variants: list[str]) -> dict[str, Any]:
    """MB per graph and variant, the PyTorch weights', and each quantized graph's share of its fp32 one."""
    sizes: dict[str, Any] = sizes_mb(out, variants)
    sizes["pytorch_safetensors"] = round(
        sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20, 4
    )
    rep: dict[str, Any] = {"sizes_mb": sizes}
    if len(variants) > 1:
        v = variants[-1]
        rep["size_ratio"] = {g: round(sizes[v][g] / sizes["fp32"][g], 4) for g in (*GRAPHS, "total")}
    return rep


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def load_report(folder: str | Path) -> dict[str, Any]:
    return read_json(Path(folder) / REPORT)
