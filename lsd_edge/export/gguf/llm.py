"""The student's language model as a GGUF file llama.cpp runs: Qwen2 or Llama weights, the byte-level
BPE tokenizer (gguf-py's "gpt2" model with llama.cpp's pre-tokenizer name) and the chat template.

Written with gguf-py, as llama.cpp's own `convert_hf_to_gguf.py` does (its Qwen2Model and LlamaModel
classes, and `get_vocab_base` for the vocabulary): the same key and tensor names, gguf-py's constants
(`gguf.MODEL_TENSOR`, `gguf.TENSOR_NAMES`, the writer's `add_*` keys), embedding rows past
the tokenizer as `[PAD{i}]` tokens, Llama's q/k rows permuted for llama.cpp's rope. Matrices are
stored F16, Q8_0 or Q4_0 (gguf.quants); norms and biases stay F32, and a matrix whose rows are not a
multiple of the quant's 32-value block falls back to F16, as the converter does. A Q4_0 file keeps the
token embedding and the output matrix in Q8_0, as llama-quantize keeps them above 4 bits (it writes
Q6_K, which gguf-py cannot).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch

from lsd_edge.errors import ExportError
from lsd_edge.export.gguf.template import llama_cpp_template

# quant choice -> (gguf file type, tensor type of the matrices)
QUANTS = {
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
    "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, gguf.GGMLQuantizationType.Q4_0),
}
# 4-bit matrices whose token embedding and output stay in Q8_0 (llama-quantize keeps them higher too)
EDGE_Q8 = {gguf.GGMLQuantizationType.Q4_0}
# HF model_type -> llama.cpp's architecture name
ARCHS = {
    "qwen2": gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2],
    "llama": gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA],
}
# llama.cpp's name for a byte-level BPE vocabulary (src/llama-vocab.cpp, LLAMA_VOCAB_TYPE_BPE);
# gguf-py has no constant for it (its own vocab.py writes the same literal).
BPE_TOKENIZER_MODEL = "gpt2"
T = gguf.MODEL_TENSOR
# Pre-tokenizer regexes (tokenizer.json `Split` patterns) and llama.cpp's name for each
# (src/llama-vocab.cpp); GPT-2's is what a plain ByteLevel pre-tokenizer applies.
QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_OF_REGEX = {QWEN2_REGEX: "qwen2", LLAMA3_REGEX: "llama-bpe"}
NEEDS_BPE = "a byte-level BPE tokenizer, as Qwen's or Llama's, is needed"


def check_quant(quant: str, choices=tuple(QUANTS), option: str = "--quant") -> None:
    if quant not in choices:
        raise ExportError(f"{option} {quant}: choose one of {', '.join(choices)}")


def _pre_name(pre: dict | None, what: str) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json `pre_tokenizer`, or ExportError."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    splits = [p for p in parts if p.get("type") == "Split"]
    if len(parts) == 2 and len(splits) == 1 and parts[1].get("type") == "ByteLevel":
        name = PRE_OF_REGEX.get(splits[0].get("pattern", {}).get("Regex", ""))
        if name is not None:
            return name
    raise ExportError(
        f"{what}: its pre-tokenizer is neither GPT-2's, Qwen2's nor Llama 3's, which llama.cpp would "
        f"split differently; {NEEDS_BPE}"
    )


def tokenizer_facts(tokenizer, what: str) -> dict:
    """Vocabulary, merges and pre-tokenizer name of a byte-level BPE tokenizer, or ExportError."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        kind = model.get("type", type(tokenizer).__name__)
        raise ExportError(
            f"{what}: its tokenizer is {kind}, which GGUF has no equivalent for; {NEEDS_BPE} "
            "(train the student on a Qwen or Llama LLM)"
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    return {
        "vocab": tokenizer.get_vocab(),
        "merges": merges,
        "added": added,
        "pre": _pre_name(spec.get("pre_tokenizer"), what),
    }


def _tokens(facts: dict, rows: int) -> tuple[list[str], list[int]]:
    """Token strings and types for every embedding row, as convert_hf_to_gguf's get_vocab_base."""
    by_id = {i: t for t, i in facts["vocab"].items()}
    tokens, types = [], []
    for i in range(rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in facts["added"]:
            tokens.append(by_id[i])
            types.append(
                gguf.TokenType.CONTROL if facts["added"][i]["special"] else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def write_tokenizer(
    writer: gguf.GGUFWriter, tokenizer, rows: int, eos: int | None, template: str | None, what: str
) -> None:
    facts = tokenizer_facts(tokenizer, what)
    tokens, types = _tokens(facts, rows)
    writer.add_tokenizer_model(BPE_TOKENIZER_MODEL)
    writer.add_tokenizer_pre(facts["pre"])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(facts["merges"])
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_add_bos_token(
        bool(getattr(tokenizer, "add_bos_token", False)) and tokenizer.bos_token_id is not None
    )
    if eos is not None:
        writer.add_eos_token_id(eos)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    if template:
        writer.add_chat_template(template)


def tensor_name(kind: gguf.MODEL_TENSOR, bid: int | None = None, suffix: str = "weight") -> str:
    """gguf-py's name of a tensor, as llama.cpp looks it up: `blk.3.attn_q.weight`."""
    return f"{gguf.TENSOR_NAMES[kind].format(bid=bid)}.{suffix}"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half rows -> llama.cpp's interleaved rope rows (convert_hf_to_gguf LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_tensor(writer: gguf.GGUFWriter, name: str, t: torch.Tensor | np.ndarray, qtype) -> None:
    """Matrices in `qtype` (F16 when the quant's block does not divide their rows), vectors in F32."""
    data = t.detach().float().cpu().numpy() if isinstance(t, torch.Tensor) else t.astype(np.float32)
    if data.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data.astype(np.float32))
        return
    quantized = qtype not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32)
    if quantized and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        return
    writer.add_tensor(name, data.astype(np.float16))


def _hparams(writer: gguf.GGUFWriter, cfg, name: str, file_type) -> None:
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_file_type(file_type)
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim and head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def check_text_config(cfg, what: str) -> str:
    arch = ARCHS.get(cfg.model_type)
    if arch is None:
        raise ExportError(
            f"{what}: its LLM is {cfg.model_type}; the GGUF export writes {' or '.join(ARCHS)} LLMs"
        )
    if (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default") != "default":
        raise ExportError(
            f"{what}: its LLM scales rope, which the GGUF export does not write; use plain rope"
        )
    return arch


def _layer_tensors(writer, layer, i: int, cfg, arch: str, qtype) -> None:
    at, mlp = layer.self_attn, layer.mlp
    projs = {T.ATTN_Q: at.q_proj, T.ATTN_K: at.k_proj, T.ATTN_V: at.v_proj, T.ATTN_OUT: at.o_proj}
    rope_heads = {T.ATTN_Q: cfg.num_attention_heads, T.ATTN_K: cfg.num_key_value_heads}

    def rows(kind, t: torch.Tensor) -> np.ndarray:
        t = t.detach().float().numpy()
        return _permute(t, rope_heads[kind]) if arch == "llama" and kind in rope_heads else t

    parts: dict[tuple, torch.Tensor | np.ndarray] = {(T.ATTN_NORM, "weight"): layer.input_layernorm.weight}
    parts.update({(kind, "weight"): rows(kind, proj.weight) for kind, proj in projs.items()})
    parts[T.FFN_NORM, "weight"] = layer.post_attention_layernorm.weight
    parts[T.FFN_GATE, "weight"] = mlp.gate_proj.weight
    parts[T.FFN_UP, "weight"] = mlp.up_proj.weight
    parts[T.FFN_DOWN, "weight"] = mlp.down_proj.weight
    parts.update({(k, "bias"): rows(k, p.bias) for k, p in projs.items() if p.bias is not None})
    for (kind, suffix), t in parts.items():
        add_tensor(writer, tensor_name(kind, i, suffix), t, qtype)


def write_llm(model, processor, eos: int | None, out: Path, quant: str, name: str, what: str) -> Path:
    """`model`'s LLM (a LlavaForConditionalGeneration's language model and lm_head) as `out`, a GGUF file."""
    check_quant(quant)
    cfg = model.config.text_config
    arch = check_text_config(cfg, what)
    file_type, qtype = QUANTS[quant]
    lm = model.model.language_model
    embed = lm.embed_tokens.weight
    writer = gguf.GGUFWriter(str(out), arch)
    _hparams(writer, cfg, name, file_type)
    template, _ = llama_cpp_template(processor)
    write_tokenizer(writer, processor.tokenizer, embed.shape[0], eos, template, what)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    edge = gguf.GGMLQuantizationType.Q8_0 if qtype in EDGE_Q8 else qtype
    add_tensor(writer, tensor_name(T.TOKEN_EMBD), embed, edge)
    for i, layer in enumerate(lm.layers):
        _layer_tensors(writer, layer, i, cfg, arch, qtype)
    add_tensor(writer, tensor_name(T.OUTPUT_NORM), lm.norm.weight, qtype)
    if not cfg.tie_word_embeddings:
        add_tensor(writer, tensor_name(T.OUTPUT), model.lm_head.weight, edge)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
