"""Issue 26's real-size figures: the ONNX int8 and int4 students of `qwen0.5b` and each edge
architecture, on 1 and 2 threads, in one run on one machine: time to first token in parts (vision
encoder / prefill / first token), decode tokens/s, peak memory, size, visual tokens, parameters.

    python scripts/edge_figures.py --out runs/edge-figures            # about 30-40 min on 2 cores
    python scripts/edge_figures.py --arch qwen0.5b --arch qwen0.5b-edge-168 --threads 2 --repeats 1

Each architecture is exported once with random weights (`lsd-edge bench --arch`'s cache, runs/bench-arch:
fp32, int8 and int4; minutes and several GB of memory each, reused by later runs), then each thread
count is one `lsd-edge bench --onnx <the exports> --variant int8 --variant int4 --threads T` (ONNX rows
only: the PyTorch fp32 rows `--arch` adds are not part of these figures). Writes bench-<T>t.json and
.md per thread count and figures.md: one table, each edge row's TTFT against `qwen0.5b`'s at the same
variant and threads (the issue's target: at most 0.25x on 2 threads).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from lsd_edge.bench.plan import BenchSettings
from lsd_edge.bench.report import BenchRow, fmt_split, to_markdown, write_result
from lsd_edge.bench.runner import bench, ensure_arch_export
from lsd_edge.models import archs
from lsd_edge.progress import RichReporter
from lsd_edge.workspace import RUNS_ROOT, arch_exports_dir

EDGE = ("qwen0.5b", "qwen0.5b-edge-b16", "qwen0.5b-edge-224", "qwen0.5b-edge-168")


def exports(names: list[str], cache: Path, threads: int) -> dict[Path, str]:
    """Each architecture's cached ONNX export (made when missing): {folder: arch name}."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="edge-figures-") as tmp:
        for name in names:
            folder = ensure_arch_export(archs.ARCHS[name], cache, 0, threads, Path(tmp), RichReporter())
            out[folder.resolve()] = name
    return out


def onnx_settings(variants: list[str], threads: int, prompts: int, repeats: int, new_tokens: int):
    """The bench's settings for ONNX rows of speed alone: one warm-up, no accuracy pass."""
    return BenchSettings(
        variants=variants, threads=threads, prompts=prompts, repeats=repeats, max_new_tokens=new_tokens,
        warmup=1, accuracy=False, copy_mb=256,
    )  # fmt: skip


def table(rows: list[tuple[int, BenchRow]], names: dict[Path, str]) -> str:
    """One Markdown table over every thread count, with each row's TTFT against qwen0.5b's."""
    arch = {id(r): names[Path(r.path).resolve()] for _, r in rows}
    base = {(t, r.precision): r.ttft_ms_p50 for t, r in rows if arch[id(r)] == "qwen0.5b"}
    lines = [
        "| architecture | visual tokens | params vision / LLM | ONNX | threads | TTFT p50 ms | "
        "vision / prefill / first token ms | TTFT vs qwen0.5b | decode tok/s | peak MB | size MB |",
        "|---|---:|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    order = {name: i for i, name in enumerate(EDGE)}
    for t, r in sorted(rows, key=lambda tr: (order.get(arch[id(tr[1])], 99), tr[1].precision, tr[0])):
        g = r.params_by_group or {}
        vs = base.get((t, r.precision))
        ratio = "n/a" if not vs else f"{r.ttft_ms_p50 / vs:.2f}x"
        lines.append(
            f"| {arch[id(r)]} | {r.visual_tokens} | {g.get('vision', 0) / 1e6:.0f}M / {g.get('llm', 0) / 1e6:.0f}M "
            f"| {r.precision} | {t} | {r.ttft_ms_p50:,.0f} | {fmt_split(r)} | {ratio} | "
            f"{r.decode_tokens_per_s:,.1f} | {r.peak_mem_mb:,.0f} | {r.size_mb:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", default=None, help=f"(repeatable; default: {', '.join(EDGE)})")
    ap.add_argument(
        "--threads", type=int, action="append", default=None, help="(repeatable; default: 1 and 2)"
    )
    ap.add_argument("--variant", action="append", default=None, help="(repeatable; default: int8 and int4)")
    ap.add_argument("--prompts", type=int, default=4, help="ShapesVQA questions, each with one image")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--cache", type=Path, default=None, help="the exports (default: runs/bench-arch)")
    ap.add_argument("--out", type=Path, default=Path("runs/edge-figures"))
    a = ap.parse_args()
    names = a.arch or list(EDGE)
    threads = a.threads or [1, 2]
    cache = a.cache or arch_exports_dir(RUNS_ROOT)
    folders = exports(names, cache, max(threads))
    a.out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[int, BenchRow]] = []
    for t in threads:
        settings = onnx_settings(a.variant or ["int8", "int4"], t, a.prompts, a.repeats, a.max_new_tokens)
        print(
            f"bench on {t} thread(s): {len(folders)} exports x {len(settings.variants)} variants", flush=True
        )
        result = bench(
            onnx=list(folders), settings=settings, reporter=RichReporter(), command=f"edge_figures.py {t}t"
        )
        write_result(result, a.out / f"bench-{t}t.json")
        (a.out / f"bench-{t}t.md").write_text(to_markdown(result), encoding="utf-8")
        rows += [(t, r) for r in result.results]
    machine = result.machine["label"]
    md = f"Machine: {machine}. Random weights at real size, {a.prompts} prompts x {a.repeats} repeats, "
    md += f"{a.max_new_tokens} new tokens.\n\n" + table(rows, folders)
    (a.out / "figures.md").write_text(md, encoding="utf-8")
    print(md)


if __name__ == "__main__":
    main()
