"""What `lsd-edge verify` measures: the rows the given folders hold (PyTorch, each ONNX variant in
ONNX Runtime, transformers.js in Node and the browser page, each GGUF quant in llama.cpp), the
PyTorch folder they were exported from, and the eval questions every row answers.

Every row answers the same questions: each single-image record's first question (`first_questions`,
as the bench and the demo ask them), because Node and the browser take an image file and a question,
not prompt ids; the in-process runtimes get the same question as prompt ids from the PyTorch
folder's chat template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf

from lsd_edge.data.chat import ChatEncoder, user_message
from lsd_edge.data.questions import EvalItem, Question, first_questions
from lsd_edge.data.records import BadSample, load_image
from lsd_edge.errors import LsdEdgeError
from lsd_edge.recipe.load import folder_recipe
from lsd_edge.runtime.onnx.layout import variants_in
from lsd_edge.workspace import export_source, is_export_folder, is_model_folder

RUNTIMES = ("pytorch", "onnx", "node", "browser", "llama.cpp")
REFERENCE = "pytorch"


class VerifyError(LsdEdgeError):
    """Folders, eval data or bounds `lsd-edge verify` cannot use, or a runtime below its bound."""


@dataclass(frozen=True)
class Row:
    """One runtime running one variant of one folder; `mmproj` is a GGUF quant's projector."""

    runtime: str
    variant: str
    folder: Path
    model: Path | None = None  # the GGUF LLM file
    mmproj: Path | None = None

    @property
    def key(self) -> str:
        return f"{self.runtime}/{self.variant}"


@dataclass
class Plan:
    reference: Path  # the PyTorch folder the exports came from
    rows: list[Row] = field(default_factory=list)


def gguf_rows(folder: Path) -> list[Row]:
    """Each LLM file in a GGUF folder with its projector (`mmproj-<stem>.gguf`, else the folder's one)."""
    projectors = sorted(folder.glob("mmproj-*.gguf"))
    rows = []
    for llm in sorted(p for p in folder.glob("*.gguf") if not p.name.startswith("mmproj-")):
        own = folder / f"mmproj-{llm.name}"
        mmproj = own if own.is_file() else (projectors[0] if len(projectors) == 1 else None)
        if mmproj is None:
            raise VerifyError(
                f"{llm}: no mmproj-{llm.name} beside it (and not exactly one mmproj-*.gguf); "
                "export again with `lsd-edge export --gguf`"
            )
        rows.append(Row("llama.cpp", gguf_quant(llm), folder, llm, mmproj))
    return rows


def gguf_quant(path: Path) -> str:
    """A GGUF LLM's quant as llama.cpp names it (q8_0, f16, ...): its general.file_type, else its stem."""
    try:
        f = gguf.GGUFReader(str(path)).fields["general.file_type"]
        name = gguf.LlamaFileType(int(f.parts[f.data[0]][0])).name
        return name.removeprefix("MOSTLY_").lower()
    except Exception:  # no file type, or a damaged file: llama.cpp says why when it loads it
        return path.stem


def folder_rows(folder: Path) -> list[Row]:
    """The rows one given folder holds, or a one-line error for a folder that is not an export."""
    if not folder.is_dir():
        raise VerifyError(
            f"{folder}: no such folder; give folders written by `lsd-edge export` (ONNX or --gguf)"
        )
    if is_export_folder(folder):
        rows = []
        for runtime in ("onnx", "node", "browser"):
            rows += [Row(runtime, v, folder) for v in variants_in(folder)]
        if not rows:
            raise VerifyError(f"{folder}: its onnx/ holds no complete variant; export it again")
        return rows
    if any(folder.glob("*.gguf")):
        return gguf_rows(folder)
    if is_model_folder(folder):
        return [Row(REFERENCE, "fp32", folder)]
    raise VerifyError(
        f"{folder}: not an export (no onnx/*.onnx, no *.gguf, no config.json); give folders written by "
        "`lsd-edge export` or `lsd-edge export --gguf`"
    )


def make_plan(folders: list[Path], pytorch: Path | None, only: list[str] | None) -> Plan:
    """The rows of every folder (PyTorch's first) and the PyTorch folder they are compared with: given,
    a PyTorch folder among `folders`, or the one the exports' reports name (they must agree)."""
    for name in only or []:
        if name.split("/")[0] not in RUNTIMES:
            raise VerifyError(f"--only {name}: choose among {', '.join(RUNTIMES)} (or RUNTIME/VARIANT)")
    rows = [r for f in folders for r in folder_rows(Path(f))]
    sources = {r.folder for r in rows if r.runtime == REFERENCE}
    if pytorch is None:
        named = {export_source(r.folder) for r in rows if r.runtime != REFERENCE}
        sources |= {Path(p) for p in named if p is not None}
        if len(sources) > 1:
            raise VerifyError(
                f"the folders come from different models ({', '.join(sorted(map(str, sources)))}); "
                "verify one model's exports at a time, or name its folder with --pytorch"
            )
        if not sources:
            raise VerifyError("no PyTorch folder known for these exports; name it with --pytorch MODEL_DIR")
        pytorch = sources.pop()
    if not is_model_folder(pytorch):
        raise VerifyError(
            f"{pytorch}: the PyTorch folder the exports were made from is not there; name it with --pytorch"
        )
    rows = [Row(REFERENCE, "fp32", Path(pytorch))] + [r for r in rows if r.runtime != REFERENCE]
    rows = [r for r in rows if r.runtime == REFERENCE or not only or r.runtime in only or r.key in only]
    return Plan(Path(pytorch), list(dict.fromkeys(rows)))


def eval_data(plan: Plan, data: Path | None, images: Path | None) -> tuple[Path, Path | None]:
    """The eval file and its images: --data, else the eval split of the recipe of the PyTorch folder
    (or of an ONNX export, which carries it)."""
    if data is None:
        for folder in [plan.reference] + [r.folder for r in plan.rows]:
            recipe = folder_recipe(folder)
            if recipe is not None and recipe.data.eval is not None:
                data, images = recipe.data.resolve(recipe.data.eval)
                break
        else:
            raise VerifyError(
                f"{plan.reference}: its recipe names no eval split; pass --data with a LLaVA-format eval JSON"
            )
    if not Path(data).is_file():
        raise VerifyError(f"{data}: no such eval data file; pass --data with a LLaVA-format eval JSON")
    return Path(data), images


def eval_questions(
    data: Path, images: Path | None, n: int, processor
) -> tuple[list[Question], list[EvalItem]]:
    """The first `n` single-image questions of `data`, and the same questions as eval items (prompt
    ids from `processor`'s chat template, the image decoded) for the one accuracy path."""
    questions = first_questions(data, images, limit=n)
    if not questions:
        raise VerifyError(f"{data}: no single-image question with its image found; check --data and --images")
    enc = ChatEncoder(processor)
    items = []
    for k, q in enumerate(questions):
        try:
            image = load_image(q.image)
        except BadSample as e:
            raise VerifyError(f"{q.image}: {e}") from None
        items.append(
            EvalItem(f"q{k}", q.type, enc.encode_prompt([user_message(q.question, 1)]), [image], q.answer)
        )
    return questions, items


class FileSide:
    """A runtime asked one question at a time by image file and text (transformers.js in Node, the
    browser page): an `Answerer` over the questions its rows were planned with, found by item id."""

    batch_size = None

    def __init__(self, folder: Path, variant: str, questions: dict[str, Question]):
        self.folder, self.variant, self.questions = folder, variant, questions
        self.answerer = self

    def asked(self, items: list[EvalItem]) -> list[dict]:
        """{image, question} of each item, as the runtime takes them."""
        return [
            {"image": str(self.questions[it.id].image), "question": self.questions[it.id].question}
            for it in items
        ]
