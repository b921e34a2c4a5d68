"""Load and save LLaVA model folders: a hub id or a local folder in, an HF folder plus processor out.

A bad folder (missing, no config.json, unreadable weights) is a `ModelError` naming it and what to
do, never a traceback. `save_checkpoint` writes lsd-edge's self-describing checkpoint: the HF folder,
the recipe that made it and its metrics (written last, so a folder with metrics.json is complete).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import accelerate.utils.other as accelerate_other
import torch
from huggingface_hub import snapshot_download
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from lsd_edge.errors import ModelError
from lsd_edge.files import atomic_dir, write_json
from lsd_edge.models.tokens import image_tokens, num_image_tokens, stop_token_ids
from lsd_edge.workspace import DONE, RECIPE_FILE


def torch_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """A recipe's dtype name on a device: 'auto' is bf16 on CUDA (any index), fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, name)


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def check_ref(ref: str, what: str) -> str:
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
    ref = check_ref(ref, what)
    if Path(ref).is_dir():
        return Path(ref)
    try:
        return Path(snapshot_download(ref, local_files_only=True))
    except Exception as e:  # not downloaded, or a broken cache: the user can point at a folder
        raise ModelError(
            f"{what} '{ref}': not in the local Hugging Face cache ({first_line(e)}); give a local folder"
        ) from None


def load_tokenizer(ref: str, what: str, trust_remote_code: bool = False):
    """The tokenizer of a folder or a hub id in the local cache; a one-line error naming `what` otherwise."""
    ref = check_ref(ref, what)
    try:
        return AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except Exception as e:  # any failure to read a user's folder is a bad input, not a crash
        raise ModelError(
            f"cannot load the tokenizer of {what} '{ref}': {first_line(e)}; give a local folder"
        ) from None


def load_llava(
    ref: str, *, what: str = "model", dtype: str = "auto", device: str = "cpu", trust_remote_code=False
):
    """Load a LlavaForConditionalGeneration and its processor from a hub id or a folder."""
    ref = check_ref(ref, what)
    try:
        processor = AutoProcessor.from_pretrained(ref, trust_remote_code=trust_remote_code)
        model = LlavaForConditionalGeneration.from_pretrained(
            ref, dtype=torch_dtype(dtype, device), use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except Exception as e:  # any failure to read a user's folder is a bad input, not a crash
        raise ModelError(
            f"cannot load {what} '{ref}': {first_line(e)}; give a local folder with safetensors weights "
            "(hub downloads need network access)"
        ) from None
    if not hasattr(processor, "image_processor"):
        raise ModelError(f"{what} '{ref}' has no image processor; a LLaVA folder needs processor files")
    check_image_tokens(model.config, processor, f"{what} '{ref}'")
    if model.generation_config.eos_token_id is None:
        set_generation_config(model, processor)
    return model.to(device), processor


def check_image_tokens(config, processor, what: str) -> None:
    """The processor must expand `<image>` to as many tokens as the vision tower gives per image, or
    every sample with an image would fail in the forward pass (CLIP and SigLIP towers are checked)."""
    v = config.vision_config
    if v.model_type not in ("clip_vision_model", "siglip_vision_model"):
        return
    tower, expanded = image_tokens(config), num_image_tokens(processor)
    if tower != expanded:
        raise ModelError(
            f"{what}: its processor expands <image> to {expanded} visual tokens but its vision tower gives "
            f"{tower} ({v.image_size} px, patch {v.patch_size}); the processor files are not this model's"
        )


def set_generation_config(model, processor) -> None:
    """Stop, pad and BOS ids of the model's generation config, from its processor."""
    gc = model.generation_config
    tok = processor.tokenizer
    gc.eos_token_id = stop_token_ids(processor)
    gc.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else gc.eos_token_id[0]
    gc.bos_token_id = tok.bos_token_id


def resolve_device(choice: str, what: str = "run.device") -> torch.device:
    """`auto` (CUDA when present), `cpu` or `cuda`; asking for CUDA where there is none is an error
    naming the setting (`what`) it came from."""
    if choice not in ("auto", "cpu", "cuda"):
        raise ModelError(f"{what} {choice}: choose auto, cpu or cuda")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"{what} = 'cuda' but CUDA is not available here; use 'auto' or 'cpu'")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


@contextmanager
def no_deepspeed_probe():
    """transformers' `save_pretrained` unwraps the model through Accelerate, which imports DeepSpeed
    (where it is installed) only to test whether the model is its engine; DeepSpeed's import then
    announces its accelerator on every CPU run. lsd-edge saves plain models only (a ZeRO-trained
    student is rebuilt whole first), so a process that has not imported DeepSpeed (no DeepSpeed
    launch) saves without it; under a DeepSpeed launch nothing changes."""
    if "deepspeed" in sys.modules:
        yield
        return
    real = accelerate_other.is_deepspeed_available
    accelerate_other.is_deepspeed_available = lambda: False
    try:
        yield
    finally:
        accelerate_other.is_deepspeed_available = real


def save_model(model, processor, out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with no_deepspeed_probe():
        model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)


def save_checkpoint(
    folder: str | Path, model, processor, recipe_toml: str, metrics: dict[str, Any], extra=None
) -> None:
    """An HF folder + recipe.toml + metrics.json (+ extra JSON files), atomically; metrics.json last."""
    with atomic_dir(folder) as tmp:
        save_model(model, processor, tmp)
        (tmp / RECIPE_FILE).write_text(recipe_toml, encoding="utf-8")
        for name, data in (extra or {}).items():
            write_json(tmp / name, data)
        write_json(tmp / DONE, metrics)
