"""The checks that need a CUDA GPU, run in one go on a lent device; the figures as a Markdown table.

    scripts/gpu-check.sh [OUT]          (OUT: default runs/gpu-check; needs this repository's tests/)

1. the `gpu`-marked tests (pytest -m gpu);
2. `lsd-edge memory recipes/qwen0.5b.toml --measure` at the real sizes with random weights (the real
   models' published config.json values, written offline by tests/realshape.py), beside the estimate;
3. the embedded default (recipes/tiny.toml) end to end on CUDA with bf16 autocast;
4. the ONNX export of that student for the CUDA execution provider (`--target cuda`, parity gated);
5. the student stages again under DeepSpeed ZeRO-3 (recipes/accelerate/zero3.yaml, 1 process).

A check that fails is reported and the next one runs; the script exits 1 if any failed, and 2 at
once where CUDA is not available. Standard library only, so it runs under any Python with torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = 2


@dataclass
class Check:
    name: str
    command: list[str]
    timeout: int
    ok: bool = False
    seconds: float = 0.0
    figures: dict[str, str] = field(default_factory=dict)
    tail: str = ""


def cuda_device(python: str) -> str | None:
    """The first GPU's name, or None where torch sees no CUDA."""
    code = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    p = subprocess.run([python, "-c", code], capture_output=True, text=True)
    name = p.stdout.strip()
    return name or None


def run(check: Check) -> Check:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(check.command, cwd=REPO, capture_output=True, text=True, timeout=check.timeout)
        check.ok = p.returncode == 0
        check.tail = (p.stdout + p.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        check.tail = f"timed out after {check.timeout} s"
    check.seconds = time.perf_counter() - t0
    return check


def pytest_figures(tail: str) -> dict[str, str]:
    last = [
        line for line in tail.splitlines() if " passed" in line or " skipped" in line or " failed" in line
    ]
    return {"result": last[-1].strip("= ")} if last else {}


def memory_figures(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    m = json.loads(path.read_text())
    measured = m.get("measured", {})
    est = {row["stage"]: row["total"] for row in m.get("estimate", [])}
    out = {f"estimate {k}": f"{v / 2**30:.1f} GiB" for k, v in est.items()}
    shown = {
        "peak_bytes": lambda v: f"{v / 2**30:.1f} GiB",
        "step_seconds": lambda v: f"{v:.2f} s",
        "tokens_per_s": lambda v: f"{v:,.0f}",
        "tflops": lambda v: f"{v:.1f}",
        "mfu": lambda v: f"{v:.1%}",
    }
    for key, fmt in shown.items():
        if measured.get(key) is not None:
            out[key] = fmt(measured[key])
    return out


def report_figures(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    r = json.loads(path.read_text())
    out = {f"{who} accuracy": f"{r[who]['accuracy']:.1%}" for who in ("teacher", "student") if who in r}
    for stage in r.get("stages", []):
        if "tokens_per_s" in stage:
            out[f"{stage['name']} tokens/s"] = f"{stage['tokens_per_s']:,.0f}"
    return out


def export_figures(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    r = json.loads(path.read_text())
    flat = {k: v for k, v in r.items() if isinstance(v, int | float | str | bool)}
    return {k: str(v) for k, v in list(flat.items())[:6]}


def markdown(device: str, checks: list[Check]) -> str:
    lines = [f"GPU check on {device}", "", "| check | result | seconds | figures |", "|---|---|---:|---|"]
    for c in checks:
        figures = "; ".join(f"{k}: {v}" for k, v in c.figures.items()) or "-"
        lines.append(f"| {c.name} | {'ok' if c.ok else 'FAILED'} | {c.seconds:.0f} | {figures} |")
    failed = [c for c in checks if not c.ok]
    for c in failed:
        lines += ["", f"{c.name} failed; its last output:", "", "```", c.tail.strip(), "```"]
    return "\n".join(lines) + "\n"


def plan(python: str, out: Path) -> list[tuple[Check, object]]:
    lsd = [python, "-m", "lsd_edge"]
    configs = out / "real-configs"
    write_configs = (
        "import sys; sys.path.insert(0, '.'); from pathlib import Path; "
        f"from tests.realshape import write_real_configs; write_real_configs(Path('{configs}'))"
    )
    tiny = out / "tiny"
    memory_json = out / "memory.json"
    sets = ["--set", f"teacher.path={configs / 'llava-interleave-qwen-7b-hf'}"]
    sets += ["--set", f"student.llm={configs / 'Qwen1.5-0.5B-Chat'}", "--set", "run.device=cuda"]
    tiny_sets = ["--set", f"run.output_dir={tiny}", "--set", "run.device=cuda", "--set", "run.precision=bf16"]
    short_stages = [x for i in range(3) for x in ("--set", f"stages[{i}].max_steps=50")]
    return [
        (Check("gpu tests", [python, "-m", "pytest", "-q", "-m", "gpu", "tests"], 1800), pytest_figures),
        (Check("real-size configs", [python, "-c", write_configs], 120), None),
        (
            Check(
                "memory qwen0.5b --measure",
                [*lsd, "memory", "recipes/qwen0.5b.toml", "--measure", "--json", str(memory_json), *sets],
                1800,
            ),
            lambda c: memory_figures(memory_json),
        ),
        (
            Check(
                "tiny end to end (CUDA, bf16)",
                [*lsd, "distill", "recipes/tiny.toml", "--restart", *tiny_sets],
                3600,
            ),
            lambda c: report_figures(tiny / "report.json"),
        ),
        (
            Check(
                "ONNX export, CUDA EP",
                [*lsd, "export", str(tiny / "student"), "--target", "cuda", "--output", str(out / "onnx")],
                1800,
            ),
            lambda c: export_figures(out / "onnx" / "export_report.json"),
        ),
        (
            # after the export: --restart retrains the student (the cached teacher is reused)
            Check(
                "tiny student stages under DeepSpeed ZeRO-3 (CUDA, 1 process)",
                [
                    python,
                    "-m",
                    "accelerate.commands.accelerate_cli",
                    "launch",
                    "--config_file",
                    "recipes/accelerate/zero3.yaml",
                    "--num_processes",
                    "1",
                    "-m",
                    "lsd_edge",
                    "distill",
                    "recipes/tiny.toml",
                    "--restart",
                    *tiny_sets,
                    *short_stages,
                ],
                3600,
            ),
            lambda c: report_figures(tiny / "report.json"),
        ),
    ]


def main(argv: list[str]) -> int:
    python = sys.executable
    out = Path(argv[0]) if argv else REPO / "runs" / "gpu-check"
    device = cuda_device(python)
    if device is None:
        print(
            "error: gpu-check needs a CUDA GPU, and torch sees none here (torch.cuda.is_available() is "
            "False); run it on the GPU machine",
            file=sys.stderr,
        )
        return NO_CUDA
    out.mkdir(parents=True, exist_ok=True)
    checks = []
    for check, figures in plan(python, out):
        print(f"gpu-check: {check.name} ...", flush=True)
        run(check)
        if figures is not None:
            check.figures = figures(check) if check.name != "gpu tests" else figures(check.tail)
        checks.append(check)
    table = markdown(device, checks)
    (out / "gpu-check.md").write_text(table)
    print(table)
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
