"""What each quantized ONNX variant's own outputs look like against PyTorch on the models the tests
export, with and without eval data: the figures the export gate's per-variant bounds
(`lsd_edge.export.onnx.parity.VARIANT_BOUNDS`) were set from.

    python scripts/gate_bounds.py                # every model, int8, int4 and fp16
    python scripts/gate_bounds.py --variants int8 --models lively

Prints one Markdown row per model, variant and sample source: the largest relative logit difference
(teacher-forced on PyTorch's tokens, every prompt position and decode step), the share of samples
whose first greedy token and whose whole greedy answer equal PyTorch's, and the gate's verdict.
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
from lsd_edge.export.onnx.pipeline import ExportSettings, export  # noqa: E402
from lsd_edge.models.build import build_tiny_model, build_tiny_processor  # noqa: E402
from lsd_edge.models.load import save_model  # noqa: E402
from lsd_edge.recipe.schema import TinyConfig, VisionSize  # noqa: E402
from tests.helpers import TINY_VISION, lively_student  # noqa: E402

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
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--variants", nargs="*", default=["int8", "int4", "fp16"])
    ap.add_argument("--samples", type=int, default=16, help="parity samples (ExportSettings' default)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="gate-bounds-"))
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
                out = tmp / f"{name}-{v}-{source}"
                try:
                    report, verdict = export(folder, out, s).report, "passed"
                except ExportError as e:
                    report = json.loads(
                        (out.with_name(out.name + ".failed") / "export_report.json").read_text()
                    )
                    verdict = f"refused: {e}"
                p = report["parity"]["variants"][v]
                print(
                    f"| {name} | {v} | {source} | {p['max_rel_logit_diff']:.2e} | "
                    f"{p['first_token_agreement']:.2f} | {p['greedy_agreement']:.2f} | {verdict} |",
                    flush=True,
                )
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
