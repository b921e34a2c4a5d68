"""The typed recipe: frozen pydantic models that refuse unknown keys.

Defaults that depend on a stage's kind (which losses, which module groups train) are filled here,
from METHOD.md, so the rest of the code reads one resolved recipe. Reading TOML, `--set` overrides
and the checks that involve several sections are `lsd_edge.recipe.load`'s.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from lsd_edge.recipe.data import DataConfig
from lsd_edge.recipe.deploy import BenchConfig, EvalConfig, ExportConfig
from lsd_edge.recipe.distill import DistillSchedule, LossConfig, OnPolicyConfig
from lsd_edge.recipe.toml import dumps_toml
from lsd_edge.recipe.types import NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Strict

StageKind = Literal["pt", "dpt", "sft", "dft"]
Group = Literal["vision", "projector", "llm"]

DISTILLING_KINDS = ("dpt", "dft")
# METHOD.md: LLaVA-KD trains the projector alone in (D)PT and projector + LLM in SFT/DFT.
DEFAULT_TRAINABLE: dict[str, list[str]] = {
    "pt": ["projector"],
    "dpt": ["projector"],
    "sft": ["projector", "llm"],
    "dft": ["projector", "llm"],
}
# METHOD.md: L = L_reg + alpha*L_res + beta*L_vis + gamma*L_rel, alpha, beta, gamma = 1.0, 1.0, 0.5;
# latent alignment and the vision-tower feature term ("edge vision") are off unless asked for.
DEFAULT_DISTILL_WEIGHTS = {
    "response_kl": 1.0,
    "visual_kl": 1.0,
    "relation": 0.5,
    "latent": 0.0,
    "vision": 0.0,
}
DISTILL_TERMS = tuple(DEFAULT_DISTILL_WEIGHTS)
# Terms added after runs were made: left unset (weight 0) unless a recipe gives them, so the identity
# of a teacher or stage made before them still holds.
UNSET_UNLESS_GIVEN = ("vision",)


class RunConfig(Strict):
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bf16 autocast on CUDA; CPU always trains in fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # The progress bar's loss figures refresh every N steps; log.jsonl holds every step.
    log_every: PositiveInt = 10
    checkpoint_every: NonNegInt = 50
    # Threads of the whole run on this machine, shared among its processes (0 = one per core).
    num_threads: NonNegInt = 0
    # Experiment trackers (Accelerate's), written offline under <output_dir>/trackers; off by default.
    report_to: list[Literal["tensorboard", "trackio", "wandb"]] = []
    # torch.compile the student's decoder layers (worth it on CUDA; the first steps compile).
    compile: bool = False


class StageConfig(Strict):
    name: str
    kind: StageKind
    data: Literal["pretrain", "instruct"] | None = None
    trainable: list[Group] | None = None
    lr: PositiveFloat = 1e-4
    # Learning-rate multipliers per model group, e.g. {vision = 4.0}: a group not named trains at lr.
    lr_scale: dict[Group, PositiveFloat] = {}
    weight_decay: NonNegFloat = 0.0
    warmup_steps: NonNegInt = 0
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0
    epochs: PositiveFloat | None = None
    max_steps: PositiveInt | None = None
    batch_size: PositiveInt = 8
    grad_accum: PositiveInt = 1
    max_grad_norm: NonNegFloat = 1.0
    max_samples: PositiveInt | None = None
    # Keep only the first N question/answer turns of each conversation: the same images with fewer
    # labelled answers.
    max_turns: PositiveInt | None = None
    loss: LossConfig = LossConfig()
    distill_schedule: DistillSchedule = DistillSchedule()
    gradient_checkpointing: bool = False
    # Distil from a top-k teacher cache instead of running the teacher: "off" (online teacher), "auto"
    # (<output_dir>/teacher-cache/<stage>, made on first use) or the folder of a cache made by
    # `lsd-edge cache-teacher`. A stage with a cache trains with no teacher in memory.
    teacher_cache: str = "off"
    teacher_cache_top_k: PositiveInt = 64
    # Train on the teacher's own answers to the stage's questions (LLaVADI): written once to
    # <output_dir>/regenerated/<stage>/ by greedy decoding, then used instead of the reference answers.
    regenerate: bool = False
    regenerate_max_new_tokens: PositiveInt = 64
    # On-policy distillation (a distilling stage with an online teacher): see OnPolicyConfig. It
    # combines with `regenerate`: the other micro-batches then train on the teacher's answers.
    on_policy: OnPolicyConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _kind_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("kind") not in DEFAULT_TRAINABLE:
            return data
        data = dict(data)
        kind = data["kind"]
        data.setdefault("data", "pretrain" if kind in ("pt", "dpt") else "instruct")
        data.setdefault("trainable", list(DEFAULT_TRAINABLE[kind]))
        loss = data.get("loss", {})
        if isinstance(loss, dict):
            loss = dict(loss)
            for term, default in DEFAULT_DISTILL_WEIGHTS.items():
                if term not in UNSET_UNLESS_GIVEN:
                    loss.setdefault(term, default if kind in DISTILLING_KINDS else 0.0)
            data["loss"] = loss
        return data

    @model_validator(mode="after")
    def _check(self) -> StageConfig:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("give either epochs or max_steps")
        if not self.trainable:
            raise ValueError("trainable: name at least one of vision, projector, llm")
        if self.kind not in DISTILLING_KINDS:
            used = [t for t in DISTILL_TERMS if self.loss.weight(t) > 0]
            if used:
                raise ValueError(
                    f"loss.{used[0]}: a '{self.kind}' stage does no distillation; "
                    f"use kind = 'd{self.kind}' or set the weight to 0"
                )
        elif self.loss.ce == 0 and all(self.loss.weight(t) == 0 for t in DISTILL_TERMS):
            raise ValueError("loss: every weight is 0, so the stage would learn nothing")
        if not self.teacher_cache.strip():
            raise ValueError("teacher_cache: give 'off', 'auto' or the folder of a teacher cache")
        if self.loss.weight("vision") > 0 and "vision" not in self.trainable:
            raise ValueError(
                "loss.vision: the vision-tower term trains the student's tower, which this stage keeps "
                "frozen; add 'vision' to trainable or set loss.vision = 0"
            )
        if self.on_policy is not None:
            self._check_on_policy()
        if self.cached:
            if self.kind not in DISTILLING_KINDS:
                raise ValueError(
                    f"teacher_cache: a '{self.kind}' stage does not use the teacher; remove it or set 'off'"
                )
            layers = [p for p in self.loss.latent_pairs if p[0] != "projector"]
            if self.loss.weight("latent") > 0 and layers:
                raise ValueError(
                    f"loss.latent_pairs: a teacher cache stores projector features only, not layer {layers[0]}; "
                    "keep ['projector', 'projector'] pairs, set loss.latent = 0, or teacher_cache = 'off'"
                )
        return self

    def _check_on_policy(self) -> None:
        if self.kind not in DISTILLING_KINDS:
            raise ValueError(
                f"on_policy: a '{self.kind}' stage has no teacher to score the student's answers; "
                f"use kind = 'd{self.kind}' or remove on_policy"
            )
        if self.loss.weight("response_kl") == 0:
            raise ValueError(
                "on_policy: loss.response_kl is 0, so nothing would learn from the student's answers; "
                "give it a weight or remove on_policy"
            )
        if self.cached:
            raise ValueError(
                "on_policy: a teacher cache cannot hold targets for answers not yet written; "
                "set teacher_cache = 'off' or remove on_policy"
            )

    @property
    def cached(self) -> bool:
        return self.teacher_cache != "off"

    def one_tokenization(self, cached: bool | None = None) -> str | None:
        """What of this stage needs teacher and student to read one token sequence, in words, or None:
        a teacher cache (`cached`, default the stage's own: keyed by the student's positions) or a
        layer latent pair (text positions one to one). Refused for a student with another tokenizer."""
        if self.cached if cached is None else cached:
            return (
                "a teacher cache (keyed by the student's token positions) cannot serve it; set "
                "teacher_cache = 'off' (the online teacher reads each sample in its own tokens)"
            )
        layers = [p for p in self.loss.latent_pairs if p != ("projector", "projector")]
        if self.loss.weight("latent") > 0 and layers:
            return (
                f"text positions do not pair one to one and loss.latent_pairs {list(layers[0])} cannot "
                "align layers; keep only ['projector', 'projector'] pairs or set loss.latent = 0"
            )
        return None

    @property
    def distills(self) -> bool:
        return self.kind in DISTILLING_KINDS and any(self.loss.weight(t) > 0 for t in DISTILL_TERMS)


class VisionSize(Strict):
    hidden_size: PositiveInt = 64
    num_layers: PositiveInt = 2
    num_heads: PositiveInt = 4
    intermediate_size: PositiveInt = 128
    patch_size: PositiveInt = 8
    image_size: PositiveInt = 48

    @model_validator(mode="after")
    def _check(self) -> VisionSize:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )
        return self


class TinyConfig(Strict):
    """Sizes of a tiny LLaVA built from configs (SigLIP vision + Qwen2 text) for the embedded default."""

    hidden_size: PositiveInt = 64
    num_layers: PositiveInt = 2
    num_heads: PositiveInt = 4
    num_kv_heads: PositiveInt = 2
    intermediate_size: PositiveInt = 192
    tie_word_embeddings: bool = True
    # Extra embedding rows past the tokenizer's vocabulary, as real checkpoints have.
    pad_vocab_to_multiple_of: PositiveInt = 1
    vision: VisionSize | Literal["teacher"] = VisionSize()

    @model_validator(mode="after")
    def _check(self) -> TinyConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        return self


class ModelConfig(Strict):
    """One of: `path` (a hub id or a directory of a LlavaForConditionalGeneration), `llm` (composed
    from parts: the vision encoder `vision`, an LLM, a fresh projector), or `tiny` (built from sizes)."""

    path: str | None = None
    vision: str | None = None
    llm: str | None = None
    projector: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    vision_feature_layer: int | None = None
    vision_feature_select_strategy: Literal["default", "full"] | None = None
    tiny: TinyConfig | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        given = [k for k in ("path", "llm", "tiny") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of path (a LLaVA model), llm (compose from parts) or [tiny] (sizes); "
                f"got {', '.join(given) or 'none'}"
            )
        if self.path is not None and self.vision is not None:
            raise ValueError("vision: only used with llm (composing a model from parts)")
        return self


class TeacherConfig(ModelConfig):
    # The embedded default trains its teacher first with these stages and caches it.
    stages: list[StageConfig] = []


class StudentConfig(ModelConfig):
    # Edge vision (METHOD.md, lsd_edge.models.vision): the tower at this image side in px, and cut
    # to its first N layers; None keeps it as it is.
    image_size: PositiveInt | None = None
    vision_layers: PositiveInt | None = None
    # A tiny student's own tokenizer, trained on the recipe's text (lsd_edge.models.bpe): "word"
    # (word-level) or "bpe" (byte-level BPE of at most tokenizer_vocab tokens: at the default 512 a
    # tiny teacher's own); None: the teacher's. A vocabulary other than the teacher's is distilled
    # across the two (loss.cross_tokenizer).
    tokenizer: Literal["word", "bpe"] | None = None
    tokenizer_vocab: Annotated[int, Field(ge=300)] | None = None

    @model_validator(mode="after")
    def _own_tokenizer(self) -> StudentConfig:
        if self.tokenizer is not None and self.tiny is None:
            raise ValueError(
                "tokenizer: only a tiny student trains a tokenizer of its own; a student.path model "
                "brings its own processor (a different one is distilled across tokenizers)"
            )
        if self.tokenizer_vocab is not None and self.tokenizer != "bpe":
            raise ValueError(
                "tokenizer_vocab: the size of a BPE tokenizer; set tokenizer = 'bpe' or remove it"
            )
        return self


class Recipe(Strict):
    run: RunConfig = RunConfig()
    teacher: TeacherConfig
    student: StudentConfig
    data: DataConfig
    stages: Annotated[list[StageConfig], Field(min_length=1)]
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    bench: BenchConfig = BenchConfig()

    @field_validator("stages")
    @classmethod
    def _unique_names(cls, stages: list[StageConfig]) -> list[StageConfig]:
        seen: set[str] = set()
        for s in stages:
            if s.name in seen:
                raise ValueError(f"stage name '{s.name}' is used twice; names become checkpoint folders")
            if s.name in ("teacher", "student", "data") or not re.fullmatch(r"[A-Za-z0-9_.-]+", s.name):
                raise ValueError(
                    f"stage name '{s.name}' cannot be a folder name here; use letters, digits, - _ ."
                )
            seen.add(s.name)
        return stages

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir)

    def to_toml(self) -> str:
        return dumps_toml(self.model_dump(mode="json", exclude_none=True))
