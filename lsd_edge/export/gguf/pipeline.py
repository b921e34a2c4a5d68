"""`lsd-edge export --gguf`: a LLaVA model folder in, a folder llama.cpp, Ollama and LM Studio run out.

`export_gguf(model_dir, output, settings)` checks the model can be written (a Qwen2/Llama LLM with a
byte-level BPE tokenizer, a SigLIP or CLIP tower read as llama.cpp reads it), writes `<name>.gguf`
(`lsd_edge.export.gguf.llm`) and `mmproj-<name>.gguf` (`lsd_edge.export.gguf.vision`) and an Ollama
`Modelfile`, then runs the parity gate through llama-cpp-python (`lsd_edge.export.gguf.parity`):
llama.cpp's greedy tokens must equal PyTorch's on every prompt. With eval data, both sides' exact
match on the gate's questions is reported too (`lsd_edge.evaluate.accuracy`), not gated. A folder
that fails is kept as `<output>.failed` with the reason in its export_report.json, as the ONNX
export does (`lsd_edge.export.gated`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import gguf

from lsd_edge.errors import ExportError
from lsd_edge.evaluate.accuracy import BATCH_SIZE, evaluate_answers
from lsd_edge.export.gated import (
    SYNTHETIC_QUESTIONS,
    ExportResult,
    check_data,
    gated,
    parity_items,
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
from lsd_edge.export.gguf.vision import check_vision, write_mmproj
from lsd_edge.files import jsonable
from lsd_edge.models.tokens import processor_image_size
from lsd_edge.progress import QuietReporter, Reporter
from lsd_edge.runtime.torch_runner import TorchRunner
from lsd_edge.workspace import RUNS_ROOT


@dataclass
class GgufSettings:
    quant: str = "q8_0"  # f16 | q8_0
    samples: int = 4  # parity prompts (eval questions, or random images without eval data)
    max_new_tokens: int = 8
    data: Path | None = None
    images: Path | None = None
    # share of prompts whose whole greedy answer must equal PyTorch's; None: 1.0 for f16, 0 for q8_0
    # (Q8_0 also quantizes activations, so later tokens may drift; every first token must still agree)
    min_greedy_agreement: float | None = None

    @property
    def greedy_floor(self) -> float:
        if self.min_greedy_agreement is not None:
            return self.min_greedy_agreement
        return 1.0 if self.quant == "f16" else 0.0


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


def _gate(parity: dict, settings: GgufSettings) -> list[str]:
    reasons = []
    if parity["greedy_agreement"] < settings.greedy_floor:
        reasons.append(
            f"llama.cpp's {settings.quant} greedy tokens match PyTorch's on "
            f"{100 * parity['greedy_agreement']:.0f}% of prompts, below {100 * settings.greedy_floor:.0f}%"
        )
    if parity["first_token_agreement"] < 1.0:
        reasons.append(
            f"llama.cpp's {settings.quant} first greedy token differs from PyTorch's on "
            f"{100 * (1 - parity['first_token_agreement']):.0f}% of prompts"
        )
    if parity["tokenizer"]["agreement"] < 1.0:
        reasons.append("llama.cpp tokenizes the chat prompts differently from the HF tokenizer")
    return reasons


def _parity(torch_runner: TorchRunner, llm: Path, mmproj: Path, settings: GgufSettings) -> dict[str, Any]:
    items, source = parity_items(settings.data, settings.images, torch_runner.processor, settings.samples)
    runner = LlamaCppRunner(llm, mmproj)
    size = processor_image_size_wh(torch_runner.processor)
    try:
        rep = compare(torch_runner, runner, items, size, settings.max_new_tokens)
        rep["tokenizer"] = tokenizer_agreement(torch_runner, runner, list(SYNTHETIC_QUESTIONS))
        rep["accuracy_torch"] = rep["accuracy_llama_cpp"] = None
        if settings.data is not None:  # eval questions: both sides scored by the one accuracy path
            rep["accuracy_torch"] = evaluate_answers(
                torch_runner, items, settings.max_new_tokens, batch_size=BATCH_SIZE
            ).accuracy
            llama = LlamaCppAnswers(runner, torch_runner, size)
            rep["accuracy_llama_cpp"] = evaluate_answers(llama, items, settings.max_new_tokens).accuracy
    finally:
        runner.close()
    rep["source"] = source
    return rep


def processor_image_size_wh(processor) -> tuple[int, int]:
    h, w = processor_image_size(processor)
    return (w, h)


def _settings(settings: GgufSettings | dict[str, Any] | None) -> GgufSettings:
    if not isinstance(settings, GgufSettings):
        settings = GgufSettings(**{k: v for k, v in (settings or {}).items() if v is not None})
    check_quant(settings.quant)
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
    """Write the GGUF pair and Modelfile, gate them on llama.cpp's greedy tokens; the report is in the folder."""
    reporter = reporter or QuietReporter()
    model_dir, _ = source_folder(model_dir, reporter, runs_root)
    settings = _settings(settings)
    torch_runner = TorchRunner(model_dir, device="cpu", dtype="float32")
    check_model(torch_runner.model, torch_runner.processor, str(model_dir))
    missing = llama_cpp_missing()
    if missing is not None:
        raise ExportError(f"{missing}: the GGUF parity gate runs llama.cpp through it; {INSTALL}")
    out = Path(output) if output is not None else default_gguf_dir(model_dir)
    name = model_dir.name if model_dir.name != "student" else model_dir.parent.name
    report: dict[str, Any] = {"model_dir": str(model_dir), "output": str(out), "format": "gguf"}
    report["settings"] = jsonable(settings)
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
        mmproj = write_mmproj(model, processor, tmp / f"mmproj-{name}.gguf", quant, name, str(self.model_dir))
        (tmp / "Modelfile").write_text(
            modelfile(name, f"exported by lsd-edge from {self.model_dir} ({quant})")
        )
        report["chat_template"] = llama_cpp_template(processor)[1]
        report["files"] = {p.name: check_gguf_file(p) for p in (llm, mmproj)}
        self.reporter.advance(1, "written")
        t1 = time.perf_counter()
        report["parity"] = _parity(self.torch_runner, llm, mmproj, self.settings)
        self.reporter.advance(1, "parity")
        reasons = _gate(report["parity"], self.settings)
        report["gate"] = {"passed": not reasons, "reasons": reasons}
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
