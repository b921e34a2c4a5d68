"""Peak memory of one training step: estimated from the recipe's model configs, and measured.

`estimate_recipe(recipe)` reads only the models' `config.json` (a local folder, or a hub id when the
hub is in reach), builds each model on the meta device to count its parameters, and returns one
`StepMemory` per stage: fp32 student weights, fp32 gradients and AdamW states of the trainable
groups, teacher weights in their dtype, saved activations (with or without activation
checkpointing) and the logits the losses hold at response and visual positions (one chunk at a time
with `loss.chunk_size`; a stage with a teacher cache holds no teacher weights, forward or logits),
and for a stage with `on_policy` the student's generation of its answers (`generation_bytes`). The
sequence is the
worst case: every sample `data.max_length` tokens long with one image, every other token an answer.

`lsd_edge.train.measure.measure_step` runs real steps on random weights and synthetic worst-case
batches, so the estimate can be checked. Both are per process.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import AutoConfig

from lsd_edge.data.prepare import corpus_texts
from lsd_edge.data.shapes import vocabulary
from lsd_edge.errors import LsdEdgeError, ModelError
from lsd_edge.models.bpe import train_bpe
from lsd_edge.models.build import composed_llava_config, student_tower, tiny_llava_config
from lsd_edge.models.info import ModelShape
from lsd_edge.models.load import check_ref, first_line, torch_dtype
from lsd_edge.models.tokens import IMAGE_TOKEN, SPECIAL_TOKENS, image_tokens
from lsd_edge.models.vision import Tower
from lsd_edge.recipe.schema import DISTILL_TERMS, Recipe, StageConfig

GIB = 2**30


@dataclass
class StepMemory:
    """Bytes one process holds at the peak of a step (weights to logits), and the assumptions."""

    stage: str
    kind: str
    batch_size: int
    seq_len: int
    device: str
    checkpointing: bool
    student_weights: int
    gradients: int
    optimizer: int
    teacher_weights: int
    activations: int
    logits: int
    teacher_forward: int
    generation: int = 0  # on-policy: the student writing its answers (between steps; added to be safe)

    @property
    def total(self) -> int:
        return (
            self.student_weights
            + self.gradients
            + self.optimizer
            + self.teacher_weights
            + self.activations
            + self.logits
            + self.teacher_forward
            + self.generation
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def layer_activation_bytes(s: ModelShape, autocast: bool) -> int:
    """Bytes a Qwen2/Llama decoder layer keeps for backward, per token.

    Residual stream and RMSNorm internals stay fp32 (input, normalised value: 2 per norm). Under
    bf16 autocast every linear saves its own bf16 copy of its input (q, k, v: 3 copies of the
    first norm's output; gate, up: 2 of the second's); rotary embedding saves q, k and their
    rotated halves; attention saves q, k, v and its output, and o_proj its (contiguous) input; the
    SwiGLU MLP saves gate, SiLU(gate), up and their product. Attention scores are not kept (flash
    or memory-efficient kernels).
    """
    D, K, F = s.hidden, s.kv_hidden, s.intermediate
    if autocast:
        return 4 * 4 * D + 2 * (10 * D + 4 * K + 4 * F)
    return 4 * (11 * D + 4 * K + 4 * F)


def activation_bytes(s: ModelShape, tokens: int, autocast: bool, checkpointing: bool) -> int:
    """Saved activations of the student's LLM for `tokens` tokens in one micro-batch.

    With checkpointing, each layer keeps its fp32 input and one layer at a time is recomputed.
    Outside the layers: embeddings, final norm and its output (fp32)."""
    per_layer = layer_activation_bytes(s, autocast)
    layers = s.layers * 4 * s.hidden + per_layer if checkpointing else s.layers * per_layer
    return tokens * (layers + 4 * 4 * s.hidden)


def logits_bytes(
    vocab_s: int,
    vocab_t: int,
    n_resp: int,
    n_vis: int,
    e_s: int,
    e_t: int,
    response_kl: bool,
    visual_kl: bool,
) -> int:
    """Bytes of the logits and their fp32 softmax buffers at the peak of `loss_terms`.

    Per response position: the student's logits (e_s), the CE log-softmax (4), and with response KL
    the teacher's logits (e_t), the student's log-softmax and the teacher's probabilities (4 + 4),
    all kept until backward. The peak adds the transient buffers of the last term computed: the
    visual KL's whole set per visual position (both logits, both log-softmaxes, probabilities,
    difference, product), else the response KL's (teacher log-softmax, difference, product), else
    CE's scaled copy.
    """
    held = n_resp * (vocab_s * e_s + vocab_s * 4 + ((vocab_t * e_t + vocab_s * 8) if response_kl else 0))
    resp_peak = n_resp * vocab_s * (12 if response_kl else 4)
    vis_peak = n_vis * (vocab_s * e_s + vocab_t * e_t + vocab_s * 20) if visual_kl else 0
    return held + max(resp_peak, vis_peak)


def chunked_logits_bytes(
    vocab_s: int,
    vocab_t: int,
    hidden_s: int,
    n_resp: int,
    n_vis: int,
    chunk: int,
    e_s: int,
    e_t: int,
    response_kl: bool,
    visual_kl: bool,
    head_trains: bool,
) -> int:
    """Bytes of the chunked logit losses (`loss.chunk_size`): one chunk's logits and softmax buffers
    at a time, plus what each output (CE, response KL, visual KL) keeps until backward: the gradient
    to its hidden states (N, Ds) and, when the lm_head trains, to its weight (Vs, Ds) in fp32."""
    outs = [(n_resp, 1 + response_kl), (n_vis, int(visual_kl))]
    kept = sum(k * (n * hidden_s * e_s + (4 * vocab_s * hidden_s if head_trains else 0)) for n, k in outs)
    rows = min(chunk, max(n_resp, n_vis if visual_kl else 0))
    return kept + rows * (vocab_s * e_s + vocab_t * e_t + vocab_s * 20)


def generation_bytes(s: ModelShape, prompt: int, new_tokens: int) -> int:
    """Bytes on-policy generation holds at its peak. The decode loop writes one answer at a time, so
    that is one sequence's fp32 KV cache over the prompt and `new_tokens` answer tokens (2 x layers x
    kv_hidden per position), and the prefill's working set of one layer over the prompt (residual,
    normed input, MLP: (2 x hidden + 2 x intermediate) fp32 per position). It runs between steps,
    when the step's activations are freed; the estimate adds it to them all the same."""
    return 4 * (2 * s.layers * s.kv_hidden * (prompt + new_tokens) + prompt * 2 * (s.hidden + s.intermediate))


def estimate_step(
    student: ModelShape,
    teacher: ModelShape | None,
    stage: StageConfig,
    *,
    seq_len: int,
    device: str,
    precision: str,
    teacher_dtype: torch.dtype,
    checkpointing: bool,
) -> StepMemory:
    """Peak bytes of one micro-batch of `stage` at `seq_len` tokens per sample (worst case)."""
    autocast = device == "cuda" and precision in ("auto", "bf16")
    e_act = 2 if autocast else 4
    trainable = sum(student.params[g] for g in set(stage.trainable))
    B, T = stage.batch_size, seq_len
    K = min(student.image_tokens, T - 1)
    n_vis, n_resp = B * K, B * (T - K)
    distills = teacher is not None and stage.distills
    cached = distills and stage.cached  # the teacher is released; its targets are read from the cache
    w = {t: stage.loss.weight(t) for t in DISTILL_TERMS}
    t_bytes = torch.finfo(teacher_dtype).bits // 8
    e_t = 2 if autocast else t_bytes
    teacher_fwd = 0
    if cached:
        e_t = 0  # top-k targets: a few bytes per position, no teacher logits
    elif distills:
        hidden_kept = B * T * teacher.hidden * e_t
        if w["latent"] > 0 and any(isinstance(p[0], int) for p in stage.loss.latent_pairs):
            hidden_kept *= teacher.layers + 1
        teacher_fwd = hidden_kept + B * T * (3 * teacher.intermediate + 6 * teacher.hidden) * e_t
    # Gradients reach the projector through the LLM, so its activations are kept whenever anything
    # before the LLM's head trains.
    activations = activation_bytes(student, B * T, autocast, checkpointing) if trainable else 0
    vocab_t = teacher.vocab if teacher is not None else student.vocab
    response_kl = distills and w["response_kl"] > 0
    visual_kl = distills and w["visual_kl"] > 0 and K > 0
    if stage.loss.chunk_size:
        head_trains = "llm" in stage.trainable
        logits = chunked_logits_bytes(
            student.vocab, vocab_t, student.hidden, n_resp, n_vis, stage.loss.chunk_size,
            e_act, e_t, response_kl, visual_kl, head_trains,
        )  # fmt: skip
    else:
        logits = logits_bytes(student.vocab, vocab_t, n_resp, n_vis, e_act, e_t, response_kl, visual_kl)
    op = stage.on_policy
    generation = generation_bytes(student, T, op.max_new_tokens) if op is not None and distills else 0
    return StepMemory(
        stage=stage.name,
        kind=stage.kind,
        batch_size=B,
        seq_len=T,
        device=device,
        checkpointing=checkpointing,
        student_weights=4 * student.params["total"],
        gradients=4 * trainable,
        optimizer=8 * trainable,
        teacher_weights=t_bytes * teacher.params["total"] if teacher is not None and not cached else 0,
        activations=activations,
        logits=logits,
        teacher_forward=teacher_fwd,
        generation=generation,
    )


def _auto_config(ref: str, what: str, trust_remote_code: bool):
    ref = check_ref(ref, what)
    try:
        return AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except Exception as e:  # a config that cannot be read is a bad input, reported in one line
        raise ModelError(f"cannot read the config of {what} '{ref}': {first_line(e)}") from None


def _tiny_vocab(recipe: Recipe) -> int:
    """The tiny models' vocabulary: their tokenizer trained on the data (seconds), or, before
    ShapesVQA is generated, on its words."""
    try:
        texts = corpus_texts(recipe)
    except LsdEdgeError:
        if recipe.data.shapes is None:
            raise
        texts = vocabulary()
    return train_bpe(texts).get_vocab_size()


def recipe_configs(recipe: Recipe):
    """(teacher LlavaConfig, student LlavaConfig) of a recipe, from config files only."""
    t, s = recipe.teacher, recipe.student
    if t.tiny is not None:
        vocab = _tiny_vocab(recipe)
        n_img = (t.tiny.vision.image_size // t.tiny.vision.patch_size) ** 2
        teacher = tiny_llava_config(t.tiny, vocab, SPECIAL_TOKENS.index(IMAGE_TOKEN), n_img)
    else:
        teacher = _auto_config(t.path, "teacher.path", t.trust_remote_code)
    if s.tiny is not None:
        vocab = _tiny_vocab(recipe)
        v = s.tiny.vision
        n_img = image_tokens(teacher) if v == "teacher" else (v.image_size // v.patch_size) ** 2
        student = tiny_llava_config(
            s.tiny, vocab, teacher.image_token_index, n_img, teacher, s.image_size, s.vision_layers
        )
    elif s.llm is not None:
        vision = teacher if s.vision in (None, "teacher") else _auto_config(s.vision, "student.vision", False)
        where = "the teacher's tower" if vision is teacher else f"student.vision '{s.vision}'"
        tower = student_tower(s, Tower.of_config(vision), where)
        text = _auto_config(s.llm, "student.llm", s.trust_remote_code)
        student = composed_llava_config(s, tower, text, teacher.image_token_index)
        if text.vocab_size <= teacher.image_token_index:  # compose_llava grows the embeddings to hold it
            student.text_config.vocab_size = teacher.image_token_index + 1
    else:
        student = _auto_config(s.path, "student.path", s.trust_remote_code)
    return teacher, student


def estimate_device(recipe: Recipe) -> str:
    """The device an estimate is for: a recipe on 'auto' is meant for a GPU box."""
    return "cpu" if recipe.run.device == "cpu" else "cuda"


def recipe_shapes(recipe: Recipe) -> tuple[ModelShape, ModelShape]:
    """(teacher, student) `ModelShape`s of a recipe: parameters per group, visual tokens, sizes."""
    t_cfg, s_cfg = recipe_configs(recipe)
    return ModelShape.of(t_cfg), ModelShape.of(s_cfg)


def estimate_recipe(
    recipe: Recipe,
    *,
    seq_len: int | None = None,
    device: str | None = None,
    shapes: tuple[ModelShape, ModelShape] | None = None,
) -> list[StepMemory]:
    """One `StepMemory` per stage of the recipe, per process (of `shapes`, when read already)."""
    teacher, student = shapes or recipe_shapes(recipe)
    device = device or estimate_device(recipe)
    return [
        estimate_step(
            student,
            teacher,
            st,
            seq_len=seq_len or recipe.data.max_length,
            device=device,
            precision=recipe.run.precision,
            teacher_dtype=torch_dtype(recipe.teacher.dtype, device),
            checkpointing=st.gradient_checkpointing or recipe.student.gradient_checkpointing,
        )
        for st in recipe.stages
    ]
