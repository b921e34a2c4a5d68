"""`lsd-edge export --gguf`: a LLaVA model folder in, a folder llama.cpp, Ollama and LM Studio run out.

`export_gguf(model_dir, output, settings)` checks the model can be written (a Qwen2/Llama LLM with a
byte-level BPE tokenizer, a SigLIP or CLIP tower read as llama.cpp reads it), writes `<name>.gguf`
(`lsd_edge.export.gguf.llm`) and `mmproj-<name>.gguf` (`lsd_edge.export.gguf.vision`) and an Ollama
`Modelfile`, then runs the gate through llama-cpp-python (`lsd_edge.export.gguf.parity`) on llama.cpp's
own outputs of the quant (f16, q8_0 or q4_0, with an f16 or q8_0 mmproj) against PyTorch's. With
eval data (the recipe's eval split by default, or --data) both answer every eval question and the one
scorer (`lsd_edge.evaluate.score`) judges them: llama.cpp's exact match within the quant's bound of
PyTorch's (1 point), and for f16 every answer PyTorch's. On a model that scores below
`ACCURACY_DECIDES` (an untrained stand-in, whose accuracy cannot show a loss) or without eval data,
its logits, first greedy tokens and greedy answers on a few prompts must also keep within the
bounds measured for the quant (`QUANT_BOUNDS`). Always, llama.cpp's ids of the chat prompts must equal
the HF tokenizer's. A folder that fails is kept as `<output>.failed` with the reason in its
export_report.json, as the ONNX export does (`lsd_edge.export.gated`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import gguf

from lsd_edge.errors import ExportError
from lsd_edge.evaluate.score import score
from lsd_edge.export.gated import (
    SYNTHETIC_QUESTIONS,
    ExportResult,
    check_data,
    gated,
    parity_items,
    recipe_eval,
    source_folder,
    versions,
)
from lsd_edge.export.gguf.llm import check_quant, check_text_config, tokenizer_facts, write_llm
from lsd_edge.export.gguf.parity import (
    INSTALL,
    LlamaCppAnswers,
    LlamaCppRunner,
    compare,
    llama_cpp_missing,
    tokenizer_agreement,
)
from lsd_edge.export.gguf.template import llama_cpp_template
from lsd_edge.export.gguf.vision import MMPROJ_QUANTS, check_vision, write_mmproj
from lsd_edge.files import jsonable
from lsd_edge.models.tokens import processor_image_size
from lsd_edge.progress import QuietReporter, Reporter
from lsd_edge.recipe.load import folder_recipe
from lsd_edge.runtime.torch_runner import TorchRunner
from lsd_edge.workspace import RUNS_ROOT


@dataclass(frozen=True)
class QuantBound:
    """What a GGUF quant's own outputs must keep against PyTorch (parity.compare, the accuracy pass)."""

    max_rel_logit_diff: float  # every step up to the first differing token, the prompt's last included
    min_first_token_agreement: float  # share of prompts whose first greedy token equals PyTorch's
    min_greedy_agreement: float  # share of PyTorch's greedy tokens llama.cpp gives before it first differs
    max_accuracy_drop: float  # with eval data: exact match at most this far below PyTorch's
    min_answer_agreement: float  # with eval data: share of the questions llama.cpp answers as PyTorch does


# Measured with `python scripts/gate_bounds.py --gguf` (docs/export.md, "GGUF gate bounds") on
# random-weight models, 16 prompts with and without eval data, on CPU: relative logit difference
# f16 5.7-7.3e-4, q8_0 2.8e-3 - 1.7e-2; every first token and whole greedy answer equal. The logit
# bounds leave about three times the worst figure; a damaged file (the token matrix's Q8_0 scales
# doubled, a weight's quants scrambled) lands near 1. f16 keeps every answer whole; q8_0 (which also
# quantizes activations) must keep three in four first tokens and half of each answer. The tests'
# lively student amplifies the error (f16 1.0-1.2e-2, within f16's bound; q8_0 0.17-0.30, first
# tokens 0.94, greedy tokens 0.71): its q8_0 exports set their own bounds, as a larger model would
# in its recipe's [export.gguf]. q4_0 (its layers 4-bit): 0.14-0.17 on the embedded default's size,
# untrained, every token equal; its bound is three times that, the token floors q8_0's. On a
# trained model accuracy decides (`ACCURACY_DECIDES`): exact match within 1 point of PyTorch's for
# every quant (the trained embedded default: export/README.md), and f16 answers every question as
# PyTorch does.
QUANT_BOUNDS = {
    "f16": QuantBound(2.5e-2, 1.0, 1.0, 0.01, 1.0),
    "q8_0": QuantBound(5e-2, 0.75, 0.5, 0.01, 0.0),
    "q4_0": QuantBound(5e-1, 0.75, 0.5, 0.01, 0.0),
}
# PyTorch's exact match on the eval questions from which accuracy, not logits, judges a quant: a trained
# model's answers show a loss, where an untrained one (near 0% either side) could lose anything unseen.
# Its logits and tokens are still reported.
ACCURACY_DECIDES = 0.5


@dataclass
class GgufSettings:
    """What a GGUF export does; `from_model_dir` takes the recipe's eval split and gate bounds."""

    quant: str = "q8_0"  # f16 | q8_0 | q4_0
    mmproj_quant: str | None = None  # f16 | q8_0; None: the LLM's quant, q8_0 under a 4-bit LLM
    samples: int = 4  # parity prompts (eval questions, or random images without eval data)
    max_new_tokens: int = 8
    data: Path | None = None
    images: Path | None = None
    eval_samples: int | None = None  # accuracy questions; None: the whole eval file
    note: str | None = None  # why the recipe's eval data is not used
    accuracy_decides_from: float = ACCURACY_DECIDES  # PyTorch's exact match from which accuracy decides
    # the quant's own bounds; None: the quant's measured ones (QUANT_BOUNDS)
    max_rel_logit_diff: float | None = None
    min_first_token_agreement: float | None = None
    min_greedy_agreement: float | None = None
    max_accuracy_drop: float | None = None
    min_answer_agreement: float | None = None

    @classmethod
    def from_model_dir(cls, model_dir: Path, **overrides: Any) -> GgufSettings:
        """The recipe's eval split and the bounds it gives in `[export.gguf]`, then `overrides`."""
        values: dict[str, Any] = {}
        recipe = folder_recipe(model_dir)
        if recipe is not None:
            values.update(recipe_eval(recipe, overrides))
            values.update(recipe.export.gguf.model_dump(exclude_none=True))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def mmproj(self) -> str:
        """The mmproj file's quant."""
        return self.mmproj_quant or ("q8_0" if self.quant not in MMPROJ_QUANTS else self.quant)

    @property
    def bound(self) -> QuantBound:
        """The quant's measured bounds, each replaced by the settings' where they give one."""
        mine = {f.name: getattr(self, f.name) for f in fields(QuantBound)}
        return replace(QUANT_BOUNDS[self.quant], **{k: v for k, v in mine.items() if v is not None})


def default_gguf_dir(model_dir: Path) -> Path:
    """`<run>/gguf` for a run's student (runs/tiny/student -> runs/tiny/gguf), else `<folder>-gguf`."""
    if model_dir.name == "student":
        return model_dir.parent / "gguf"
    return model_dir.with_name(model_dir.name + "-gguf")


def check_gguf_file(path: Path) -> dict[str, Any]:
    """A GGUF file's architecture and tensor count, or a one-line ExportError for a missing or corrupt one."""
    if not Path(path).is_file():
        raise ExportError(f"{path}: no such GGUF file; export it with `lsd-edge export MODEL_DIR --gguf`")
    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields[gguf.Keys.General.ARCHITECTURE]
        arch = bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as e:  # gguf-py raises ValueError, KeyError or struct errors on a damaged file
        raise ExportError(f"{path}: not a readable GGUF file ({type(e).__name__}); export it again") from e
    return {
        "architecture": arch,
        "tensors": len(reader.tensors),
        "mb": round(Path(path).stat().st_size / 2**20, 3),
    }


def check_model(model, processor, what: str) -> None:
    """Every reason llama.cpp could not run the model as PyTorch does, before anything is written."""
    tokenizer_facts(processor.tokenizer, what)
    check_text_config(model.config.text_config, what)
    check_vision(model.config, what)


def modelfile(name: str, template_note: str) -> str:
    """An Ollama Modelfile over the two files (a second FROM is the projector, as Ollama's llava
    models have it; ChatML turns, as the Qwen chat template writes them)."""
    return (
        f'# Ollama: `ollama create {name} -f Modelfile`, then `ollama run {name} "what is in ./image.png ?"`\n'
        f"# {template_note}\n"
        f"FROM ./{name}.gguf\n"
        f"FROM ./mmproj-{name}.gguf\n"
        'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n'
        '{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"""\n'
        'PARAMETER stop "<|im_end|>"\n'
        "PARAMETER temperature 0\n"
    )


def judged_by_accuracy(parity: dict, settings: GgufSettings) -> bool:
    """Whether accuracy, not logits, decides: eval data on which PyTorch scores at least
    `accuracy_decides_from` (`ACCURACY_DECIDES`)."""
    acc = parity["accuracy_torch"]
    return acc is not None and acc >= settings.accuracy_decides_from


def _logit_reasons(parity: dict, q: str, b: QuantBound) -> list[str]:
    """Logits, first tokens or greedy tokens beyond the quant's bounds."""
    reasons = []
    # `not <=`: a damaged file can give NaN logits, which no comparison passes
    if not parity["max_rel_logit_diff"] <= b.max_rel_logit_diff:
        reasons.append(
            f"llama.cpp's {q} logits differ from PyTorch's by {parity['max_rel_logit_diff']:.2e} "
            f"(relative) > {b.max_rel_logit_diff:g}, the {q} bound"
        )
    if parity["first_token_agreement"] < b.min_first_token_agreement:
        reasons.append(
            f"llama.cpp's {q} first greedy token equals PyTorch's on "
            f"{100 * parity['first_token_agreement']:.0f}% of prompts, below "
            f"{100 * b.min_first_token_agreement:.0f}%"
        )
    if parity["greedy_token_agreement"] < b.min_greedy_agreement:
        reasons.append(
            f"llama.cpp's {q} greedy answers keep PyTorch's tokens for "
            f"{100 * parity['greedy_token_agreement']:.0f}% of their length, below "
            f"{100 * b.min_greedy_agreement:.0f}%"
        )
    return reasons


def _accuracy_reasons(parity: dict, q: str, b: QuantBound) -> list[str]:
    """Exact match beyond the quant's drop, or answers unlike PyTorch's beyond its floor."""
    acc_torch, acc_llama = parity["accuracy_torch"], parity["accuracy_llama_cpp"]
    reasons = []
    if not acc_llama >= acc_torch - b.max_accuracy_drop - 1e-9:
        reasons.append(
            f"llama.cpp's {q} exact match {100 * acc_llama:.1f}% is more than "
            f"{100 * b.max_accuracy_drop:g} points below PyTorch's {100 * acc_torch:.1f}% "
            f"on {parity['accuracy_samples']} eval questions"
        )
    if parity["answer_agreement"] < b.min_answer_agreement:
        reasons.append(
            f"llama.cpp's {q} answers {100 * parity['answer_agreement']:.1f}% of the eval questions "
            f"as PyTorch does, below {100 * b.min_answer_agreement:g}%"
        )
    return reasons


def _gate(parity: dict, settings: GgufSettings) -> list[str]:
    """Why llama.cpp's outputs of this quant are refused: with eval data, its exact match and answers
    against PyTorch's; on a model below `ACCURACY_DECIDES` (or without eval data) also its logits,
    first tokens and greedy tokens; always its tokenizer."""
    q, b = settings.quant, settings.bound
    reasons = [] if judged_by_accuracy(parity, settings) else _logit_reasons(parity, q, b)
    if parity["accuracy_torch"] is not None:
        reasons += _accuracy_reasons(parity, q, b)
    if parity["tokenizer"]["agreement"] < 1.0:
        reasons.append(
            f"llama.cpp tokenizes {100 * (1 - parity['tokenizer']['agreement']):.0f}% of the chat "
            "prompts differently from the HF tokenizer"
        )
    return reasons


def _accuracy(torch_runner: TorchRunner, runner: LlamaCppRunner, size, settings: GgufSettings) -> dict:
    """Both sides' greedy answers to the eval questions, scored by the one scorer, and how many agree.

    llama.cpp's exact match is of the images as given, resized by mtmd as llama.cpp's apps resize
    them (its filter is not PyTorch's processor's); the answer agreement, of the pixels PyTorch's
    processor makes (the model alone: f16 must give PyTorch's every answer)."""
    items, _ = parity_items(settings.data, settings.images, torch_runner.processor, settings.eval_samples)
    n = settings.max_new_tokens
    # one question at a time, as llama.cpp answers: a batch's padding moves a lively model's answers
    want = torch_runner.answers(items, n)
    same_pixels = LlamaCppAnswers(runner, torch_runner, size).answers(items, n)
    # images already at the tower's size are the same pixels both ways: one pass answers for both
    at_size = all(im.size == tuple(size) for it in items for im in it.images)
    own_resize = same_pixels if at_size else LlamaCppAnswers(runner, torch_runner, None).answers(items, n)
    return {
        "accuracy_samples": len(items),
        "accuracy_torch": score(items, want).accuracy,
        "accuracy_llama_cpp": score(items, own_resize).accuracy,
        "accuracy_llama_cpp_same_pixels": score(items, same_pixels).accuracy,
        "answer_agreement": sum(a == b for a, b in zip(want, same_pixels, strict=True)) / max(1, len(items)),
    }


def _parity(torch_runner: TorchRunner, llm: Path, mmproj: Path, settings: GgufSettings) -> dict[str, Any]:
    items, source = parity_items(settings.data, settings.images, torch_runner.processor, settings.samples)
    runner = LlamaCppRunner(llm, mmproj)
    size = processor_image_size_wh(torch_runner.processor)
    try:
        rep = compare(torch_runner, runner, items, size, settings.max_new_tokens)
        rep["tokenizer"] = tokenizer_agreement(torch_runner, runner, list(SYNTHETIC_QUESTIONS))
        rep["accuracy_torch"] = rep["accuracy_llama_cpp"] = None
        if settings.data is not None:  # eval questions: both sides scored by the one scorer
            rep.update(_accuracy(torch_runner, runner, size, settings))
    finally:
        runner.close()
    rep["source"] = source
    rep["judged_by"] = "accuracy" if judged_by_accuracy(rep, settings) else "logits"
    return rep


def processor_image_size_wh(processor) -> tuple[int, int]:
    h, w = processor_image_size(processor)
    return (w, h)


def _settings(settings: GgufSettings | dict[str, Any] | None, model_dir: Path) -> GgufSettings:
    if not isinstance(settings, GgufSettings):
        settings = GgufSettings.from_model_dir(model_dir, **(settings or {}))
    check_quant(settings.quant)
    check_quant(settings.mmproj, MMPROJ_QUANTS, "--mmproj-quant")
    if settings.data is not None:
        check_data(settings.data)
    return settings


def export_gguf(
    model_dir: str | Path | None,
    output: str | Path | None = None,
    settings: GgufSettings | dict[str, Any] | None = None,
    reporter: Reporter | None = None,
    runs_root: Path = RUNS_ROOT,
) -> ExportResult:
    """Write the GGUF pair and Modelfile, gate them on llama.cpp's outputs; the report is in the folder."""
    reporter = reporter or QuietReporter()
    model_dir, _ = source_folder(model_dir, reporter, runs_root)
    settings = _settings(settings, model_dir)
    torch_runner = TorchRunner(model_dir, device="cpu", dtype="float32")
    check_model(torch_runner.model, torch_runner.processor, str(model_dir))
    missing = llama_cpp_missing()
    if missing is not None:
        raise ExportError(f"{missing}: the GGUF parity gate runs llama.cpp through it; {INSTALL}")
    out = Path(output) if output is not None else default_gguf_dir(model_dir)
    name = model_dir.name if model_dir.name != "student" else model_dir.parent.name
    report: dict[str, Any] = {"model_dir": str(model_dir), "output": str(out), "format": "gguf"}
    report["settings"] = jsonable(settings) | {"mmproj": settings.mmproj}
    reporter.task(f"export {name} to GGUF", 2)
    job = GgufJob(model_dir, name, settings, torch_runner, report, reporter)
    return gated(out, report, job.build, "GGUF parity gate")


@dataclass
class GgufJob:
    """One GGUF export being built: what `build` needs besides the temporary folder it fills."""

    model_dir: Path
    name: str
    settings: GgufSettings
    torch_runner: TorchRunner
    report: dict[str, Any]
    reporter: Reporter

    def build(self, tmp: Path) -> list[str]:
        """The two GGUF files and the Modelfile, checked, then the parity gate; its reasons."""
        model, processor = self.torch_runner.model, self.torch_runner.processor
        name, quant, report = self.name, self.settings.quant, self.report
        t0 = time.perf_counter()
        llm = write_llm(
            model, processor, _eos(model, processor), tmp / f"{name}.gguf", quant, name, str(self.model_dir)
        )
        mm_quant = self.settings.mmproj
        mmproj = write_mmproj(
            model, processor, tmp / f"mmproj-{name}.gguf", mm_quant, name, str(self.model_dir)
        )
        (tmp / "Modelfile").write_text(
            modelfile(name, f"exported by lsd-edge from {self.model_dir} ({quant}, mmproj {mm_quant})")
        )
        report["chat_template"] = llama_cpp_template(processor)[1]
        report["files"] = {p.name: check_gguf_file(p) for p in (llm, mmproj)}
        self.reporter.advance(1, "written")
        t1 = time.perf_counter()
        report["parity"] = _parity(self.torch_runner, llm, mmproj, self.settings)
        self.reporter.advance(1, "parity")
        reasons = _gate(report["parity"], self.settings)
        report["gate"] = {
            "passed": not reasons,
            "reasons": reasons,
            "bound": {self.settings.quant: asdict(self.settings.bound)},
            "judged_by": report["parity"]["judged_by"],
            "accuracy_decides_from": self.settings.accuracy_decides_from,
        }
        report["timing_s"] = {"write": round(t1 - t0, 2), "parity": round(time.perf_counter() - t1, 2)}
        report["versions"] = versions(gguf=_version("gguf"), llama_cpp_python=_version("llama_cpp_python"))
        self.reporter.done()
        return reasons


def _eos(model, processor) -> int | None:
    """The end-of-turn id llama.cpp stops on: the generation config's first, else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return eos if isinstance(eos, int) else processor.tokenizer.eos_token_id


def _version(dist: str) -> str | None:
    try:
        return version(dist.replace("_", "-"))
    except PackageNotFoundError:
        return None
