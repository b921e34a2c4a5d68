"""Build a teacher or student `LlavaForConditionalGeneration` and its processor from a recipe.

Two ways besides loading a checkpoint (`lsd_edge.models.load`): a tiny model built from sizes for
the embedded default (SigLIP vision + Qwen2 text, the real transformers classes, a byte-level BPE
tokenizer trained on the recipe's text, `lsd_edge.models.bpe`), or a student composed from parts (a
LLaVA model's vision tower, an LLM, a fresh projector). Every model written by lsd-edge holds its processor (tokenizer, image processor, chat
template) beside the weights, so every command loads any model the same way.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from tokenizers import AddedToken
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from lsd_edge.errors import ModelError
from lsd_edge.models.bpe import MAX_VOCAB, bpe_tokenizer, word_tokenizer
from lsd_edge.models.load import check_ref, first_line, load_llava, load_tokenizer, set_generation_config
from lsd_edge.models.tokens import (
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    image_token_id,
    image_tokens,
    num_image_tokens,
    shares_vocabulary,
)
from lsd_edge.models.vision import (
    Tower,
    cut_config,
    cut_tower,
    is_siglip_folder,
    load_siglip,
    processor_at,
    with_image_processor,
)
from lsd_edge.recipe.schema import ModelConfig, TinyConfig, VisionSize


def build_tiny_processor(vision: VisionSize, texts: list[str]):
    """A byte-level BPE tokenizer trained on `texts` (`lsd_edge.models.bpe`), a SigLIP-style image
    processor at the tower's size and a ChatML template."""
    return tiny_processor(texts, vision.image_size, vision.patch_size)


def tiny_processor(texts: list[str], image_size: int, patch_size: int):
    """`build_tiny_processor` for any square image size, also one that is not a multiple of the patch
    (SigLIP-so400m: 384 px, patch 14 -> 27 x 27 visual tokens)."""
    fast = bpe_tokenizer(texts)
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


def with_own_tokenizer(processor, kind: str, texts: list[str], max_vocab: int | None = None):
    """A copy of a tiny processor (its image processor, patch and visual tokens) that speaks through a
    tokenizer of its own trained on `texts`: word-level (`kind` "word") or a byte-level BPE of at most
    `max_vocab` tokens ("bpe"), with the tiny models' ChatML template (`student.tokenizer`)."""
    tok = word_tokenizer(texts) if kind == "word" else bpe_tokenizer(texts, max_vocab or MAX_VOCAB)
    return with_tokenizer(processor, tok, CHAT_TEMPLATE, IMAGE_TOKEN)


def with_tokenizer(processor, tokenizer, chat_template: str, image_token: str):
    """A LLaVA processor that prepares images as `processor` does (its image processor, patch and
    visual tokens) and text through `tokenizer`, `chat_template` and `image_token`."""
    return LlavaProcessor(
        image_processor=processor.image_processor,
        tokenizer=tokenizer,
        patch_size=processor.patch_size,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        num_additional_image_tokens=processor.num_additional_image_tokens,
        chat_template=chat_template,
        image_token=image_token,
    )


def tiny_text_config(t: TinyConfig, vocab_size: int, max_positions: int):
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


def tiny_vision_config(v: VisionSize):

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
    tiny: TinyConfig,
    vocab_size: int,
    image_token: int,
    n_img: int,
    vision_from_config=None,
    image_size: int | None = None,
    vision_layers: int | None = None,
):
    """The LlavaConfig of a tiny model; with `vision_from_config` (a LlavaConfig) the vision part is
    that model's, as LLaVA-KD's student shares the teacher's encoder, at `image_size` px and with its
    first `vision_layers` layers when given (`lsd_edge.models.vision`)."""

    if tiny.vision == "teacher":
        if vision_from_config is None:
            raise ModelError("student.tiny.vision = 'teacher' needs the teacher built first")
        vision_config = vision_from_config.vision_config
        layer = vision_from_config.vision_feature_layer
        strategy = vision_from_config.vision_feature_select_strategy
        if image_size is not None or vision_layers is not None:
            vision_config, layer = cut_config(
                vision_config, layer, image_size, vision_layers, "the teacher's tower"
            )
    else:
        vision_config = tiny_vision_config(tiny.vision)
        layer, strategy = -1, "full"
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=tiny_text_config(
            tiny, padded_vocab(vocab_size, tiny.pad_vocab_to_multiple_of), max_positions=max(512, 4 * n_img)
        ),
        image_token_index=image_token,
        image_seq_length=n_img,
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        tie_word_embeddings=tiny.tie_word_embeddings,
    )
    if image_size is not None:
        config.image_seq_length = image_tokens(config)
    return config


def student_tower(spec: ModelConfig, tower: Tower, where: str) -> Tower:
    """`tower` under the student's vision choices (`student.image_size`, `student.vision_layers`)."""
    image_size, layers = getattr(spec, "image_size", None), getattr(spec, "vision_layers", None)
    if image_size is None and layers is None:
        return tower
    return cut_tower(tower, image_size, layers, where)


def composed_llava_config(spec: ModelConfig, tower: Tower, text_config, image_token: int):
    """The LlavaConfig of a student composed from a vision tower (its config and how it is read)
    and an LLM's config; the recipe's `vision_feature_layer` / `_select_strategy` win over the tower's."""

    config = LlavaConfig(
        vision_config=tower.config,
        text_config=text_config,
        image_token_index=image_token,
        vision_feature_layer=spec.vision_feature_layer
        if spec.vision_feature_layer is not None
        else tower.feature_layer,
        vision_feature_select_strategy=spec.vision_feature_select_strategy or tower.select_strategy,
        projector_hidden_act="gelu",
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    config.image_seq_length = image_tokens(config)
    return config


def build_tiny_model(
    tiny: TinyConfig,
    processor,
    vision_from: nn.Module | None = None,
    seed: int = 0,
    image_size: int | None = None,
    vision_layers: int | None = None,
):
    """A tiny LlavaForConditionalGeneration with real transformers classes (SigLIP + Qwen2).

    With `vision_from`, the vision tower is that model's (config and weights), as LLaVA-KD's student
    shares the teacher's encoder; at `image_size` px (position embeddings resampled) and with its
    first `vision_layers` layers when given. `processor` must make images of the tower's size
    (`student_processor`).
    """

    config = tiny_llava_config(
        tiny,
        len(processor.tokenizer),
        image_token_id(processor),
        num_image_tokens(processor),
        None if vision_from is None else vision_from.config,
        image_size,
        vision_layers,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    if tiny.vision == "teacher":
        tower = Tower.of(vision_from)
        if image_size is not None or vision_layers is not None:
            tower = cut_tower(tower, image_size, vision_layers, "the teacher's tower")
        model.model.vision_tower.load_state_dict(tower.state)
    set_generation_config(model, processor)
    return model


def compose_llava(spec: ModelConfig, teacher=None, teacher_processor=None, *, device="cpu", seed: int = 0):
    """A student from parts: a vision encoder (the teacher's, or a LLaVA folder's), an LLM, a new projector.

    The student speaks through the teacher's processor (image token, chat template), after a check
    that the LLM's own tokenizer has the teacher's vocabulary.
    """

    if spec.vision in (None, "teacher"):
        if teacher is None:
            raise ModelError("student.vision = 'teacher' needs the teacher loaded first")
        tower, processor, where = Tower.of(teacher), teacher_processor, "the teacher's tower"
    elif is_siglip_folder(spec.vision):
        if teacher_processor is None:
            raise ModelError(
                "student.vision: a SigLIP tower speaks through the teacher's tokenizer; load it first"
            )
        tower, image_processor = load_siglip(spec.vision)
        processor = with_image_processor(teacher_processor, image_processor, tower.config.patch_size)
        where = f"student.vision '{spec.vision}'"
    else:
        vis_model, processor = load_llava(spec.vision, what="student.vision", device="cpu")
        tower, where = Tower.of(vis_model), f"student.vision '{spec.vision}'"
        del vis_model
    tower = student_tower(spec, tower, where)
    processor = student_processor(processor, spec)
    llm_ref = check_ref(spec.llm, "student.llm")
    try:
        llm = AutoModelForCausalLM.from_pretrained(
            llm_ref, dtype=torch.float32, use_safetensors=True, trust_remote_code=spec.trust_remote_code
        )
    except Exception as e:  # any failure to read a user's folder is a bad input, not a crash
        raise ModelError(
            f"cannot load student.llm '{spec.llm}': {first_line(e)}; give a local folder"
        ) from None
    processor = llm_processor(processor, spec)
    text_config = llm.config
    img_id = image_token_id(processor)
    vocab = max(text_config.vocab_size, len(processor.tokenizer), img_id + 1)
    config = composed_llava_config(spec, tower, text_config, img_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state)
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
    set_generation_config(model, processor)
    del llm
    # The vision config came from the teacher, with its dtype (bf16 for a bf16 teacher): the composed
    # student starts in fp32 throughout.
    return model.float().to(device), processor


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def llm_processor(processor, spec: ModelConfig):
    """The processor a composed student speaks through: `processor` (the tower's: the teacher's, at
    the student's image size) when `student.llm`'s tokenizer has the teacher's vocabulary; otherwise
    the same images and chat template over the LLM's own tokenizer, with the image token and the
    template's special tokens it lacks added (`llava_tokenizer_for`): a student with another tokenizer,
    distilled across the two vocabularies (`lsd_edge.distill.cross_vocab`)."""
    ref = check_ref(spec.llm, "student.llm")
    # transformers makes an empty tokenizer from a folder without one: refuse it by name instead
    if Path(ref).is_dir() and not any((Path(ref) / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(
            f"student.llm '{spec.llm}' holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "save the LLM's tokenizer beside its weights"
        )
    llm_tok = load_tokenizer(ref, "student.llm", spec.trust_remote_code)
    if shares_vocabulary(llm_tok, processor.tokenizer):
        return processor
    tokenizer = llava_tokenizer_for(llm_tok, processor)
    return with_tokenizer(processor, tokenizer, processor.chat_template, processor.image_token)


def llava_tokenizer_for(llm_tok, processor):
    """`llm_tok` as a LLaVA student speaks through it: a copy with `processor`'s image token and the
    special tokens of its chat template (`<|im_start|>`, `<|im_end|>`) that it lacks added as special
    tokens (so a turn ends on one token, as generation stops), and a pad token (its end of text where
    it has none)."""
    tok = copy.deepcopy(llm_tok)
    template = processor.chat_template or ""
    specials = [t.content for t in processor.tokenizer.added_tokens_decoder.values() if t.special]
    wanted = dict.fromkeys([processor.image_token] + [t for t in specials if t in template])
    have = tok.get_vocab()
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in wanted if t not in have])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def student_processor(processor, spec: ModelConfig):
    """The processor of a student whose tower sees `student.image_size` px images: a copy of
    `processor` at that size (the same one when the recipe keeps the tower's size)."""
    image_size = getattr(spec, "image_size", None)
    return processor if image_size is None else processor_at(processor, image_size)
