"""Token rules every part shares, torch-free: the image token, the chat template, stop tokens, labels.

The ONNX runner reads a tokenizer with `tokenizers` alone, the PyTorch side with transformers;
both decide their stop tokens by `stop_ids`, so an answer ends at the same token in either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from lsd_edge.errors import ModelError

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100  # labels: no loss at this position
SPECIAL_TOKENS = ("<pad>", "<unk>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN)
CHAT_ROLES = ("system", "user", "assistant")
# ChatML, as Qwen's chat models use it; images come first in a user turn, each followed by a newline.
# The tiny models' ChatML template. An assistant's content follows one space, so that with their
# byte-level BPE (`lsd_edge.models.bpe`) an answer's words are the tokens they are in a caption or a
# question ("Ġred"); exact match strips it, and generation starts after "assistant\n" as usual.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %} {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Tokens that end a turn in common chat templates; the ones a vocabulary has are stop tokens.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>")


def stop_ids(
    token_to_id: Callable[[str], int | None],
    eos_tokens: Iterable[str | None] = (),
    eos_ids: Iterable[int | None] = (),
    generation_eos: int | list[int] | None = None,
) -> list[int]:
    """Token ids that end an answer: every end-of-turn token the vocabulary has, the tokenizer's EOS
    (by name or id) and the generation config's `eos_token_id` (one id or a list)."""
    ids: set[int] = set()
    for t in (*END_OF_TURN, *(e for e in eos_tokens if e)):
        tid = token_to_id(t)
        if tid is not None:
            ids.add(int(tid))
    ids.update(int(i) for i in eos_ids if i is not None)
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif isinstance(generation_eos, list):
        ids.update(int(e) for e in generation_eos)
    return sorted(ids)


def stop_token_ids(processor, model=None) -> list[int]:
    """`stop_ids` of a transformers processor (and a model's generation config)."""
    tok = processor.tokenizer

    def lookup(token: str) -> int | None:
        tid = tok.convert_tokens_to_ids(token)
        return tid if isinstance(tid, int) and tid != tok.unk_token_id else None

    eos = None if model is None else getattr(model.generation_config, "eos_token_id", None)
    return stop_ids(lookup, eos_ids=[tok.eos_token_id], generation_eos=eos)


def processor_image_size(processor) -> tuple[int, int]:
    """(height, width) in pixels of the images the processor makes."""
    ip = processor.image_processor
    size = getattr(ip, "crop_size", None) or ip.size
    h = size.get("height") or size.get("shortest_edge")
    w = size.get("width") or size.get("shortest_edge")
    return int(h), int(w)


def image_tokens_at(processor, height: int, width: int) -> int:
    """Visual tokens the vision tower gives for one image of `height` x `width` pixels."""
    n = (height // processor.patch_size) * (width // processor.patch_size) + (
        processor.num_additional_image_tokens or 0
    )
    if processor.vision_feature_select_strategy == "default":
        n -= 1
    return n


def num_image_tokens(processor) -> int:
    """Visual tokens per image, as the processor expands one `<image>` placeholder."""
    return image_tokens_at(processor, *processor_image_size(processor))


def image_tokens(config) -> int:
    """Visual tokens per image of a LlavaConfig (its processor would expand `<image>` to as many)."""
    v = config.vision_config
    n = (v.image_size // v.patch_size) ** 2
    if v.model_type == "clip_vision_model":
        n += 1  # the CLS token
    if config.vision_feature_select_strategy == "default":
        n -= 1
    return n


def image_token_id(processor) -> int:
    return int(processor.image_token_id)


def same_vocabulary(teacher_tok, student_tok) -> bool:
    """Whether two tokenizers map every token to the same id (padded embedding rows, a model's
    vocab_size above the tokenizer's length, are not a difference)."""
    return teacher_tok.get_vocab() == student_tok.get_vocab()


def check_tokenizers(teacher, student, texts: Callable[[], Iterable[str]] | None = None) -> None:
    """A student whose tokenizer differs from the teacher's is distilled across the two vocabularies
    (`lsd_edge.distill.cross_vocab`); refuse only a student tokenizer that cannot read the data.

    `teacher`, `student`: processors (or bare tokenizers). With one vocabulary nothing is checked.
    Otherwise the student's must have a chat template, keep its image token as one token, be a fast
    tokenizer (answers are aligned by character offsets) and read `texts()` (some of the data's
    text) without unknown tokens where the teacher's reads them without.
    """
    t_tok, s_tok = getattr(teacher, "tokenizer", teacher), getattr(student, "tokenizer", student)
    if same_vocabulary(t_tok, s_tok):
        return
    why = "the student's tokenizer differs from the teacher's and "
    fix = "; give the student a tokenizer that has it, or the teacher's tokenizer"
    template = getattr(student, "chat_template", None) or getattr(s_tok, "chat_template", None)
    if not template:
        raise ModelError(why + "has no chat template, so the data cannot be written for it" + fix)
    image = getattr(student, "image_token", IMAGE_TOKEN)
    if len(s_tok(image, add_special_tokens=False)["input_ids"]) != 1:
        raise ModelError(why + f"does not keep the image token {image} as one token" + fix)
    if not getattr(s_tok, "is_fast", False):
        raise ModelError(
            why + "is not a fast tokenizer: answers are aligned by character offsets, which only fast "
            "tokenizers give; save the student with its tokenizer.json"
        )
    unk = s_tok.unk_token_id
    if unk is None or texts is None:
        return
    for text in texts():
        if (
            unk in s_tok(text, add_special_tokens=False)["input_ids"]
            and t_tok.unk_token_id not in t_tok(text, add_special_tokens=False)["input_ids"]
        ):
            raise ModelError(
                why + f"reads the data's text {text[:60]!r} with unknown tokens ({s_tok.unk_token}), where "
                "the teacher's reads it whole; give the student a tokenizer that covers the data"
            )


def shares_vocabulary(llm_tok, llava_tok) -> bool:
    """Whether an LLM's tokenizer agrees with a LLaVA tokenizer on every token both know, the LLaVA
    one adding at most tokens the LLM lacks (its image token): the LLM then reads the LLaVA's ids."""
    lv, tv = llm_tok.get_vocab(), llava_tok.get_vocab()
    return not any(lv[t] != tv[t] for t in set(lv) & set(tv)) and set(lv) <= set(tv)
