"""What each quantized ONNX variant's, or each GGUF quant's, own outputs look like against PyTorch on
the models the tests export, with and without eval data: the figures the export gates' bounds
(`lsd_edge.export.onnx.pipeline.VARIANT_BOUNDS`, `lsd_edge.export.gguf.pipeline.QUANT_BOUNDS`)
were set from.

    python scripts/gate_bounds.py                # every model, int8, int4 and fp16
    python scripts/gate_bounds.py --variants int8 --models lively
    python scripts/gate_bounds.py --gguf         # every GGUF model, f16, q8_0 and q4_0 (needs llama-cpp-python)

Prints one Markdown row per model, variant and sample source: the largest relative logit difference
(ONNX: teacher-forced on PyTorch's tokens, every prompt position and decode step; GGUF: every step up
to the first differing token), the share of samples whose first greedy token and whose whole greedy
answer equal PyTorch's (GGUF: also the share of each answer kept before it first differs, and both
sides' accuracy with eval data), and the gate's verdict.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lsd_edge.data.shapes import generate, vocabulary  # noqa: E402
from lsd_edge.errors import ExportError  # noqa: E402
from lsd_edge.export.gguf.pipeline import GgufSettings, export_gguf  # noqa: E402
from lsd_edge.export.onnx.pipeline import ExportSettings, export  # noqa: E402
from lsd_edge.models.build import build_tiny_model, build_tiny_processor  # noqa: E402
from lsd_edge.models.load import save_model  # noqa: E402
from lsd_edge.recipe.schema import TinyConfig, VisionSize  # noqa: E402
from tests.helpers import TINY_VISION, bpe_llava, lively_student  # noqa: E402
from tests.realshape import IMAGE_SIZE, build_standins  # noqa: E402

TEACHER = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
# model name -> the student's TinyConfig (None: tests.helpers.lively_student)
MODELS = {
    # tests/conftest.py's onnx_student_dir (the shared export of test_export.py and the runner tests)
    "onnx-student": dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256),
    # recipes/tiny.toml's [student.tiny], the embedded default's size, untrained
    "embedded-size": dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=128),
    # tests/helpers.lively_student: untrained, but its answers differ from question to question
    "lively": None,
}


# GGUF model name -> how to make it from the stand-ins (tests/realshape.py: a byte-level BPE tokenizer,
# which GGUF needs; the embedded default's word-level one is refused)
GGUF_MODELS = {
    # tests/export/test_gguf.py's bpe_student: weights at 2/sqrt(fan-in), answers that vary
    "bpe-lively": lambda standins, out: bpe_llava(standins["teacher"], out),
    # recipes/tiny.toml's [student.tiny] size (64 wide, 4 layers) over the same tokenizer, untrained
    "embedded-size": lambda standins, out: bpe_llava(standins["teacher"], out, layers=4, lively=False),
    # test_untied_padded_teacher_stand_in's: untied lm_head, padded rows, a 48-wide LLM (F16 fallback)
    "standin-teacher": lambda standins, out: standins["teacher"],
}


def gated_run(export_fn, folder: Path, out: Path, settings) -> tuple[dict, str]:
    """An export's report and the gate's verdict: passed, or refused with the reasons (the report then
    read from the folder kept as `<out>.failed`)."""
    try:
        return export_fn(folder, out, settings).report, "passed"
    except ExportError as e:
        report = json.loads((out.with_name(out.name + ".failed") / "export_report.json").read_text())
        return report, f"refused: {e}"


def gguf_rows(a, tmp: Path) -> None:
    """The GGUF mode: one row per GGUF model, quant and sample source."""
    generate(
        tmp / "shapes", seed=0, n_train=8, n_eval=a.samples, image_size=IMAGE_SIZE, questions_per_image=1
    )
    standins = build_standins(tmp / "standins", tmp / "shapes")
    data = {
        "synthetic": {},
        "eval": {"data": standins["data"] / "eval/gqa_testdev_balanced.json", "images": standins["data"]},
    }
    print(
        "| model | quant | samples | max rel. logit diff | first token | greedy tokens | whole answers "
        "| accuracy PyTorch / llama.cpp | gate |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in a.models or list(GGUF_MODELS):
        folder = GGUF_MODELS[name](standins, tmp / name)
        for q in a.variants or ["f16", "q8_0", "q4_0"]:
            for source, extra in data.items():
                s = GgufSettings(quant=q, samples=a.samples, **extra)
                report, verdict = gated_run(export_gguf, folder, tmp / f"{name}-{q}-{source}", s)
                p = report["parity"]
                acc = (
                    "n/a"
                    if p["accuracy_torch"] is None
                    else (f"{p['accuracy_torch']:.2f} / {p['accuracy_llama_cpp']:.2f}")
                )
                print(
                    f"| {name} | {q} | {source} | {p['max_rel_logit_diff']:.2e} | "
                    f"{p['first_token_agreement']:.2f} | {p['greedy_token_agreement']:.2f} | "
                    f"{p['greedy_agreement']:.2f} | {acc} | {verdict} |",
                    flush=True,
                )


def build(name: str, out: Path) -> Path:
    if MODELS[name] is None:
        return lively_student(out)
    proc = build_tiny_processor(VisionSize(**TINY_VISION), vocabulary())
    teacher = build_tiny_model(TinyConfig(**TEACHER, vision=TINY_VISION), proc, seed=0)
    student = build_tiny_model(
        TinyConfig(**MODELS[name], vision="teacher"), proc, vision_from=teacher, seed=2
    )
    save_model(student, proc, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", action="store_true", help="the GGUF gate's quants (f16, q8_0, q4_0) instead")
    ap.add_argument("--models", nargs="*", choices=[*MODELS, *GGUF_MODELS], help="default: every model")
    ap.add_argument("--variants", nargs="*", help="default: int8 int4 fp16, or with --gguf f16 q8_0 q4_0")
    ap.add_argument("--samples", type=int, default=16, help="parity samples (ExportSettings' default)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="gate-bounds-"))
    if a.gguf:
        gguf_rows(a, tmp)
        shutil.rmtree(tmp)
        return
    a.models, a.variants = a.models or list(MODELS), a.variants or ["int8", "int4", "fp16"]
    generate(tmp / "shapes", seed=0, n_train=8, n_eval=a.samples, image_size=16, questions_per_image=1)
    data = {
        "synthetic": {},
        "eval": {"data": tmp / "shapes" / "eval.json", "images": tmp / "shapes" / "images"},
    }
    print("| model | variant | samples | max rel. logit diff | first token | greedy | gate |")
    print("|---|---|---|---|---|---|---|")
    for name in a.models:
        folder = build(name, tmp / name)
        for v in a.variants:
            for source, extra in data.items():
                s = ExportSettings(
                    quantize=v, parity_samples=a.samples, bench_tokens=4, bench_repeats=1, **extra
                )
                report, verdict = gated_run(export, folder, tmp / f"{name}-{v}-{source}", s)
                p = report["parity"]["variants"][v]
                print(
                    f"| {name} | {v} | {source} | {p['max_rel_logit_diff']:.2e} | "
                    f"{p['first_token_agreement']:.2f} | {p['greedy_agreement']:.2f} | {verdict} |",
                    flush=True,
                )
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
