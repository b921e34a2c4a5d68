"""Tiny stand-ins with the real checkpoints' settings, so the real recipes run offline in tests.

What makes them "real-shaped" (the settings of llava-hf/llava-interleave-qwen-7b-hf and of the
Qwen1.5 chat LLMs, at a few thousand parameters):

- a byte-level BPE tokenizer with Qwen's special tokens appended after the merges
  (`<|endoftext|>` pad, `<|im_start|>`, `<|im_end|>` eos); the teacher's adds `<image>` after them,
  the LLM's does not know it, as with Qwen1.5 and its LLaVA;
- the interleave chat template (images first, `{% generation %}` tags, content lists);
- SigLIP vision with patch 14 on an image that is not a multiple of it (30 px -> 2x2 patches, as
  384 px -> 27x27), read at a non-final layer (-2) with 'full' selection;
- Qwen2 text; the teacher untied with its vocab padded to a multiple of 64, the student LLM tied
  (Qwen1.5-0.5B) or untied (1.8B) and padded to a multiple of 32: one tokenizer, different
  padded rows;
- data laid out as LLaVA-Pretrain 558k and the 665k mix are (image folders, one text-only sample).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from lsd_edge.models.archs import (
    PATCH,
    interleave_qwen7b,
    llava_config,
    qwen2_config,
    qwen15_text,
    siglip_config,
)

IMAGE_SIZE = 30
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
INTERLEAVE_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen1.5-Chat's own template: a default system turn, string contents.
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _texts(records: list[dict]) -> list[str]:
    return [str(t["value"]).replace("<image>", "") for r in records for t in r["conversations"]]


def qwen_like_tokenizers(corpus: list[str]):
    """(llm tokenizer, teacher tokenizer): byte-level BPE trained on `corpus`, Qwen's specials last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus + ["system user assistant You are a helpful assistant."], trainer)
    tok.add_special_tokens(list(QWEN_SPECIALS))

    def wrap(t, chat_template):
        return PreTrainedTokenizerFast(
            tokenizer_object=t,
            pad_token="<|endoftext|>",
            eos_token="<|im_end|>",
            bos_token=None,
            unk_token=None,
            chat_template=chat_template,
        )

    llm_tok = wrap(tok, QWEN_TEMPLATE)
    teacher_raw = Tokenizer.from_str(tok.to_str())
    teacher_raw.add_special_tokens(["<image>"])
    return llm_tok, wrap(teacher_raw, INTERLEAVE_TEMPLATE)


def _padded(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def build_teacher(out: Path, teacher_tok, seed: int = 0) -> Path:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    config = llava_config(
        siglip_config(32, 48, 3, 2, IMAGE_SIZE),
        qwen2_config(_padded(len(teacher_tok), 64) + 64, 48, 2, 4, 2, tied=False),
        teacher_tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = teacher_tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = teacher_tok.pad_token_id
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessorPil(
            size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            resample=3,
        ),
        tokenizer=teacher_tok,
        patch_size=PATCH,
        vision_feature_select_strategy="full",
        chat_template=INTERLEAVE_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=0,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_llm(out: Path, llm_tok, *, tied: bool, hidden: int = 16, seed: int = 1, pad_to: int = 32) -> Path:
    """A Qwen2ForCausalLM folder with `llm_tok`; embedding rows padded to a multiple of `pad_to`."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen2_config(_padded(len(llm_tok), pad_to), hidden, 2, 2, 2, tied=tied))
    model.save_pretrained(out)
    llm_tok.save_pretrained(out)
    return out


def llava_layout(shapes: Path, root: Path) -> Path:
    """ShapesVQA rearranged as the real recipes expect their data under data.root."""
    root.mkdir(parents=True, exist_ok=True)
    pre = json.loads((shapes / "pretrain.json").read_text())
    inst = json.loads((shapes / "instruct.json").read_text())
    ev = json.loads((shapes / "eval.json").read_text())
    for sub in ("LLaVA-Pretrain/images/00000", "coco/train2017", "gqa/images", "eval"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for rec in pre:
        shutil.copy(shapes / "images" / rec["image"], root / "LLaVA-Pretrain/images/00000" / rec["image"])
        rec["image"] = f"00000/{rec['image']}"
    for rec in inst:
        shutil.copy(shapes / "images" / rec["image"], root / "coco/train2017" / rec["image"])
        rec["image"] = f"coco/train2017/{rec['image']}"
    # The 665k mix holds text-only conversations (ShareGPT) beside the image ones.
    inst.append(
        {
            "id": "sharegpt-0",
            "conversations": [
                {"from": "human", "value": "say the word blue ."},
                {"from": "gpt", "value": "blue"},
            ],
        }
    )
    for rec in ev:
        shutil.copy(shapes / "images" / rec["image"], root / "gqa/images" / rec["image"])
        rec["image"] = f"gqa/images/{rec['image']}"
    (root / "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json").write_text(json.dumps(pre))
    (root / "llava_v1_5_mix665k.json").write_text(json.dumps(inst))
    (root / "eval/gqa_testdev_balanced.json").write_text(json.dumps(ev))
    return root


def build_standins(tmp: Path, shapes: Path) -> dict[str, Path]:
    """Teacher folder, tied and untied student LLM folders and LLaVA-layout data under `tmp`."""
    data = llava_layout(shapes, tmp / "data")
    records = json.loads((data / "llava_v1_5_mix665k.json").read_text())
    records += json.loads((data / "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json").read_text())
    llm_tok, teacher_tok = qwen_like_tokenizers(_texts(records))
    return {
        "data": data,
        "teacher": build_teacher(tmp / "teacher", teacher_tok),
        "llm_tied": build_llm(tmp / "qwen-0.5b", llm_tok, tied=True),
        "llm_untied": build_llm(tmp / "qwen-1.8b", llm_tok, tied=False, hidden=24),
    }


# The published config.json values of the real checkpoints the shipped recipes name (sizes only):
# enough for `lsd_edge.memory` to estimate them offline, on the meta device.
def write_real_configs(out: Path) -> dict[str, Path]:
    configs = {
        # SigLIP-so400m (26 of 27 layers) + Qwen1.5-7B-Chat
        "llava-interleave-qwen-7b-hf": interleave_qwen7b(),
        "Qwen1.5-0.5B-Chat": qwen15_text("0.5b"),
        "Qwen1.5-1.8B-Chat": qwen15_text("1.8b"),
    }
    for name, cfg in configs.items():
        cfg.save_pretrained(out / name)
    return {name: out / name for name in configs}


def write_small_configs(out: Path, student_hidden: int, teacher_hidden: int, vocab: int) -> Path:
    """Config-only folders shaped like the real recipes' models at small sizes: `teacher` (SigLIP/14 at
    98 px: 49 visual tokens; untied Qwen2 text with 64 more rows) and `llm` (a tied Qwen2)."""
    th, sh = teacher_hidden, student_hidden
    llava_config(
        siglip_config(64, 128, 2, 2, 98),
        qwen2_config(vocab + 64, th, 3, 4, 2, tied=False, intermediate=int(th * 2.7)),
        image_token=vocab - 1,
    ).save_pretrained(out / "teacher")
    qwen2_config(vocab, sh, 3, 4, 4, tied=True, intermediate=int(sh * 2.75)).save_pretrained(out / "llm")
    return out
