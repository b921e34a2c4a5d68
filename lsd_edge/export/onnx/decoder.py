"""The decoder graph made by onnxruntime-genai's model builder, the fast path for every LLM it knows.

The builder writes the language model as ONNX Runtime's own fused graph: `GroupQueryAttention` with
the rotary embedding inside and packed QKV, `SkipSimplifiedLayerNormalization`, weights as
`MatMulNBits` (int8 / int4, blocks of 32, int8 activations on the CPU: `accuracy_level` 4) and, with
`prune_lm_head`, logits for the last position only. Built with `exclude_embeds`, it takes
`inputs_embeds` and keeps the names of lsd-edge's own decoder (`past_key_values.{i}.key`,
`present.{i}.value`, `logits`), so the vision encoder and embedding graphs stay ours. Its attention
reads and writes a KV cache that past and present share in place (`kv_cache: shared` in the export
report), which `OnnxRunner` binds once per generation.

An LLM the builder does not know (or an export without onnxruntime-genai) gets lsd-edge's traced
decoder (`lsd_edge.export.onnx.graphs.MergedDecoder`); `decoder_plans` says which, and why.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
from safetensors.torch import save_file

from lsd_edge.errors import ExportError
from lsd_edge.export.onnx.graphs import kv_shape, quiet
from lsd_edge.export.onnx.quantize import matmul_nbits, save_proto
from lsd_edge.runtime.memory import run_measured
from lsd_edge.runtime.onnx.layout import graph_file

# LLM model_type -> the causal-LM class the builder dispatches on (the ones lsd-edge's tests export).
BUILDER_LLMS = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
BUILDER_OPTIONS = {"exclude_embeds": "true", "prune_lm_head": "true"}
NBITS = {"int8": 8, "int4": 4}
DECODER = "decoder_model_merged"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class DecoderSource:
    """How one variant's decoder is made: by the builder (`precision`, `provider`) or traced by lsd-edge."""

    graph: str  # "onnxruntime-genai model builder <version>" or "lsd-edge (torch.onnx, dynamo)"
    kv_cache: str  # "shared": past and present share one buffer in place; "concat": present = past + new
    attention: str
    precision: str | None = None
    provider: str | None = None
    options: dict | None = None
    # on the CPU the builder makes the fp32 graph once and the quantized variants are its weights
    # quantized by ONNX Runtime's MatMulNBitsQuantizer, the pass the builder's own int8/int4 runs
    quantized: str | None = None
    reason: str | None = None  # why the builder was not used

    @property
    def builder(self) -> bool:
        return self.precision is not None

    @property
    def runs_builder(self) -> bool:
        """Made by a builder run of its own (not quantized from the fp32 one)."""
        return self.builder and self.quantized is None


def builder_version() -> str | None:
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return None
    return importlib.metadata.version("onnxruntime-genai")


def traced(reason: str) -> DecoderSource:
    return DecoderSource("lsd-edge (torch.onnx, dynamo)", "concat", "MatMul + Softmax", reason=reason)


def decoder_plans(
    text_config, variants: list[str], target: str, mode: str = "auto"
) -> dict[str, DecoderSource]:
    """Which graph each variant's decoder is: the builder's where it supports the LLM and every variant
    (mode "auto"), else lsd-edge's traced one for all of them, so one export holds one kind of decoder."""
    ver = builder_version()
    kind = text_config.model_type
    why = None
    if mode == "traced":
        why = "asked for (export.decoder = traced)"
    elif ver is None:
        why = "onnxruntime-genai is not installed"
    elif kind not in BUILDER_LLMS:
        why = f"the model builder path is not set up for {kind} language models"
    elif kv_shape(text_config)[1] % 16:
        why = f"GroupQueryAttention needs a head size that is a multiple of 16, this LLM's is {kv_shape(text_config)[1]}"
    elif "fp16" in variants and target != "cuda":
        why = "the model builder writes fp16 decoders for the CUDA execution provider only"
    if why is not None:
        if mode == "builder":
            raise ExportError(f"export.decoder = builder: {why}; use auto or traced")
        return {v: traced(why) for v in variants}
    return {v: builder_source(ver, v, target) for v in variants}


def builder_source(version: str, variant: str, target: str) -> DecoderSource:
    """On CUDA each variant is a builder run of its own (its int8/int4/fp16 graphs take fp16
    activations and KV cache); on the CPU the fp32 run's weights are quantized (fp32 activations,
    int8 compute: accuracy_level 4), which is what the builder's int8/int4 do, in half the time and
    memory."""
    source = DecoderSource(
        f"onnxruntime-genai model builder {version}",
        "shared",
        "GroupQueryAttention (rotary inside, packed QKV)",
        precision=variant,
        provider="cuda" if target == "cuda" else "cpu",
        options=dict(BUILDER_OPTIONS),
    )
    if target != "cuda" and variant in NBITS:
        source.quantized = f"MatMulNBits, {NBITS[variant]} bits, block 32, symmetric, accuracy_level 4"
    return source


def save_causal_lm(model, folder: Path) -> None:
    """The LLaVA's language model and lm_head as a Hugging Face causal-LM folder the builder loads.

    The tensors are written as they are (no copy of the model is made); a tied lm_head is left to the
    config, as Hugging Face saves it."""
    tc = model.config.text_config
    folder.mkdir(parents=True, exist_ok=True)
    config = tc.to_dict()
    config["architectures"] = [BUILDER_LLMS[tc.model_type]]
    config["torch_dtype"] = config["dtype"] = "float32"
    tensors = {f"model.{k}": v.contiguous() for k, v in model.model.language_model.state_dict().items()}
    if not tc.tie_word_embeddings:
        tensors["lm_head.weight"] = model.lm_head.weight.detach().contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tc.__class__.from_dict(config).save_pretrained(folder)


def run_builder(hf: Path, out: Path, source: DecoderSource) -> tuple[float, float]:
    """`python -m onnxruntime_genai.models.builder` on `hf` into `out`: the seconds it took and its
    peak resident memory (MiB).

    A subprocess: the builder's memory is returned when it ends, and its chatter stays out of the
    user's terminal (with --debug, a failed run's output is shown)."""
    opts = [f"{k}={v}" for k, v in (source.options or {}).items()]
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out)]
    cmd += ["-p", str(source.precision), "-e", str(source.provider), "-c", str(out / "cache")]
    cmd += ["--extra_options", *opts]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.perf_counter()
    run = run_measured(cmd, env=env)
    if run.returncode != 0 or not (out / "model.onnx").is_file():
        if os.environ.get("LSD_EDGE_DEBUG") == "1":
            sys.stderr.write(run.stdout + run.stderr)
        why = builder_error(run.stderr + "\n" + run.stdout) or f"exit status {run.returncode}"
        raise ExportError(
            f"the onnxruntime-genai model builder failed on the {source.precision} decoder: {why}; "
            "run with --debug to see its output, or export lsd-edge's own decoder with `--decoder traced`"
        )
    return time.perf_counter() - t0, run.peak_mb


def builder_error(output: str) -> str | None:
    """The line of the builder's output that says what went wrong: its last exception, else its last line."""
    lines = [s.strip() for s in output.splitlines() if s.strip()]
    errors = [s for s in lines if re.match(r"^[\w.]+(Error|Exception)\b", s)]
    found = errors or lines
    return found[-1][:300] if found else None


def fix_head_dim(model, size: int) -> None:
    """Write the KV cache's head size as a number: the builder leaves it symbolic ('kv_cache_dim'), and
    transformers.js makes its empty cache from the graph's input shapes, reading a symbol as 0."""
    values = [*model.graph.input, *model.graph.output]
    for v in values:
        if v.name.startswith(("past_key_values.", "present.")):
            dim = v.type.tensor_type.shape.dim[3]
            if dim.HasField("dim_param"):
                dim.dim_value = size


def place(built: Path, out: Path, variant: str, external_data_mb: float, head_size: int) -> None:
    """Move the builder's model.onnx (+ model.onnx.data) to the layout's decoder file of `variant`.

    Small decoders are stored inline; bigger ones keep their weights in `<file>_data`, renamed without
    loading them (only the graph's references to the file change)."""
    dst = out / graph_file(DECODER, variant)
    data = built / "model.onnx.data"
    external = data.is_file() and data.stat().st_size > external_data_mb * 2**20
    model = onnx.load(str(built / "model.onnx"), load_external_data=not external)
    fix_head_dim(model, head_size)
    if not external:
        save_proto(model, dst, external=False)
        return
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = f"{dst.name}_data"
    os.replace(data, dst.parent / f"{dst.name}_data")
    onnx.save_model(model, str(dst))


def start_builds(model, out: Path, plans: dict[str, DecoderSource], external_data_mb: float):
    """Start the builder runs `plans` asks for in a background thread (they are subprocesses, so the
    caller traces the other graphs meanwhile); returns a function that waits for them, quantizes the
    variants made from the fp32 graph and returns seconds per variant and the builder's peak resident
    memory (MiB). The model's LLM is written for the builder here, before returning, so the caller
    may use the model while the builds run."""
    if not any(s.builder for s in plans.values()):
        return lambda: ({}, 0.0)
    work = out / ".builder"
    save_causal_lm(model, work / "hf")
    for name in TOKENIZER_FILES:  # the builder writes its own config from the tokenizer
        if (out / name).is_file():
            shutil.copy2(out / name, work / "hf" / name)
    size = kv_shape(model.config.text_config)[1]
    pool = ThreadPoolExecutor(1)

    def build() -> tuple[dict[str, float], float]:
        seconds, peak = {}, 0.0
        for variant, source in plans.items():
            if source.runs_builder:
                seconds[variant], run_peak = run_builder(work / "hf", work / variant, source)
                peak = max(peak, run_peak)
                place(work / variant, out, variant, external_data_mb, size)
        for variant, source in plans.items():
            if source.quantized:
                t0 = time.perf_counter()
                with quiet():
                    matmul_nbits(
                        out / graph_file(DECODER), out / graph_file(DECODER, variant), NBITS[variant], 4
                    )
                seconds[variant] = time.perf_counter() - t0
        return seconds, peak

    job = pool.submit(build)

    def wait() -> tuple[dict[str, float], float]:
        try:
            return job.result()
        finally:
            pool.shutdown()
            shutil.rmtree(work, ignore_errors=True)

    return wait


def decoder_report(plans: dict[str, DecoderSource]) -> dict[str, dict]:
    """What export_report.json says of each variant's decoder (read by `OnnxRunner`)."""
    return {v: {k: x for k, x in asdict(s).items() if x is not None} for v, s in plans.items()}
