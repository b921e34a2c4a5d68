"""Real architectures from their published config.json values: real sizes without downloading weights.

`ARCHS` names the models the shipped recipes use (LLaVA-KD's SigLIP + Qwen1.5 students, the
llava-interleave-qwen-7b teacher) and a 4B-class teacher that fits a 24 GiB machine in bf16. Each
builds a `LlavaConfig` with the checkpoint's sizes (hidden, layers, heads, MLP width, vocabulary
rows, tied or untied embeddings; SigLIP-so400m at 384 px: 729 visual tokens), so `lsd-edge bench
--arch` measures speed and memory at real size with random weights, and `lsd_edge.memory` tests
estimate the real recipes offline. The tokenizer that goes with them is a small byte-level BPE one
(`arch_processor`): prompts are a few tokens shorter than Qwen's would be, the 729 visual tokens
and every weight are real-sized.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import LlavaConfig, Qwen2Config, SiglipVisionConfig

from lsd_edge.models.build import tiny_processor
from lsd_edge.models.tokens import IMAGE_TOKEN, SPECIAL_TOKENS

# SigLIP-so400m/14 at 384 px as llava-interleave-qwen-7b-hf reads it (26 of its 27 layers, all patches).
SIGLIP_SO400M = dict(hidden=1152, intermediate=4304, layers=26, heads=16, image_size=384)
PATCH = 14
QWEN15_VOCAB = 151936
# Qwen1.5-*-Chat config.json: hidden, layers, heads (= kv heads), MLP width, tied embeddings.
QWEN15 = {
    "0.5b": dict(hidden=1024, layers=24, heads=16, kv=16, intermediate=2816, tied=True),
    "1.8b": dict(hidden=2048, layers=24, heads=16, kv=16, intermediate=5504, tied=False),
    "4b": dict(hidden=2560, layers=40, heads=20, kv=20, intermediate=6912, tied=False),
    "7b": dict(hidden=4096, layers=32, heads=32, kv=32, intermediate=11008, tied=False),
}


def qwen2_config(
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    kv: int,
    tied: bool,
    intermediate: int | None = None,
    max_positions: int = 512,
):
    return Qwen2Config(
        vocab_size=vocab,
        # Qwen's MLPs are not a round multiple of the width
        intermediate_size=intermediate or hidden * 2 + 8,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=max_positions,
        rope_theta=1000000.0,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=None,
    )


def siglip_config(
    hidden: int, intermediate: int, layers: int, heads: int, image_size: int, patch: int = PATCH
):
    return SiglipVisionConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch,
        hidden_act="gelu_pytorch_tanh",
        vision_use_head=False,
    )


def llava_config(vision, text, image_token: int, layer: int = -2):
    """A LLaVA with 'full' feature selection (SigLIP has no CLS token to drop)."""
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token,
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_layer=layer,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        tie_word_embeddings=text.tie_word_embeddings,
    )


def qwen15_text(size: str, vocab: int = QWEN15_VOCAB):
    return qwen2_config(vocab, max_positions=32768, **QWEN15[size])


def siglip_so400m():
    return siglip_config(**SIGLIP_SO400M)


def interleave_qwen7b(image_token: int = 151646):
    """llava-hf/llava-interleave-qwen-7b-hf: SigLIP-so400m + Qwen1.5-7B-Chat with 152000 rows."""
    return llava_config(siglip_so400m(), qwen15_text("7b", vocab=152000), image_token, layer=-1)


@dataclass(frozen=True)
class Arch:
    """A LLaVA of given sizes: SigLIP vision (`siglip_config` keys), projector, Qwen2 text
    (`qwen2_config` keys, vocab included), read at the vision tower's last layer."""

    name: str
    description: str
    role: str  # "teacher" or "student": which row the efficiency ratios compare against
    vision: dict
    text: dict
    dtype: str  # torch dtype on the CPU: a 4B/7B teacher's fp32 weights would not fit in 24 GiB
    onnx: bool  # also measure its ONNX int8 export (students)

    def config(self):
        """The LlavaConfig, with the `<image>` id of `arch_processor`'s tokenizer."""
        vision = siglip_config(**self.vision)
        return llava_config(vision, qwen2_config(**self.text), ARCH_IMAGE_TOKEN, layer=-1)

    def build(self, words: list[str]):
        """(LlavaConfig, processor): a byte-level BPE tokenizer over `words` (ChatML) whose `<image>` id
        the config uses, and an image processor at the vision tower's size."""
        config = self.config()
        return config, arch_processor(config.vision_config.image_size, config.vision_config.patch_size, words)


# The tiny tokenizer puts the special tokens first, so `<image>` has this id whatever the words.
ARCH_IMAGE_TOKEN = SPECIAL_TOKENS.index(IMAGE_TOKEN)


def arch_processor(image_size: int, patch_size: int, words: list[str]):
    """The processor of an architecture's random-weight model: a byte-level BPE tokenizer trained on
    `words` (each one token), `lsd_edge.models.bpe`."""
    processor = tiny_processor(words, image_size, patch_size)
    assert processor.image_token_id == ARCH_IMAGE_TOKEN
    return processor


def _qwen_arch(name: str, description: str, role: str, size: str, dtype: str, vocab: int = QWEN15_VOCAB):
    text = dict(vocab=vocab, max_positions=32768, **QWEN15[size])
    return Arch(name, description, role, SIGLIP_SO400M, text, dtype, onnx=role == "student")


ARCHS = {
    a.name: a
    for a in (
        _qwen_arch(
            "qwen0.5b",
            "LLaVA-KD student: SigLIP-so400m + Qwen1.5-0.5B (tied), recipes/qwen0.5b.toml",
            "student",
            "0.5b",
            "float32",
        ),
        _qwen_arch(
            "qwen1.8b",
            "LLaVA-KD student: SigLIP-so400m + Qwen1.5-1.8B, recipes/qwen1.8b.toml",
            "student",
            "1.8b",
            "float32",
        ),
        _qwen_arch(
            "qwen4b",
            "4B-class teacher: SigLIP-so400m + Qwen1.5-4B in bf16 (8.7 GB)",
            "teacher",
            "4b",
            "bfloat16",
        ),
        _qwen_arch(
            "llava7b",
            "the recipes' teacher, llava-interleave-qwen-7b: SigLIP-so400m + Qwen1.5-7B in bf16 (16 GB)",
            "teacher",
            "7b",
            "bfloat16",
            vocab=152000,
        ),
    )
}
