"""Peak memory of one training step: estimated from the recipe's model configs, and measured.

`estimate_recipe(recipe)` reads only the models' `config.json` (a local folder, or a hub id when the
hub is in reach), builds each model on the meta device to count its parameters, and returns one
`StepMemory` per stage: fp32 student weights, fp32 gradients and AdamW states of the trainable
groups, teacher weights in their dtype, saved activations (with or without activation
checkpointing) and the logits the losses hold at response and visual positions (one chunk at a time
with `loss.chunk_size`; a stage with a teacher cache holds no teacher weights, forward or logits). The
sequence is the
worst case: every sample `data.max_length` tokens long with one image, every other token an answer.

`measure_step(...)` runs real steps on random weights and synthetic worst-case batches (profiler
allocation events on CPU, `max_memory_allocated` on CUDA), so the estimate can be checked, and on a
GPU reports step time, tokens/s and MFU. Both are per process.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lsd_edge.config import Recipe, StageConfig
from lsd_edge.errors import LsdEdgeError, ModelError

GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from one LLaVA model: its LLM's sizes and its parameter counts."""

    params: dict[str, int]  # per group (vision, projector, llm) and total, tied weights once
    hidden: int
    kv_hidden: int
    intermediate: int
    layers: int
    vocab: int
    image_tokens: int

    @staticmethod
    def of(config) -> ModelShape:
        from lsd_edge.models import count_params

        t = config.text_config
        with torch.device("meta"):
            from transformers import LlavaForConditionalGeneration

            model = LlavaForConditionalGeneration(config)
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        return ModelShape(
            params=count_params(model),
            hidden=t.hidden_size,
            kv_hidden=(t.num_key_value_heads or t.num_attention_heads) * head_dim,
            intermediate=t.intermediate_size,
            layers=t.num_hidden_layers,
            vocab=t.vocab_size,
            image_tokens=image_tokens(config),
        )


def image_tokens(config) -> int:
    """Visual tokens per image of a LlavaConfig (its processor would expand `<image>` to as many)."""
    v = config.vision_config
    n = (v.image_size // v.patch_size) ** 2
    if v.model_type == "clip_vision_model":
        n += 1  # the CLS token
    if config.vision_feature_select_strategy == "default":
        n -= 1
    return n


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
    from lsd_edge.config import DISTILL_TERMS

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
    )


# --------------------------------------------------------------------------------------- from a recipe


def _auto_config(ref: str, what: str, trust_remote_code: bool):
    from transformers import AutoConfig

    from lsd_edge.models import _check_ref, _first_line

    ref = _check_ref(ref, what)
    try:
        return AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except Exception as e:  # a config that cannot be read is a bad input, reported in one line
        raise ModelError(f"cannot read the config of {what} '{ref}': {_first_line(e)}") from None


def _tiny_vocab(recipe: Recipe) -> int:
    from lsd_edge.models import CHAT_ROLES, SPECIAL_TOKENS

    try:
        from lsd_edge.train import corpus_words

        words = corpus_words(recipe)
    except LsdEdgeError:
        if recipe.data.shapes is None:
            raise
        from lsd_edge.data.shapes import vocabulary

        words = vocabulary()
    return len(SPECIAL_TOKENS) + len(CHAT_ROLES) + len(words)


def recipe_configs(recipe: Recipe):
    """(teacher LlavaConfig, student LlavaConfig) of a recipe, from config files only."""
    from lsd_edge.models import IMAGE_TOKEN, SPECIAL_TOKENS, composed_llava_config, tiny_llava_config

    t, s = recipe.teacher, recipe.student
    if t.tiny is not None:
        vocab = _tiny_vocab(recipe)
        n_img = (t.tiny.vision.image_size // t.tiny.vision.patch_size) ** 2
        teacher = tiny_llava_config(t.tiny, vocab, SPECIAL_TOKENS.index(IMAGE_TOKEN), n_img)
    else:
        teacher = _auto_config(t.path, "teacher.path", t.trust_remote_code)
    if s.tiny is not None:
        vocab = _tiny_vocab(recipe)
        student = tiny_llava_config(s.tiny, vocab, teacher.image_token_index, image_tokens(teacher), teacher)
    elif s.llm is not None:
        vision = teacher if s.vision in (None, "teacher") else _auto_config(s.vision, "student.vision", False)
        text = _auto_config(s.llm, "student.llm", s.trust_remote_code)
        student = composed_llava_config(s, vision, text, teacher.image_token_index, image_tokens(vision))
        if text.vocab_size <= teacher.image_token_index:  # compose_llava grows the embeddings to hold it
            student.text_config.vocab_size = teacher.image_token_index + 1
    else:
        student = _auto_config(s.path, "student.path", s.trust_remote_code)
    return teacher, student


def estimate_device(recipe: Recipe) -> str:
    """The device an estimate is for: a recipe on 'auto' is meant for a GPU box."""
    return "cpu" if recipe.run.device == "cpu" else "cuda"


def estimate_recipe(
    recipe: Recipe, *, seq_len: int | None = None, device: str | None = None
) -> list[StepMemory]:
    """One `StepMemory` per stage of the recipe, per process."""
    from lsd_edge.models import torch_dtype

    t_cfg, s_cfg = recipe_configs(recipe)
    teacher, student = ModelShape.of(t_cfg), ModelShape.of(s_cfg)
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


# ------------------------------------------------------------------------------------------ measured


@dataclass
class StepMeasurement:
    """One optimizer step measured on random weights (after warm-up steps)."""

    stage: str
    device: str
    peak_bytes: int
    step_seconds: float
    tokens_per_s: float
    tflops: float  # model FLOPs per second achieved (estimated FLOPs / step time)
    mfu: float | None  # tflops / the device's peak bf16 dense TFLOPS, when known

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Peak dense bf16 TFLOPS by device name (no sparsity), for MFU; others need --peak-tflops.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def random_model(config, dtype: torch.dtype, device: torch.device, seed: int):
    """A LlavaForConditionalGeneration with random weights, made on `device` (no download, no copy)."""
    from transformers import LlavaForConditionalGeneration

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    return model


def synthetic_batch(config, batch_size: int, seq_len: int, vocab_rows: int, device, seed: int = 0):
    """The estimate's worst case as a batch: `seq_len` tokens per sample, one image first, every
    other token an answer token."""
    from lsd_edge.data.llava import IGNORE_INDEX, Batch

    g = torch.Generator().manual_seed(seed)
    K = min(image_tokens(config), seq_len - 1)
    img = config.image_token_index
    ids = torch.randint(0, vocab_rows, (batch_size, seq_len), generator=g)
    ids[ids == img] = (img + 1) % vocab_rows
    ids[:, :K] = img
    labels = ids.clone()
    labels[:, :K] = IGNORE_INDEX
    v = config.vision_config
    pixels = torch.randn(batch_size, 3, v.image_size, v.image_size, generator=g)
    return Batch(
        [f"synthetic-{i}" for i in range(batch_size)],
        ids,
        torch.ones_like(ids),
        labels,
        pixels,
        ids == img,
    ).to(device)


def live_bytes(*objs) -> int:
    """Bytes of the distinct tensor storages held by modules, optimizers and tensors."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()

    for obj in objs:
        if obj is None:
            continue
        if isinstance(obj, torch.nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                add(t)
                add(t.grad)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for t in state.values():
                    add(t)
        else:
            add(obj)
    return sum(seen.values())


def _cpu_peak(fn) -> int:
    """Highest bytes allocated above the starting point while `fn` runs (CPU allocator events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def step_flops(
    student: ModelShape, teacher: ModelShape | None, stage: StageConfig, tokens: int, seq_len: int
) -> float:
    """Model FLOPs of one step (PaLM's count: 2N per token forward, twice that backward, plus
    attention 4*L*D*T per token forward); the frozen LLM of a projector-only stage still computes
    activation gradients (no weight gradients)."""
    n = student.params["llm"]
    attn = 4 * student.layers * student.hidden * seq_len
    bwd = 2.0 if "llm" in stage.trainable else 1.0
    flops = tokens * (2 * n + attn) * (1 + bwd)
    if teacher is not None and stage.distills:
        flops += tokens * (2 * teacher.params["llm"] + 4 * teacher.layers * teacher.hidden * seq_len)
    return float(flops)


def measure_step(
    recipe: Recipe,
    stage: StageConfig,
    *,
    device: torch.device,
    seq_len: int | None = None,
    steps: int = 2,
    peak_tflops: float | None = None,
) -> StepMeasurement:
    """Run `steps` (at least 2) optimizer steps of `stage` on random-weight models built from the
    recipe's configs and synthetic worst-case batches; the last one is measured (earlier ones warm
    up, make the optimizer states and, with torch.compile, compile). On CPU the last step is timed
    and one more runs under the profiler, whose bookkeeping would distort the time."""
    from lsd_edge.models import compile_layers, set_activation_checkpointing, set_trainable, torch_dtype
    from lsd_edge.train import Counts, LatentProjector, autocast, loss_terms, weighted_total

    t_cfg, s_cfg = recipe_configs(recipe)
    T = seq_len or recipe.data.max_length
    teacher = random_model(t_cfg, torch_dtype(recipe.teacher.dtype, device), device, seed=0)
    teacher.requires_grad_(False).eval()
    student = random_model(s_cfg, torch.float32, device, seed=1)
    if recipe.run.compile:
        compile_layers(student)
    set_trainable(student, stage.trainable)
    student.train()
    if stage.gradient_checkpointing or recipe.student.gradient_checkpointing:
        set_activation_checkpointing(student, True)
    latent = None
    if stage.distills and stage.loss.weight("latent") > 0:
        latent = LatentProjector(
            stage.loss.latent_pairs, s_cfg.text_config.hidden_size, t_cfg.text_config.hidden_size
        )
        latent = latent.to(device)
    params = [p for p in student.parameters() if p.requires_grad] + (
        list(latent.parameters()) if latent else []
    )
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    vocab_rows = min(s_cfg.text_config.vocab_size, t_cfg.text_config.vocab_size)
    batches = [
        synthetic_batch(s_cfg, stage.batch_size, T, vocab_rows, device, seed=k)
        for k in range(stage.grad_accum)
    ]
    counts = Counts.of(batches, image_tokens(s_cfg))

    def step():
        for b in batches:
            with autocast(device, recipe.run.precision):
                terms = loss_terms(student, teacher, b, stage, counts, vocab_rows, latent)
            weighted_total(terms, stage, 1.0).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(max(1, steps - 1)):  # at least one: AdamW makes its states in the first step
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device)
    else:
        t0 = time.perf_counter()
        step()
        seconds = time.perf_counter() - t0
        start = live_bytes(student, teacher, optimizer, latent)
        peak = start + _cpu_peak(step)
    tokens = counts.tokens
    tflops = step_flops(ModelShape.of(s_cfg), ModelShape.of(t_cfg), stage, tokens, T) / seconds / 1e12
    peak_tflops = peak_tflops or device_peak_tflops(device)
    return StepMeasurement(
        stage=stage.name,
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        peak_bytes=int(peak),
        step_seconds=seconds,
        tokens_per_s=tokens / seconds,
        tflops=tflops,
        mfu=tflops / peak_tflops if peak_tflops else None,
    )
