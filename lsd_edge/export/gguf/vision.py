"""The student's vision side as an mmproj GGUF file llama.cpp's mtmd (tools/mtmd/clip.cpp) reads:
the tower's layers the model uses, the 2-layer MLP projector, image size, mean/std and activation.

llama.cpp's llava graph (tools/mtmd/models/llava.cpp) runs layers 0 .. n-2 of the `block_count` it is
given unless `clip.vision.feature_layer` names the layer to read; LLaVA reads
`hidden_states[vision_feature_layer]`, never the tower's post-layernorm. So only the layers in use are
written, `feature_layer` says to read after the last of them, and no `v.post_ln` is written. The
selection must be the one llama.cpp makes: 'full' for SigLIP (no CLS token). CLIP towers are refused:
llama.cpp's llava graph (llama-cpp-python 0.3.36's vendored tools/mtmd/models/llava.cpp) concatenates
the class embedding after the patches and adds the position embeddings in that order, so its
features differ from PyTorch's (measured: max relative difference 1.2-1.5 on a CLIP stand-in, and
0.012 against a PyTorch run with the CLS token last), which no file layout can undo.
"""

from __future__ import annotations

from pathlib import Path

import gguf

from lsd_edge.errors import ExportError
from lsd_edge.export.gguf.llm import QUANTS, add_tensor, check_quant, tensor_name

T = gguf.MODEL_TENSOR

# The mmproj's quants: its tower and projector feed every answer and are small beside the LLM, so
# never 4-bit (llama.cpp's own mmproj files are F16 or Q8_0).
MMPROJ_QUANTS = ("f16", "q8_0")
# The hidden-state layer llama.cpp's clip.cpp reads (its KEY_FEATURE_LAYER); gguf-py has no constant for it.
FEATURE_LAYER = "clip.vision.feature_layer"
MMPROJ_ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ]  # "clip"
MLP_PROJECTOR = gguf.VISION_PROJECTOR_TYPE_NAMES[gguf.VISION_PROJECTOR_TYPE.MLP]  # LLaVA's 2-layer MLP
# tower layer -> gguf-py's tensor
TOWER_PARTS = {
    "self_attn.q_proj": T.V_ENC_ATTN_Q,
    "self_attn.k_proj": T.V_ENC_ATTN_K,
    "self_attn.v_proj": T.V_ENC_ATTN_V,
    "self_attn.out_proj": T.V_ENC_ATTN_O,
    "layer_norm1": T.V_ENC_INPUT_NORM,
    "layer_norm2": T.V_ENC_POST_ATTN_NORM,
    "mlp.fc1": T.V_ENC_FFN_UP,
    "mlp.fc2": T.V_ENC_FFN_DOWN,
}
# tower model_type -> the selection llama.cpp's llava graph makes for it
SELECTION = {"siglip_vision_model": "full", "clip_vision_model": "default"}
# the tower's FFN activation -> clip.use_gelu (False: llama.cpp's gelu_quick)
USE_GELU = {"gelu_pytorch_tanh": True, "gelu": True, "quick_gelu": False}


def layers_used(config, what: str) -> int:
    """How many of the tower's layers LLaVA's `vision_feature_layer` reads (hidden_states index)."""
    layer = config.vision_feature_layer
    n = config.vision_config.num_hidden_layers
    if not isinstance(layer, int):
        raise ExportError(
            f"{what}: vision_feature_layer {layer} stacks several layers; the GGUF export needs one layer"
        )
    used = n + 1 + layer if layer < 0 else layer
    if not 1 <= used <= n:
        raise ExportError(f"{what}: vision_feature_layer {layer} is outside the tower's {n} layers")
    return used


def check_vision(config, what: str) -> tuple[str, int]:
    """(tower type, layers used) when llama.cpp can run this vision side, else ExportError."""
    vc = config.vision_config
    want = SELECTION.get(vc.model_type)
    if want is None:
        raise ExportError(
            f"{what}: its vision tower is {vc.model_type}; the GGUF export writes SigLIP or CLIP towers"
        )
    if vc.model_type == "clip_vision_model":
        raise ExportError(
            f"{what}: its vision tower is CLIP, whose CLS token llama.cpp's llava graph (llama-cpp-python "
            "0.3.36) puts after the patches, so its image features differ from PyTorch's; use a SigLIP tower"
        )
    if config.vision_feature_select_strategy != want:
        raise ExportError(
            f"{what}: vision_feature_select_strategy '{config.vision_feature_select_strategy}' with a "
            f"{vc.model_type} tower, but llama.cpp always reads it as '{want}'; train with '{want}'"
        )
    if vc.hidden_act not in USE_GELU:
        raise ExportError(f"{what}: the tower's activation {vc.hidden_act} has no llama.cpp equivalent")
    if config.projector_hidden_act not in ("gelu", "gelu_pytorch_tanh"):
        raise ExportError(
            f"{what}: projector activation {config.projector_hidden_act}; llama.cpp's mlp projector uses gelu"
        )
    if not getattr(config, "multimodal_projector_bias", True):
        raise ExportError(f"{what}: its projector has no biases, which llama.cpp's mlp projector needs")
    return vc.model_type, layers_used(config, what)


def _hparams(writer: gguf.GGUFWriter, config, processor, used: int, file_type) -> None:
    vc = config.vision_config
    ip = processor.image_processor
    writer.add_file_type(file_type)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(MLP_PROJECTOR)
    writer.add_vision_image_size(vc.image_size)
    writer.add_vision_patch_size(vc.patch_size)
    writer.add_vision_embedding_length(vc.hidden_size)
    writer.add_vision_feed_forward_length(vc.intermediate_size)
    writer.add_vision_block_count(used)
    writer.add_vision_head_count(vc.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(vc.layer_norm_eps)
    writer.add_vision_projection_dim(config.text_config.hidden_size)
    writer.add_vision_image_mean([float(x) for x in ip.image_mean])
    writer.add_vision_image_std([float(x) for x in ip.image_std])
    writer.add_vision_use_gelu(USE_GELU[vc.hidden_act])
    # read after the last layer written (llama.cpp would otherwise skip it)
    writer.add_array(FEATURE_LAYER, [used])


def _tower_tensors(writer: gguf.GGUFWriter, tower, used: int, qtype) -> None:
    emb = tower.embeddings
    f16 = gguf.GGMLQuantizationType.F16
    add_tensor(writer, tensor_name(T.V_ENC_EMBD_PATCH), emb.patch_embedding.weight, f16)
    if emb.patch_embedding.bias is not None:
        add_tensor(writer, tensor_name(T.V_ENC_EMBD_PATCH, suffix="bias"), emb.patch_embedding.bias, qtype)
    add_tensor(writer, tensor_name(T.V_ENC_EMBD_POS), emb.position_embedding.weight, f16)
    for i, layer in enumerate(tower.encoder.layers[:used]):
        for path, kind in TOWER_PARTS.items():
            mod = layer.get_submodule(path)
            add_tensor(writer, tensor_name(kind, i), mod.weight, qtype)
            add_tensor(writer, tensor_name(kind, i, "bias"), mod.bias, qtype)


def write_mmproj(model, processor, out: Path, quant: str, name: str, what: str) -> Path:
    """The vision tower (the layers LLaVA reads) and projector of `model` as `out`, an mmproj GGUF file."""
    check_quant(quant, MMPROJ_QUANTS, "--mmproj-quant")
    _, used = check_vision(model.config, what)
    file_type, qtype = QUANTS[quant]
    proj = model.model.multi_modal_projector
    writer = gguf.GGUFWriter(str(out), MMPROJ_ARCH)
    writer.add_name(f"mmproj-{name}")
    _hparams(writer, model.config, processor, used, file_type)
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    _tower_tensors(writer, tower, used, qtype)
    # llama.cpp's mlp projector reads mm.0 and mm.2, the linear layers of LLaVA's Sequential
    for idx, lin in ((0, proj.linear_1), (2, proj.linear_2)):
        add_tensor(writer, tensor_name(T.V_MMPROJ, idx), lin.weight, qtype)
        if lin.bias is not None:
            add_tensor(writer, tensor_name(T.V_MMPROJ, idx, "bias"), lin.bias, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
