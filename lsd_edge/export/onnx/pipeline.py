"""`lsd-edge export`: a model folder in, an export folder out that passed the parity gate, with its report.

`export(model_dir, settings)` traces the three graphs (`lsd_edge.export.onnx.graphs`), writes the quantized
variant for the target (`lsd_edge.export.onnx.quantize`), then compares the export with PyTorch on eval
samples (`lsd_edge.export.onnx.parity`): fp32 logits and greedy tokens (the gate every export must pass),
and exact-match accuracy of the quantized variant; then measures decode speed of both. A folder
that fails the gate is kept beside the output as `<output>.failed`, with the reason in its
export_report.json, and the call raises `ExportError`; an earlier good export stays in place
(`lsd_edge.export.gated`, which the GGUF export shares).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lsd_edge.data.questions import first_questions
from lsd_edge.errors import ExportError
from lsd_edge.export.gated import ExportResult, check_data, gated, recipe_eval, source_folder
from lsd_edge.export.onnx.assemble import export_peak_mb, onnx_versions, write_graphs
from lsd_edge.export.onnx.package import package
from lsd_edge.export.onnx.parity import parity_report
from lsd_edge.export.onnx.quantize import sizes_mb
from lsd_edge.export.onnx.speed import speed_report
from lsd_edge.files import jsonable
from lsd_edge.models.card import CardFacts, read_facts, write_card
from lsd_edge.models.groups import count_params
from lsd_edge.progress import QuietReporter, Reporter
from lsd_edge.recipe.load import folder_recipe
from lsd_edge.runtime.onnx.layout import GRAPHS
from lsd_edge.runtime.torch_runner import TorchRunner
from lsd_edge.workspace import RUNS_ROOT, default_export_dir

# Files of a model folder that an export folder carries over (configs, tokenizer, processor).
CARRIED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
    "recipe.toml",
)
# Quantize choice -> the variant written beside the fp32 graphs.
VARIANT_OF = {"none": "fp32", "int8": "int8", "int4": "int4", "fp16": "fp16"}


@dataclass(frozen=True)
class VariantBound:
    """What a quantized variant's own outputs must keep on the gate's samples, eval data or not."""

    max_rel_logit_diff: float  # against PyTorch's, teacher-forced on its tokens (parity.compare)
    min_greedy_agreement: float  # share of samples whose whole greedy answer equals PyTorch's


# Measured with `python scripts/gate_bounds.py` (export/README.md, "Parity gate") on the tests'
# 128-wide student and an untrained student of recipes/tiny.toml's size, 16 samples with and
# without eval data, on CPU: relative logit difference int8 1.5-1.8e-2, int4 0.19-0.21, fp16
# 6-8e-4; greedy agreement 0.94-1.0 (0.75 on the tests' 4 samples: one answer drifting late). Each
# logit bound leaves about twice the worst figure; a damaged graph (the lm_head's scales doubled,
# a weight's bytes scrambled) lands near 1. Greedy answers must agree on half the samples.
VARIANT_BOUNDS = {
    "int8": VariantBound(5e-2, 0.5),
    "int4": VariantBound(0.4, 0.5),
    "fp16": VariantBound(1e-2, 0.5),
}


@dataclass
class ExportSettings:
    """What an export does; `from_model_dir` fills it from the recipe the model was trained with."""

    quantize: str = "int8"  # none | int8 | int4 | fp16
    target: str = "cpu"  # cpu | cuda
    opset: int = 18
    parity_samples: int = 16
    max_rel_logit_diff: float = 1e-3
    max_accuracy_drop: float = 0.02
    data: Path | None = None  # LLaVA-format eval JSON; default: the recipe's eval split
    images: Path | None = None
    eval_samples: int | None = None  # accuracy questions; default: the recipe's eval.max_samples (all)
    max_new_tokens: int = 8
    decoder: str = "auto"  # auto | builder | traced (lsd_edge.export.onnx.decoder)
    bench_tokens: int = 32
    bench_repeats: int = 3
    external_data_mb: float = 1536.0  # graphs with more weights than this keep them in <file>_data
    # the quantized variant's own bounds; None: the variant's measured ones (VARIANT_BOUNDS)
    max_variant_rel_logit_diff: float | None = None
    min_variant_greedy_agreement: float | None = None
    note: str | None = None  # why the recipe's eval data is not used, shown to the user

    @classmethod
    def from_model_dir(cls, model_dir: Path, **overrides: Any) -> ExportSettings:
        """Defaults from the model folder's recipe.toml ([export], [eval], [bench], eval data), then overrides."""
        values: dict[str, Any] = {}
        recipe = folder_recipe(model_dir)
        if recipe is not None:
            ex = recipe.export
            values.update(
                quantize=ex.quantize,
                target=ex.target,
                opset=ex.opset,
                parity_samples=ex.parity_samples,
                max_rel_logit_diff=ex.max_rel_logit_diff,
                max_accuracy_drop=ex.max_accuracy_drop,
                max_variant_rel_logit_diff=ex.max_variant_rel_logit_diff,
                min_variant_greedy_agreement=ex.min_variant_greedy_agreement,
                decoder=ex.decoder,
                bench_tokens=recipe.bench.max_new_tokens,
                bench_repeats=recipe.bench.repeats,
            )
            values.update(recipe_eval(recipe, overrides))
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        if settings.quantize not in VARIANT_OF:
            raise ExportError(f"quantize '{settings.quantize}': choose one of {', '.join(VARIANT_OF)}")
        if settings.target not in ("cpu", "cuda"):
            raise ExportError(f"target '{settings.target}': choose cpu or cuda")
        if settings.decoder not in ("auto", "builder", "traced"):
            raise ExportError(f"decoder '{settings.decoder}': choose auto, builder or traced")
        return settings

    @property
    def variant(self) -> str:
        return VARIANT_OF[self.quantize]

    @property
    def variant_bound(self) -> VariantBound | None:
        """The quantized variant's bounds (None for an fp32 export), the settings' where they give one."""
        if self.variant == "fp32":
            return None
        measured = VARIANT_BOUNDS[self.variant]
        logits, greedy = self.max_variant_rel_logit_diff, self.min_variant_greedy_agreement
        return VariantBound(
            measured.max_rel_logit_diff if logits is None else logits,
            measured.min_greedy_agreement if greedy is None else greedy,
        )


def _carry_files(model_dir: Path, out: Path) -> None:
    for name in CARRIED:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)


def _gate(settings: ExportSettings, fp32: dict, acc_torch, acc_onnx) -> list[str]:
    reasons = []
    if fp32["max_rel_logit_diff"] > settings.max_rel_logit_diff:
        reasons.append(
            f"fp32 logits differ from PyTorch by {fp32['max_rel_logit_diff']:.2e} (relative) > "
            f"{settings.max_rel_logit_diff:.0e}"
        )
    if fp32["greedy_agreement"] < 1.0:
        reasons.append(
            f"fp32 greedy tokens match PyTorch on {100 * fp32['greedy_agreement']:.0f}% of samples, not all"
        )
    if (
        acc_torch is not None
        and acc_onnx is not None
        and acc_onnx < acc_torch - settings.max_accuracy_drop - 1e-9
    ):
        reasons.append(
            f"{settings.variant} accuracy {100 * acc_onnx:.1f}% is more than {100 * settings.max_accuracy_drop:.0f} "
            f"points below PyTorch's {100 * acc_torch:.1f}%"
        )
    return reasons


def _variant_gate(settings: ExportSettings, own: dict) -> list[str]:
    """Why the quantized variant's own outputs (`own`: its parity.compare) are refused: logits or
    greedy tokens beyond its bounds; without eval data too."""
    v, bound = settings.variant, settings.variant_bound
    if bound is None:
        return []
    reasons = []
    if own["max_rel_logit_diff"] > bound.max_rel_logit_diff:
        reasons.append(
            f"{v} logits differ from PyTorch by {own['max_rel_logit_diff']:.2e} (relative) > "
            f"{bound.max_rel_logit_diff:.0e}, the {v} bound"
        )
    if own["greedy_agreement"] < bound.min_greedy_agreement:
        reasons.append(
            f"{v} greedy tokens match PyTorch on {100 * own['greedy_agreement']:.0f}% of samples, "
            f"below {100 * bound.min_greedy_agreement:.0f}%"
        )
    return reasons


def _parity_and_gate(
    torch_runner, tmp: Path, variants, settings: ExportSettings, report, reporter
) -> list[str]:
    """The parity report and the gate's verdict, into `report`; the reasons it failed (none if passed)."""
    report["parity"] = parity = parity_report(
        torch_runner,
        tmp,
        variants,
        settings.data,
        settings.images,
        settings.parity_samples,
        settings.eval_samples,
        settings.max_new_tokens,
        reporter,
    )
    if parity["accuracy_onnx"] is None:
        reporter.message(
            f"[yellow]{settings.note or 'no eval data'}: accuracy is not compared; logits and greedy tokens "
            "are checked on random images[/yellow]"
        )
    reasons = _gate(settings, parity["variants"]["fp32"], parity["accuracy_torch"], parity["accuracy_onnx"])
    reasons += _variant_gate(settings, parity["variants"][settings.variant])
    bound = settings.variant_bound
    report["gate"] = {
        "passed": not reasons,
        "reasons": reasons,
        "max_rel_logit_diff": settings.max_rel_logit_diff,
        "max_accuracy_drop": settings.max_accuracy_drop,
        "variant_bound": None if bound is None else {settings.variant: asdict(bound)},
    }
    return reasons


def export(
    model_dir: str | Path | None,
    output: str | Path | None = None,
    settings: ExportSettings | dict[str, Any] | None = None,
    reporter: Reporter | None = None,
    runs_root: Path = RUNS_ROOT,
) -> ExportResult:
    """Export, quantize, check parity, measure speed; returns the report (also in <output>/export_report.json).

    `model_dir` None: the student of the most recent run under `runs_root`. `settings` as a dict:
    overrides of what the model folder's recipe says (`ExportSettings.from_model_dir`).
    """
    reporter = reporter or QuietReporter()
    model_dir, picked = source_folder(model_dir, reporter, runs_root)
    if not isinstance(settings, ExportSettings):
        settings = ExportSettings.from_model_dir(model_dir, **(settings or {}))
    if settings.data is not None:
        check_data(settings.data)
    out = Path(output) if output is not None else default_export_dir(model_dir)
    variant = settings.variant
    variants = ["fp32"] if variant == "fp32" else ["fp32", variant]
    started = time.perf_counter()
    reporter.task(f"export {model_dir.name}", 4 + 2 * (variant != "fp32"))
    torch_runner = TorchRunner(model_dir, device="cpu", dtype="float32")
    report: dict[str, Any] = {
        "model_dir": str(model_dir),
        "picked_latest_run": picked,
        "output": str(out),
        "default_variant": variant,
        "variants": variants,
        "settings": jsonable(settings),
    }
    job = OnnxJob(model_dir, out, settings, variants, torch_runner, report, reporter, started)
    return gated(out, report, job.build, "parity gate")


@dataclass
class OnnxJob:
    """One export being built: what `build` needs besides the temporary folder it fills."""

    model_dir: Path
    out: Path
    settings: ExportSettings
    variants: list[str]
    torch_runner: TorchRunner
    report: dict[str, Any]
    reporter: Reporter
    started: float

    def build(self, tmp: Path) -> list[str]:
        """Graphs, package, sizes, parity and its gate, speed (when passed), card; the gate's reasons."""
        settings, variants, report, reporter = self.settings, self.variants, self.report, self.reporter
        t0 = time.perf_counter()
        _carry_files(self.model_dir, tmp)
        made = write_graphs(
            self.torch_runner.model,
            tmp,
            variants,
            settings.target,
            settings.opset,
            settings.external_data_mb,
            settings.decoder,
        )
        report["decoder"] = made["decoder"]
        if "quantization" in made:
            report["quantization"] = made["quantization"]
        reporter.advance(1 + (len(variants) > 1), "graphs written")
        report["transformers_js"] = package(tmp, variants, settings.variant)
        t2 = time.perf_counter()
        report.update(size_report(tmp, self.model_dir, variants))
        reasons = _parity_and_gate(self.torch_runner, tmp, variants, settings, report, reporter)
        t3 = time.perf_counter()
        image = report["parity"].pop("bench_image")
        if not reasons:
            report["speed"] = speed_report(
                self.torch_runner, tmp, variants, image, settings.bench_tokens, settings.bench_repeats
            )
            reporter.advance(1, "speed")
        times = {"export": t2 - t0, "parity": t3 - t2, "total": time.perf_counter() - self.started}
        report["timing_s"] = {**made["seconds"], **{k: round(v, 2) for k, v in times.items()}}
        report.update(peak_rss_mb=export_peak_mb(made), versions=onnx_versions())
        card = export_card(self.model_dir, self.out, settings, self.torch_runner.model, report)
        write_card(tmp, card)
        reporter.done()
        return reasons


def export_card(model_dir: Path, out: Path, settings: ExportSettings, model, report: dict) -> CardFacts:
    """The export's model card: the student's own card facts (a folder lsd-edge distilled) or what
    the folder and the parity check say, with the export's figures."""
    facts = read_facts(model_dir)
    if facts is None:
        params = count_params(model)["total"]
        facts = CardFacts(
            name=model_dir.name,
            pytorch_dir=str(model_dir),
            export_dir=str(out),
            teacher="not recorded (a model folder lsd-edge did not distil)",
            student_llm=None,
            recipe="n/a",
            stages=[],
            data={},
            teacher_accuracy=None,
            student_accuracy=report["parity"].get("accuracy_torch"),
            params=params,
            teacher_params=None,  # no teacher row: nothing is known of one
        )
        found = first_questions(settings.data, settings.images, limit=1) if settings.data else []
        if found:
            facts.example = (str(found[0].image), found[0].question)
    facts.pytorch_dir, facts.export_dir, facts.export = str(model_dir), str(out), report
    return facts


def size_report(out: Path, model_dir: Path, variants: list[str]) -> dict[str, Any]:
    """MB per graph and variant, the PyTorch weights', and each quantized graph's share of its fp32 one."""
    sizes: dict[str, Any] = sizes_mb(out, variants)
    sizes["pytorch_safetensors"] = round(
        sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20, 4
    )
    rep: dict[str, Any] = {"sizes_mb": sizes}
    if len(variants) > 1:
        v = variants[-1]
        rep["size_ratio"] = {g: round(sizes[v][g] / sizes["fp32"][g], 4) for g in (*GRAPHS, "total")}
    return rep
