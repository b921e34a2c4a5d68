"""Build or load teacher and student as `LlavaForConditionalGeneration` plus an `AutoProcessor`.

Three ways to get a model, chosen by the recipe: a LLaVA checkpoint (`path`: hub id or folder),
composed from parts (`llm` + `vision`, with a fresh projector), or a tiny one built from sizes for
the embedded default. Every model directory written by lsd-edge holds the processor (tokenizer,
image processor, chat template) beside the weights, so every command loads any model the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lsd_edge.config import ModelConfig, TinyConfig, VisionSize
from lsd_edge.errors import ModelError

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<unk>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN)
CHAT_ROLES = ("system", "user", "assistant")
# ChatML, as Qwen's chat models use it; images come first in a user turn, each followed by a newline.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GROUPS = ("vision", "projector", "llm")


# ------------------------------------------------------------------------------------ tokenizer/processor


def build_tiny_processor(vision: VisionSize, words: list[str]):
    """A word-level tokenizer over `words`, a SigLIP-style image processor and a ChatML template."""
    return word_level_processor(words, vision.image_size, vision.patch_size)


def word_level_processor(words: list[str], image_size: int, patch_size: int):
    """`build_tiny_processor` for any square image size, also one that is not a multiple of the patch
    (SigLIP-so400m: 384 px, patch 14 -> 27 x 27 visual tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + list(CHAT_ROLES) + sorted(set(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>", bos_token=None
    )
    image_processor = SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=3,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=fast,
        patch_size=patch_size,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def num_image_tokens(processor) -> int:
    """Visual tokens per image, as the processor expands one `<image>` placeholder."""
    ip = processor.image_processor
    size = getattr(ip, "crop_size", None) or ip.size
    h = size.get("height") or size.get("shortest_edge")
    w = size.get("width") or size.get("shortest_edge")
    n = (h // processor.patch_size) * (w // processor.patch_size) + (
        processor.num_additional_image_tokens or 0
    )
    if processor.vision_feature_select_strategy == "default":
        n -= 1
    return n


def image_token_id(processor) -> int:
    return int(processor.image_token_id)


def stop_token_ids(processor, model=None) -> list[int]:
    """Token ids that end an answer: the chat template's end-of-turn and the tokenizer's EOS."""
    tok = processor.tokenizer
    ids = set()
    for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>"):
        tid = tok.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid is not None:
            ids.add(tid)
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    if model is not None:
        eos = getattr(model.generation_config, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(e) for e in eos)
    return sorted(ids)


def check_tokenizers(teacher_tok, student_tok) -> None:
    """Logit distillation compares distributions over one vocabulary: refuse tokenizers that differ.

    Padded embedding rows (a model's vocab_size above the tokenizer's length) are not a difference.
    """
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv == sv:
        return
    only_t = sorted(set(tv) - set(sv), key=lambda t: tv[t])
    only_s = sorted(set(sv) - set(tv), key=lambda t: sv[t])
    moved = sorted((t for t in set(tv) & set(sv) if tv[t] != sv[t]), key=lambda t: tv[t])
    parts = []
    if only_t:
        parts.append(f"{len(only_t)} token(s) only in the teacher's, e.g. {only_t[:5]}")
    if only_s:
        parts.append(f"{len(only_s)} token(s) only in the student's, e.g. {only_s[:5]}")
    if moved:
        parts.append(
            f"{len(moved)} token(s) with different ids, e.g. "
            + ", ".join(f"{t!r}: {tv[t]} vs {sv[t]}" for t in moved[:5])
        )
    raise ModelError(
        "teacher and student tokenizers differ (" + "; ".join(parts) + "); logit distillation needs one "
        "vocabulary: give the student an LLM of the teacher's family, or the teacher's tokenizer"
    )


# ----------------------------------------------------------------------------------------------- models


def _qwen2_text_config(t: TinyConfig, vocab_size: int, max_positions: int):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=t.tie_word_embeddings,
        rope_theta=10000.0,
    )


def _siglip_vision_config(v: VisionSize):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        num_channels=3,
        vision_use_head=False,
    )


def padded_vocab(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def tiny_llava_config(
    tiny: TinyConfig, vocab_size: int, image_token: int, n_img: int, vision_from_config=None
):
    """The LlavaConfig of a tiny model; with `vision_from_config` (a LlavaConfig) the vision part is
    that model's, as LLaVA-KD's student shares the teacher's encoder."""
    from transformers import LlavaConfig

    if tiny.vision == "teacher":
        if vision_from_config is None:
            raise ModelError("student.tiny.vision = 'teacher' needs the teacher built first")
        vision_config = vision_from_config.vision_config
        layer = vision_from_config.vision_feature_layer
        strategy = vision_from_config.vision_feature_select_strategy
    else:
        vision_config = _siglip_vision_config(tiny.vision)
        layer, strategy = -1, "full"
    return LlavaConfig(
        vision_config=vision_config,
        text_config=_qwen2_text_config(
            tiny, padded_vocab(vocab_size, tiny.pad_vocab_to_multiple_of), max_positions=max(512, 4 * n_img)
        ),
        image_token_index=image_token,
        image_seq_length=n_img,
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        tie_word_embeddings=tiny.tie_word_embeddings,
    )


def composed_llava_config(spec: ModelConfig, vision_config, text_config, image_token: int, n_img: int):
    """The LlavaConfig of a student composed from a LLaVA model's vision part and an LLM's config."""
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=vision_config.vision_config,
        text_config=text_config,
        image_token_index=image_token,
        image_seq_length=n_img,
        vision_feature_layer=spec.vision_feature_layer
        if spec.vision_feature_layer is not None
        else vision_config.vision_feature_layer,
        vision_feature_select_strategy=spec.vision_feature_select_strategy
        or vision_config.vision_feature_select_strategy,
        projector_hidden_act="gelu",
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )


def build_tiny_model(tiny: TinyConfig, processor, vision_from: nn.Module | None = None, seed: int = 0):
    """A tiny LlavaForConditionalGeneration with real transformers classes (SigLIP + Qwen2).

    With `vision_from`, the vision tower is that model's (config and weights), as LLaVA-KD's student
    shares the teacher's encoder.
    """
    from transformers import LlavaForConditionalGeneration

    config = tiny_llava_config(
        tiny,
        len(processor.tokenizer),
        image_token_id(processor),
        num_image_tokens(processor),
        None if vision_from is None else vision_from.config,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    if tiny.vision == "teacher":
        model.model.vision_tower.load_state_dict(vision_from.model.vision_tower.state_dict())
    _set_generation_config(model, processor)
    return model


def _set_generation_config(model, processor) -> None:
    gc = model.generation_config
    tok = processor.tokenizer
    gc.eos_token_id = stop_token_ids(processor)
    gc.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else gc.eos_token_id[0]
    gc.bos_token_id = tok.bos_token_id


def torch_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """A recipe's dtype name on a device: 'auto' is bf16 on CUDA (any index), fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, name)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def _check_ref(ref: str, what: str) -> str:
    """A local folder must exist; a hub id is passed on (it needs the hub or the local HF cache)."""
    p = Path(ref).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"{what} '{ref}' is a file; give the folder that holds config.json")
        if not (p / "config.json").is_file():
            raise ModelError(f"{what} '{ref}' has no config.json; give a folder written by save_pretrained")
        return str(p)
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise ModelError(f"{what} '{ref}': no such folder, and not a hub id (owner/name); check the path")
    return ref


def model_folder(ref: str, what: str = "model") -> Path:
    """The local folder of a model: the folder itself, or a hub id's snapshot in the local HF cache."""
    ref = _check_ref(ref, what)
    if Path(ref).is_dir():
        return Path(ref)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=True))
    except Exception as e:  # not downloaded, or a broken cache: the user can point at a folder
        raise ModelError(
            f"{what} '{ref}': not in the local Hugging Face cache ({_first_line(e)}); give a local folder"
        ) from None


def load_llava(
    ref: str, *, what: str = "model", dtype: str = "auto", device: str = "cpu", trust_remote_code=False
):
    """Load a LlavaForConditionalGeneration and its processor from a hub id or a folder."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    ref = _check_ref(ref, what)
    try:
        processor = AutoProcessor.from_pretrained(ref, trust_remote_code=trust_remote_code)
        model = LlavaForConditionalGeneration.from_pretrained(
            ref, dtype=torch_dtype(dtype, device), use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except Exception as e:  # any failure to read a user's folder is a bad input, not a crash
        raise ModelError(
            f"cannot load {what} '{ref}': {_first_line(e)}; give a local folder with safetensors weights "
            "(hub downloads need network access)"
        ) from None
    if not hasattr(processor, "image_processor"):
        raise ModelError(f"{what} '{ref}' has no image processor; a LLaVA folder needs processor files")
    if model.generation_config.eos_token_id is None:
        _set_generation_config(model, processor)
    return model.to(device), processor


def compose_llava(spec: ModelConfig, teacher=None, teacher_processor=None, *, device="cpu", seed: int = 0):
    """A student from parts: a vision encoder (the teacher's, or a LLaVA folder's), an LLM, a new projector.

    The student speaks through the teacher's processor (image token, chat template), after a check
    that the LLM's own tokenizer has the teacher's vocabulary.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    if spec.vision in (None, "teacher"):
        if teacher is None:
            raise ModelError("student.vision = 'teacher' needs the teacher loaded first")
        vis_model, processor = teacher, teacher_processor
    else:
        vis_model, processor = load_llava(spec.vision, what="student.vision", device="cpu")
    llm_ref = _check_ref(spec.llm, "student.llm")
    try:
        llm = AutoModelForCausalLM.from_pretrained(
            llm_ref, dtype=torch.float32, use_safetensors=True, trust_remote_code=spec.trust_remote_code
        )
        llm_tok = AutoTokenizer.from_pretrained(llm_ref, trust_remote_code=spec.trust_remote_code)
    except Exception as e:  # any failure to read a user's folder is a bad input, not a crash
        raise ModelError(
            f"cannot load student.llm '{spec.llm}': {_first_line(e)}; give a local folder"
        ) from None
    _check_llm_tokenizer(llm_tok, processor.tokenizer)
    text_config = llm.config
    img_id = image_token_id(processor)
    vocab = max(text_config.vocab_size, img_id + 1)
    config = composed_llava_config(spec, vis_model.config, text_config, img_id, num_image_tokens(processor))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vis_model.model.vision_tower.state_dict())
    base = llm.get_decoder() if hasattr(llm, "get_decoder") else llm.model
    model.model.language_model.load_state_dict(base.state_dict())
    if vocab > text_config.vocab_size:
        model.resize_token_embeddings(vocab)
    if not config.tie_word_embeddings:
        model.lm_head.weight.data[: llm.lm_head.weight.shape[0]] = llm.lm_head.weight.data
    if spec.projector == "linear":
        proj = model.model.multi_modal_projector
        proj.act = nn.Identity()
        nn.init.eye_(proj.linear_2.weight)
        proj.linear_2.weight.requires_grad_(True)
        if proj.linear_2.bias is not None:
            nn.init.zeros_(proj.linear_2.bias)
    _set_generation_config(model, processor)
    del llm
    # The vision config came from the teacher, with its dtype (bf16 for a bf16 teacher): the composed
    # student starts in fp32 throughout.
    return model.float().to(device), processor


def _check_llm_tokenizer(llm_tok, llava_tok) -> None:
    """The LLM's tokenizer must agree with the LLaVA tokenizer on every token both know; the LLaVA one
    may add its image token (and nothing the LLM cannot embed)."""
    lv, tv = llm_tok.get_vocab(), llava_tok.get_vocab()
    moved = [t for t in set(lv) & set(tv) if lv[t] != tv[t]]
    extra = [t for t in set(lv) - set(tv)]
    if moved or extra:
        check_tokenizers(llava_tok, llm_tok)


def set_trainable(model, groups: list[str] | tuple[str, ...]) -> dict[str, int]:
    """Freeze everything, then unfreeze the named groups; returns trainable parameters per group."""
    for p in model.parameters():
        p.requires_grad_(False)
    counts = {}
    for g in groups:
        n = 0
        for p in group_modules(model)[g].parameters():
            p.requires_grad_(True)
            n += p.numel()
        counts[g] = n
    if "llm" in groups:
        for p in model.lm_head.parameters():
            p.requires_grad_(True)
    return counts


def set_activation_checkpointing(model, on: bool) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (non-reentrant,
    so a frozen LLM still passes gradients back to the projector)."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.24
    disable = getattr(model, "activation_checkpointing_disable", None)
    if on:
        kwargs = {"use_reentrant": False}
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return
    (disable or model.gradient_checkpointing_disable)()
    # Enabling also hooked the input embeddings to require grad; disabling leaves that hook in place.
    model.disable_input_require_grads()


def decoder_layers(model) -> nn.ModuleList:
    """The repeated blocks of a LLaVA model's LLM (where compute and activations are)."""
    return model.model.language_model.layers


def compile_layers(model, backend: str = "inductor") -> None:
    """torch.compile each decoder layer in place: one graph reused by every layer (short compile), and
    parameter names unchanged, so checkpoints and resume states stay the same. Shapes are dynamic:
    batches differ in length."""
    for layer in decoder_layers(model):
        layer.compile(backend=backend, dynamic=True)


def eager():
    """A context in which compiled modules run uncompiled: generation (evaluation) would otherwise
    compile a graph per decoding shape for a few calls."""
    from contextlib import nullcontext

    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance is not None else nullcontext()


def group_modules(model) -> dict[str, nn.Module]:
    return {
        "vision": model.model.vision_tower,
        "projector": model.model.multi_modal_projector,
        "llm": nn.ModuleList([model.model.language_model, model.lm_head]),
    }


def count_params(model) -> dict[str, int]:
    """Parameters per group (tied weights counted once) and in total."""
    seen: set[int] = set()
    out = {}
    for g, mod in group_modules(model).items():
        n = 0
        for p in mod.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        out[g] = n
    out["total"] = sum(out.values())
    return out


def dir_size_mb(path: str | Path, pattern: str = "*.safetensors") -> float:
    return sum(f.stat().st_size for f in Path(path).rglob(pattern)) / 2**20


def save_model(model, processor, out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)


@dataclass
class ModelInfo:
    path: str
    params: dict[str, int]
    size_mb: float
    dtype: str
    vocab_size: int
    tokenizer_size: int
    image_tokens: int
    llm: str
    vision: str

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def model_info(path: str | Path) -> ModelInfo:
    model, processor = load_llava(str(path), what="model")
    cfg = model.config
    dtype = next(model.parameters()).dtype
    saved = (
        json.loads((Path(path) / "config.json").read_text()).get("dtype")
        if Path(path, "config.json").exists()
        else None
    )
    return ModelInfo(
        path=str(path),
        params=count_params(model),
        size_mb=round(dir_size_mb(path), 3),
        dtype=str(saved or dtype).replace("torch.", ""),
        vocab_size=cfg.text_config.vocab_size,
        tokenizer_size=len(processor.tokenizer),
        image_tokens=num_image_tokens(processor),
        llm=cfg.text_config.model_type,
        vision=cfg.vision_config.model_type,
    )
