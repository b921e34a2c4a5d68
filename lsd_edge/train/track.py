"""What a run sends to the experiment trackers of `run.report_to` (TensorBoard, Trackio, W&B, all
through Accelerate's trackers, offline: TensorBoard and W&B under `<output_dir>/trackers`, Trackio
in its own database, TRACKIO_DIR): per step the loss terms, lambda, lr, tokens/s and, on CUDA, the
model FLOPs utilisation (from `step_flops`, the one FLOP count, which `lsd-edge memory --measure`
uses too); per stage the eval accuracy. Rank 0 writes (Accelerate's `log` does nothing on the
other processes). `accelerator` is the run's (`Backend.accelerator`; None for a stage run alone).
"""

from __future__ import annotations

from typing import Any

import torch

from lsd_edge.models.info import ModelShape
from lsd_edge.recipe.schema import Recipe, StageConfig

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, by a name part
# of torch.cuda.get_device_name; a GPU not listed gets no MFU figure rather than a guessed one
# (`lsd-edge memory --measure` takes --peak-tflops for it).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}
LOGGED = (
    "loss",
    "ce",
    "response_kl",
    "visual_kl",
    "relation",
    "latent",
    "vision",
    "lambda",
    "lr",
    "tokens_per_s",
)


def step_flops(
    student: ModelShape, teacher: ModelShape | None, stage: StageConfig, tokens: int, seq_len: float
) -> float:
    """Model FLOPs of one step of `tokens` tokens in sequences of `seq_len` (PaLM's count: 2N per
    token forward, twice that backward, plus attention 4*L*D*T per token forward); the frozen LLM of
    a projector-only stage still computes activation gradients (no weight gradients). An online
    teacher (`teacher`; None for a cache) adds its forward in a distilling stage."""
    n = student.params["llm"]
    attn = 4 * student.layers * student.hidden * seq_len
    bwd = 2.0 if "llm" in stage.trainable else 1.0
    flops = tokens * (2 * n + attn) * (1 + bwd)
    if teacher is not None and stage.distills:
        flops += tokens * (2 * teacher.params["llm"] + 4 * teacher.layers * teacher.hidden * seq_len)
    return float(flops)


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def mfu(flops_per_s: float, device: torch.device, processes: int) -> float | None:
    """Model FLOPs utilisation of the run's GPUs (None off CUDA or on an unlisted GPU)."""
    peak = device_peak_tflops(device)
    if peak is None or not flops_per_s:
        return None
    return flops_per_s / (peak * 1e12 * processes)


def flat_config(recipe: Recipe) -> dict[str, Any]:
    """The recipe as `section.key` scalars (what every tracker's hyperparameter table takes)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, bool | int | float | str):
            out[prefix] = value
        else:
            out[prefix] = str(value)

    walk("", {k: v for k, v in recipe.model_dump(mode="json").items() if k in ("run", "student", "data")})
    return out


def start(accelerator, recipe: Recipe) -> None:
    if accelerator is not None and recipe.run.report_to:
        # wandb writes its offline run under the trackers folder; trackio keeps its own database
        # (TRACKIO_DIR, by default ~/.cache/huggingface/trackio), one project per run name
        folder = accelerator.project_dir
        kwargs = {"tensorboard": {"flush_secs": 5}, "wandb": {"dir": folder}}
        accelerator.init_trackers(recipe.run.name, config=flat_config(recipe), init_kwargs=kwargs)


def log_step(accelerator, rec: dict[str, Any], mfu_value: float | None) -> None:
    if accelerator is None or not accelerator.trackers:
        return
    values = {f"{rec['stage']}/{k}": float(rec[k]) for k in LOGGED if k in rec}
    if mfu_value is not None:
        values[f"{rec['stage']}/mfu"] = mfu_value
    accelerator.log(values, step=rec["step"])


def log_eval(accelerator, stage: str, metrics: dict[str, Any], step: int) -> None:
    if accelerator is None or not accelerator.trackers or "accuracy" not in metrics:
        return
    accelerator.log({f"eval/{stage}/accuracy": float(metrics["accuracy"])}, step=step)


def finish(accelerator) -> None:
    if accelerator is not None and accelerator.trackers:
        accelerator.end_training()
