"""Facts about a model without training it: parameters, sizes, shapes, memory of its weights.

`model_info` describes a saved folder; `ModelShape.of(config)` counts parameters on the meta device
(no weights read), which is what memory estimates and the bench's parameter column use;
`random_model` builds real sizes with random weights for measurements without a download.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, LlavaForConditionalGeneration

from lsd_edge.models.groups import count_params
from lsd_edge.models.load import load_llava
from lsd_edge.models.tokens import image_tokens, num_image_tokens


def dir_size_mb(path: str | Path, pattern: str = "*.safetensors") -> float:
    return sum(f.stat().st_size for f in Path(path).rglob(pattern)) / 2**20


@dataclass(frozen=True)
class Sight:
    """How a LLaVA model sees: its tower's image side and patch, its layers, the hidden state LLaVA
    reads features from, and the visual tokens per image (what the edge-vision choices change)."""

    image_size: int
    patch_size: int
    layers: int
    feature_layer: int
    tokens: int

    @staticmethod
    def of(config) -> Sight:
        v = config.vision_config
        return Sight(
            v.image_size, v.patch_size, v.num_hidden_layers, config.vision_feature_layer, image_tokens(config)
        )

    def describe(self) -> str:
        g = self.image_size // self.patch_size
        return f"{self.image_size} px, patch {self.patch_size} ({g}x{g}), {self.layers} layers read at {self.feature_layer}"


@dataclass
class ModelInfo:
    path: str
    params: dict[str, int]
    size_mb: float
    dtype: str
    vocab_size: int
    tokenizer_size: int
    image_tokens: int
    llm: str
    vision: str
    sight: Sight

    def as_dict(self) -> dict:
        return {**self.__dict__, "sight": asdict(self.sight)}


def model_info(path: str | Path) -> ModelInfo:
    model, processor = load_llava(str(path), what="model")
    cfg = model.config
    dtype = next(model.parameters()).dtype
    saved = (
        json.loads((Path(path) / "config.json").read_text()).get("dtype")
        if Path(path, "config.json").exists()
        else None
    )
    return ModelInfo(
        path=str(path),
        params=count_params(model),
        size_mb=round(dir_size_mb(path), 3),
        dtype=str(saved or dtype).replace("torch.", ""),
        vocab_size=cfg.text_config.vocab_size,
        tokenizer_size=len(processor.tokenizer),
        image_tokens=num_image_tokens(processor),
        llm=cfg.text_config.model_type,
        vision=cfg.vision_config.model_type,
        sight=Sight.of(cfg),
    )


@dataclass(frozen=True)
class ModelShape:
    """What memory estimates need from one LLaVA model: its LLM's sizes and its parameter counts."""

    params: dict[str, int]  # per group (vision, projector, llm) and total, tied weights once
    hidden: int
    kv_hidden: int
    intermediate: int
    layers: int
    vocab: int
    image_tokens: int
    sight: Sight

    @staticmethod
    def of(config) -> ModelShape:
        t = config.text_config
        with torch.device("meta"):
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
            sight=Sight.of(config),
        )


def config_params(folder: str | Path) -> int | None:
    """Parameters of the LLaVA model a folder's config.json describes, counted on the meta device;
    None when this class cannot build that config (an ONNX export of another model family)."""
    try:
        config = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            model = LlavaForConditionalGeneration._from_config(config)
    except Exception:  # a config this class cannot build: the count is shown as unknown
        return None
    return count_params(model)["total"]


def random_model(config, dtype: torch.dtype, device: torch.device, seed: int):
    """A LlavaForConditionalGeneration with random weights, made on `device` (no download, no copy)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    return model


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
