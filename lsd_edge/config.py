"""The typed recipe: TOML read with `tomllib`, validated into frozen pydantic models.

`load_recipe(path, overrides)` reports every problem at once, each under the TOML key path the
user wrote (`stages[2].lr`), and refuses unknown keys so that a typo never passes silently.
Defaults that depend on a stage's kind (which losses, which module groups train) are filled here,
from METHOD.md, so the rest of the code reads one resolved recipe.
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lsd_edge.errors import RecipeError

StageKind = Literal["pt", "dpt", "sft", "dft"]
Group = Literal["vision", "projector", "llm"]
KLKind = Literal["forward", "reverse", "jsd", "skew"]

DISTILLING_KINDS = ("dpt", "dft")
# METHOD.md: LLaVA-KD trains the projector alone in (D)PT and projector + LLM in SFT/DFT.
DEFAULT_TRAINABLE: dict[str, list[str]] = {
    "pt": ["projector"],
    "dpt": ["projector"],
    "sft": ["projector", "llm"],
    "dft": ["projector", "llm"],
}
# METHOD.md: L = L_reg + alpha*L_res + beta*L_vis + gamma*L_rel, alpha, beta, gamma = 1.0, 1.0, 0.5.
DEFAULT_DISTILL_WEIGHTS = {"response_kl": 1.0, "visual_kl": 1.0, "relation": 0.5, "latent": 0.0}
DISTILL_TERMS = tuple(DEFAULT_DISTILL_WEIGHTS)

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(Strict):
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bf16 autocast on CUDA; CPU always trains in fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    log_every: PositiveInt = 10
    checkpoint_every: NonNegInt = 50
    num_threads: NonNegInt = 0
    # torch.compile the student's decoder layers (worth it on CUDA; the first steps compile).
    compile: bool = False


class ShapesConfig(Strict):
    """Generate ShapesVQA into the data root when its files are missing."""

    seed: int = 0
    n_train: PositiveInt = 2000
    n_eval: PositiveInt = 300
    image_size: Annotated[int, Field(ge=16, le=1024)] = 48
    questions_per_image: Annotated[int, Field(ge=1, le=10)] = 4
    # Largest offset of a shape from its cell's centre, in pixels (lsd_edge.data.shapes.JITTER).
    jitter: Annotated[int, Field(ge=0, le=64)] = 1


class DatasetConfig(Strict):
    path: str
    images: str | None = None


class DataConfig(Strict):
    root: str = "."
    shapes: ShapesConfig | None = None
    pretrain: DatasetConfig | None = None
    instruct: DatasetConfig | None = None
    eval: DatasetConfig | None = None
    max_length: Annotated[int, Field(ge=8)] = 2048
    bad_samples: Literal["skip", "error"] = "skip"
    num_workers: NonNegInt = 0

    def dataset(self, name: str) -> DatasetConfig:
        ds = getattr(self, name, None)
        if ds is None:
            raise RecipeError(
                "recipe", [f"data.{name}: no such data set is configured; add a [data.{name}] section"]
            )
        return ds

    def resolve(self, ds: DatasetConfig) -> tuple[Path, Path | None]:
        root = Path(self.root)
        images = root / ds.images if ds.images is not None else None
        return root / ds.path, images


class LossConfig(Strict):
    """Loss weights and the KL flavour; weights left out are filled from the stage's kind."""

    ce: NonNegFloat = 1.0
    response_kl: NonNegFloat | None = None
    visual_kl: NonNegFloat | None = None
    relation: NonNegFloat | None = None
    latent: NonNegFloat | None = None
    kl: KLKind = "forward"
    temperature: PositiveFloat = 1.0
    jsd_beta: Annotated[float, Field(gt=0, lt=1)] = 0.5
    skew_lambda: Annotated[float, Field(gt=0, lt=1)] = 0.1
    latent_kind: Literal["mse", "cosine"] = "cosine"
    # (student layer, teacher layer) pairs of hidden states to align; "projector" is the projector
    # output (the visual tokens right after modality alignment), -1 the final layer.
    latent_pairs: list[tuple[int | Literal["projector"], int | Literal["projector"]]] = [
        ("projector", "projector"),
        (-1, -1),
    ]
    # Response and visual logit losses from hidden states and lm_head weights, this many positions at
    # a time, so B x T x V logits are never whole in memory; 0 = the plain path (whole logits).
    chunk_size: NonNegInt = 0

    def weight(self, term: str) -> float:
        value = getattr(self, term)
        return 0.0 if value is None else float(value)


class DistillSchedule(Strict):
    """How the distillation weight (lambda) moves over a stage; it multiplies every KD term."""

    kind: Literal["constant", "linear_decay", "warm_start"] = "constant"
    start: NonNegFloat = 1.0
    end: NonNegFloat = 0.0
    warm_steps: NonNegInt = 0
    ramp_steps: NonNegInt = 0

    def factor(self, step: int, total: int) -> float:
        if self.kind == "constant":
            return self.start
        if self.kind == "linear_decay":
            frac = min(1.0, step / max(1, total - 1))
            return self.start + (self.end - self.start) * frac
        if step < self.warm_steps:
            return 0.0
        if self.ramp_steps == 0:
            return self.start
        return self.start * min(1.0, (step - self.warm_steps + 1) / self.ramp_steps)


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

    @property
    def cached(self) -> bool:
        return self.teacher_cache != "off"

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
    pass


class ExportConfig(Strict):
    quantize: Literal["none", "int8", "int4", "fp16"] = "int8"
    target: Literal["cpu", "cuda"] = "cpu"
    opset: Annotated[int, Field(ge=17, le=23)] = 18
    parity_samples: PositiveInt = 16
    max_rel_logit_diff: PositiveFloat = 1e-3
    max_accuracy_drop: NonNegFloat = 0.02


class EvalConfig(Strict):
    max_samples: PositiveInt | None = None
    max_new_tokens: PositiveInt = 8
    batch_size: PositiveInt = 64


class BenchConfig(Strict):
    """`lsd-edge bench` defaults: prompts per repeat, new tokens per generation (EOS ignored)."""

    prompts: PositiveInt = 8
    max_new_tokens: PositiveInt = 128
    repeats: PositiveInt = 3
    warmup: NonNegInt = 1


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


def cross_check(recipe: Recipe) -> list[str]:
    """Problems that involve more than one section, each under the key to change."""
    problems = []
    for i, st in enumerate(recipe.stages):
        if getattr(recipe.data, st.data or "", None) is None:
            problems.append(f"stages[{i}].data: '{st.data}' needs a [data.{st.data}] section")
    for i, st in enumerate(recipe.teacher.stages):
        if getattr(recipe.data, st.data or "", None) is None:
            problems.append(f"teacher.stages[{i}].data: '{st.data}' needs a [data.{st.data}] section")
        if st.distills:
            problems.append(f"teacher.stages[{i}].kind: the teacher trains with pt/sft stages only")
        if st.regenerate:
            problems.append(f"teacher.stages[{i}].regenerate: the teacher trains on the reference answers")
    if recipe.teacher.stages and recipe.teacher.tiny is None:
        problems.append("teacher.stages: only a [teacher.tiny] teacher is trained by the recipe")
    if recipe.teacher.tiny is not None and not recipe.teacher.stages:
        problems.append("teacher.stages: a [teacher.tiny] teacher needs [[teacher.stages]] to train it")
    if recipe.teacher.tiny is not None and recipe.teacher.tiny.vision == "teacher":
        problems.append("teacher.tiny.vision: the teacher needs its own vision sizes, not 'teacher'")
    if recipe.student.vision not in (None, "teacher") and recipe.student.llm is None:
        problems.append("student.vision: only used with student.llm (composing a model from parts)")
    for i, st in enumerate(recipe.stages):
        for j, pair in enumerate(st.loss.latent_pairs):
            if (pair[0] == "projector") != (pair[1] == "projector"):
                problems.append(
                    f"stages[{i}].loss.latent_pairs[{j}]: pair 'projector' with 'projector', layers with layers"
                )
    return problems


# --------------------------------------------------------------------------------------------- loading


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif (
            isinstance(part, str)
            and not part.startswith(("function-", "literal[", "tagged-union"))
            and part
            not in (
                "int",
                "str",
                "float",
                "bool",
                "list[...]",
                "tuple[...]",
            )
            and not re.match(r"^(int|str|float|bool|list|tuple|literal|constrained)", part)
        ):
            out += ("." if out else "") + part
    return out or "(top level)"


def _format_errors(err: ValidationError) -> list[str]:
    problems: list[str] = []
    for e in err.errors(include_url=False):
        where = _loc(tuple(e["loc"]))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (a typo?); remove it or check the spelling against `lsd-edge validate` output"
        elif e["type"] == "missing":
            msg = "missing; this key or section is required"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        line = f"{where}: {msg}"
        if line not in problems:
            problems.append(line)
    return problems


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)")


def _split_key(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for chunk in path.split("."):
        if chunk.isdigit():
            parts.append(int(chunk))
            continue
        m = _KEY.fullmatch(chunk)
        if not m:
            raise ValueError(f"'{path}' is not a key path like stages[1].lr or run.seed")
        parts.append(m.group(1))
        parts.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    return parts


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Apply `a.b[1].c=value` overrides; values are TOML literals (strings may go unquoted)."""
    raw = copy.deepcopy(raw)
    problems: list[str] = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"--set {item}: expected KEY=VALUE, e.g. --set stages[0].lr=1e-4")
            continue
        key, value = item.split("=", 1)
        try:
            parts = _split_key(key.strip())
        except ValueError as e:
            problems.append(f"--set {item}: {e}")
            continue
        node: Any = raw
        ok = True
        for j, part in enumerate(parts[:-1]):
            nxt = parts[j + 1]
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    problems.append(f"--set {item}: index [{part}] is out of range")
                    ok = False
                    break
                node = node[part]
            else:
                if not isinstance(node, dict):
                    problems.append(f"--set {item}: '{part}' is not a table")
                    ok = False
                    break
                if part not in node or node[part] is None:
                    node[part] = [] if isinstance(nxt, int) else {}
                node = node[part]
        if not ok:
            continue
        last = parts[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or last >= len(node):
                problems.append(f"--set {item}: index [{last}] is out of range")
                continue
            node[last] = _parse_value(value.strip())
        elif isinstance(node, dict):
            node[last] = _parse_value(value.strip())
        else:
            problems.append(f"--set {item}: cannot set a key inside a non-table")
    return raw, problems


def parse_recipe(raw: dict[str, Any], source: str = "recipe", overrides: list[str] | None = None) -> Recipe:
    raw, problems = apply_overrides(raw, overrides or [])
    if problems:
        raise RecipeError(source, problems)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(source, _format_errors(err)) from None
    problems = cross_check(recipe)
    if problems:
        raise RecipeError(source, problems)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), ["no such recipe file; see recipes/ for the shipped ones"])
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(str(path), [f"TOML syntax error: {e}"]) from None
    except UnicodeDecodeError:
        raise RecipeError(str(path), ["not a UTF-8 text file; a recipe is TOML"]) from None
    return parse_recipe(raw, str(path), overrides)


# ------------------------------------------------------------------------------------- writing TOML


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps_toml(data: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for resolved recipes (tables, arrays of tables, plain values)."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    out = "\n".join(lines)
    for k, v in tables:
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            body = dumps_toml(v, name)
            out += f"\n\n[{name}]\n{body}" if body.strip() else f"\n\n[{name}]"
        else:
            for item in v:
                out += f"\n\n[[{name}]]\n{dumps_toml(item, name)}"
    return out.strip() + "\n" if not prefix else out.strip()
