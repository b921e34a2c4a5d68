"""Real architectures from their published config.json values: real sizes without downloading weights.

`ARCHS` names the models the shipped recipes use (LLaVA-KD's SigLIP + Qwen1.5 students, the
llava-interleave-qwen-7b teacher), a 4B-class teacher that fits a 24 GiB machine in bf16, and edge
students that see with fewer visual tokens (METHOD.md, "edge vision"): Qwen1.5-0.5B behind a smaller
SigLIP tower, or behind the teacher's tower at a lower resolution. Each builds a `LlavaConfig` with
the checkpoint's sizes (hidden, layers, heads, MLP width, vocabulary rows, tied or untied embeddings;
SigLIP-so400m at 384 px: 729 visual tokens), so `lsd-edge bench --arch` measures speed and memory at
real size with random weights, and `lsd_edge.memory` tests estimate the real recipes offline. A
student's config is composed as `lsd-edge distill` composes it from its recipe's [student] table
(`Arch.student`: the tower as `student.vision` gives it, cut by `student.image_size` and
`student.vision_layers`, `lsd_edge.models.build.composed_llava_config`), so an edge arch is the
student that recipe would build, with random weights. The tokenizer that goes with them is a small byte-level BPE one
(`arch_processor`): prompts are a few tokens shorter than Qwen's would be, the 729 visual tokens
and every weight are real-sized.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import LlavaConfig, Qwen2Config, SiglipVisionConfig

from lsd_edge.models.build import composed_llava_config, student_tower, tiny_processor
from lsd_edge.models.tokens import IMAGE_TOKEN, SPECIAL_TOKENS
from lsd_edge.models.vision import Tower
from lsd_edge.recipe.schema import StudentConfig

# SigLIP-so400m/14 at 384 px as llava-interleave-qwen-7b-hf reads it (26 of its 27 layers, all patches).
SIGLIP_SO400M = dict(hidden=1152, intermediate=4304, layers=26, heads=16, image_size=384)
PATCH = 14
# SigLIP-B/16 at 224 px (google/siglip-base-patch16-224's vision config; SigLIP2-base has the same
# sizes): 12 layers of 768, 14 x 14 = 196 visual tokens, about 86M parameters against so400m's 400M.
SIGLIP_B16 = dict(hidden=768, intermediate=3072, layers=12, heads=12, image_size=224, patch=16)
SIGLIP_B16_REF = "google/siglip-base-patch16-224"
QWEN05_REF = "Qwen/Qwen1.5-0.5B-Chat"
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
    # A student's [student] recipe fields (vision, llm, image_size, vision_layers): `vision` sizes the
    # tower that `student.vision` names, and the config is composed as distill composes it.
    student: dict | None = None

    def config(self):
        """The LlavaConfig, with the `<image>` id of `arch_processor`'s tokenizer."""
        # the tower as distill takes it: read at its last layer with every patch (`Tower.of_config`,
        # what `load_siglip` gives, and how llava-interleave reads the teacher's)
        tower = Tower.of_config(siglip_config(**self.vision))
        text = qwen2_config(**self.text)
        if self.student is None:
            return llava_config(tower.config, text, ARCH_IMAGE_TOKEN, layer=tower.feature_layer)
        spec = StudentConfig(**self.student)
        tower = student_tower(spec, tower, f"--arch {self.name}'s tower")
        return composed_llava_config(spec, tower, text, ARCH_IMAGE_TOKEN)

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
    student = dict(vision="teacher", llm=f"Qwen/Qwen1.5-{size.upper()}-Chat") if role == "student" else None
    return Arch(name, description, role, SIGLIP_SO400M, text, dtype, onnx=role == "student", student=student)


def _edge_arch(name: str, description: str, tower: dict, **student):
    """A Qwen1.5-0.5B student (as `qwen0.5b`) whose [student] table sees with fewer visual tokens:
    `tower` sizes the SigLIP that `student["vision"]` names."""
    text = dict(vocab=QWEN15_VOCAB, max_positions=32768, **QWEN15["0.5b"])
    spec = dict(llm=QWEN05_REF, **student)
    return Arch(name, description, "student", tower, text, "float32", onnx=True, student=spec)


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
        _edge_arch(
            "qwen0.5b-edge-b16",
            f"edge student: SigLIP-B/16 at 224 px (196 visual tokens, student.vision = {SIGLIP_B16_REF}) "
            "+ Qwen1.5-0.5B",
            SIGLIP_B16,
            vision=SIGLIP_B16_REF,
        ),
        _edge_arch(
            "qwen0.5b-edge-224",
            "edge student: the teacher's SigLIP-so400m at 224 px (256 visual tokens, student.image_size "
            "= 224) + Qwen1.5-0.5B",
            SIGLIP_SO400M,
            vision="teacher",
            image_size=224,
        ),
        _edge_arch(
            "qwen0.5b-edge-168",
            "edge student: the teacher's SigLIP-so400m at 168 px (144 visual tokens, student.image_size "
            "= 168) + Qwen1.5-0.5B",
            SIGLIP_SO400M,
            vision="teacher",
            image_size=168,
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
