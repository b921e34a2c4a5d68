"""Peak memory, time and MFU of real training steps on random weights at a recipe's sizes.

`measure_step(recipe, stage)` runs optimizer steps of a stage with random-weight models built from
the recipe's configs and synthetic worst-case batches (every sample `data.max_length` tokens, one
image, every other token an answer), so `lsd_edge.train.memory`'s estimate can be checked: peak
bytes from profiler allocation events on CPU, `max_memory_allocated` on CUDA; step time, tokens/s
and, on a GPU, MFU.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from lsd_edge.data.batch import Batch
from lsd_edge.distill.objective import Counts
from lsd_edge.distill.teacher import OnlineTeacher
from lsd_edge.models.groups import compile_layers
from lsd_edge.models.info import ModelShape, live_bytes, random_model
from lsd_edge.models.load import torch_dtype
from lsd_edge.models.tokens import IGNORE_INDEX, image_tokens
from lsd_edge.recipe.schema import Recipe, StageConfig
from lsd_edge.train.backends.base import Backend, pad_batch, raw_optimizer
from lsd_edge.train.memory import recipe_configs
from lsd_edge.train.step import Stepper, prepare_student
from lsd_edge.train.track import device_peak_tflops, step_flops


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


def synthetic_batch(config, batch_size: int, seq_len: int, vocab_rows: int, device, seed: int = 0):
    """The estimate's worst case as a batch: `seq_len` tokens per sample, one image first, every
    other token an answer token."""
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


def _cpu_peak(fn) -> int:
    """Highest bytes allocated above the starting point while `fn` runs (CPU allocator events)."""
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


def timed_peak(step, device: torch.device, held: tuple) -> tuple[float, int]:
    """One `step()` timed, and the peak bytes of one step: on CUDA the allocator's peak; on CPU the
    bytes `held` (models, optimizer) plus the allocator events of one more step under the profiler
    (whose bookkeeping would distort the time)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize(device)
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated(device)
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    return seconds, live_bytes(*held) + _cpu_peak(step)


def measure_step(
    recipe: Recipe,
    stage: StageConfig,
    *,
    device: torch.device,
    seq_len: int | None = None,
    steps: int = 2,
    peak_tflops: float | None = None,
    backend: Backend | None = None,
) -> StepMeasurement:
    """Run `steps` (at least 2) optimizer steps of `stage` on random-weight models built from the
    recipe's configs and synthetic worst-case batches; the last one is measured (earlier ones warm
    up, make the optimizer states and, with torch.compile, compile). The student is prepared and
    stepped as training does it (`lsd_edge.train.step`), by `backend` (the launch's: one process,
    DDP, FSDP2 or ZeRO; by default one process); each process runs its share of the step's
    micro-batches. On CPU the last step is timed and one more runs under the profiler, whose
    bookkeeping would distort the time."""
    backend = backend or Backend()
    t_cfg, s_cfg = recipe_configs(recipe)
    T = seq_len or recipe.data.max_length
    teacher = random_model(t_cfg, torch_dtype(recipe.teacher.dtype, device), device, seed=0)
    teacher.requires_grad_(False).eval()
    backend.shard_teacher(teacher)
    online = OnlineTeacher(teacher) if stage.distills else None
    student = random_model(s_cfg, torch.float32, device, seed=1)
    if recipe.run.compile:
        compile_layers(student)
    checkpointing = stage.gradient_checkpointing or recipe.student.gradient_checkpointing
    prepared = prepare_student(
        backend,
        student,
        online,
        stage,
        steps=steps + 1,
        seed=0,
        device=device,
        precision=recipe.run.precision,
        checkpointing=checkpointing,
    )
    vocab_rows = min(s_cfg.text_config.vocab_size, t_cfg.text_config.vocab_size)
    batches = [
        synthetic_batch(s_cfg, stage.batch_size, T, vocab_rows, device, seed=k)
        for k in range(stage.grad_accum)
    ]
    counts = Counts.of(batches, image_tokens(s_cfg))  # the whole step's, over every process
    mine = [None if k is None else batches[k] for k in backend.dist.micro_batches(stage.grad_accum)]
    pad = pad_batch(0, device)
    stepper = Stepper(backend, prepared, stage, online, vocab_rows, pad, device, recipe.run.precision)

    def step():
        stepper.accumulate(mine, counts, 1.0)
        stepper.update()

    for _ in range(max(1, steps - 1)):  # at least one: AdamW makes its states in the first step
        step()
    held = (student, teacher, raw_optimizer(prepared.optimizer), prepared.step.latent)
    seconds, peak = timed_peak(step, device, held)
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
