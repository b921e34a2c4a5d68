"""A bench's results as data: rows and ratios (dataclasses) -> JSON (schema version 1), a chart, Markdown.

The rich table is the CLI's (`lsd_edge.cli.render`); everything here is plain data and files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lsd_edge.files import write_json

SCHEMA_VERSION = 1
# What every row of the JSON holds (None where a figure does not apply: accuracy with random weights).
RESULT_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "role": (str,),
    "backend": (str,),
    "precision": (str,),
    "device": (str,),
    "decode_tokens_per_s": (float,),
    "prefill_tokens_per_s": (float,),
    "e2e_tokens_per_s": (float,),
    "ttft_ms_p50": (float,),
    "ttft_ms_p90": (float,),
    "peak_mem_mb": (float,),
    "size_mb": (float,),
    "params": (int,),
    "accuracy": (float, type(None)),
    "roofline_fraction": (float, type(None)),
}
# Added within schema version 1, so checked only where present: the time to first token in parts
# (medians in ms; None where a row has no such part: vision without an image, a llama.cpp row's
# vision and first token) and the visual tokens one image becomes.
SPLIT_FIELDS = ("vision_ms_p50", "prefill_ms_p50", "first_token_ms_p50")
OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {
    **{k: (float, type(None)) for k in SPLIT_FIELDS},
    "visual_tokens": (int, type(None)),
}
MACHINE_FIELDS = ("label", "cores", "memory_gib", "gpu", "bandwidth_gb_s")


@dataclass
class BenchRow:
    """One measured row; see RESULT_FIELDS for the ones the JSON schema promises."""

    name: str
    label: str  # name (backend precision): unique within a bench
    role: str
    backend: str
    precision: str
    device: str
    path: str | None
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    e2e_tokens_per_s: float
    ttft_ms_p50: float
    ttft_ms_p90: float
    peak_mem_mb: float
    size_mb: float
    params: int
    accuracy: float | None
    roofline_fraction: float | None
    roofline_tokens_per_s: float | None
    weight_mb_per_token: float
    peak_rss_mb: float
    cuda_max_allocated_mb: float | None
    nvml_peak_mb: float | None
    accuracy_samples: int
    prompt_tokens: int
    new_tokens: int
    runs: int
    load_s: float
    # CPU time / (wall time x threads) during the timed runs (a llama.cpp row: over llama-bench's whole
    # runs): < 1 when the cores are shared
    cpu_share: float
    threads: int
    pid: int
    torch_imported: bool
    samples: list[dict] = field(default_factory=list)
    # TTFT p50 in parts, each its own median (`lsd_edge.bench.worker.split_p50`): vision encoder and
    # projector, prefill (embedding and decoder over the prompt), first token (the rest: preparing
    # the prompt and image, picking the token)
    vision_ms_p50: float | None = None
    prefill_ms_p50: float | None = None
    first_token_ms_p50: float | None = None
    visual_tokens: int | None = None  # per image, from the model's config (None: not known)
    params_by_group: dict[str, int] | None = None  # vision, projector, llm, total


@dataclass
class BenchResult:
    machine: dict[str, Any]
    settings: dict[str, Any]
    results: list[BenchRow]
    ratios: list[dict[str, Any]]
    source: str
    run: Path | None = None  # the run folder benchmarked when no model was given
    notes: list[str] = field(default_factory=list)
    command: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "command": self.command,
            "source": self.source,
            "run": None if self.run is None else str(self.run),
            "machine": self.machine,
            "settings": self.settings,
            "results": [asdict(r) for r in self.results],
            "ratios": self.ratios,
            "notes": self.notes,
        }


def check_schema(data: dict[str, Any]) -> list[str]:
    """Problems of a bench JSON against schema version 1 (empty when it conforms)."""
    problems = []
    if data.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version {data.get('schema_version')!r} is not {SCHEMA_VERSION}")
    machine = data.get("machine")
    if not isinstance(machine, dict):
        problems.append("machine: not an object")
    else:
        problems += [f"machine.{k}: missing" for k in MACHINE_FIELDS if k not in machine]
    results = data.get("results")
    if not isinstance(results, list) or not results:
        return problems + ["results: not a non-empty list"]
    for i, row in enumerate(results):
        for k, types in (RESULT_FIELDS | OPTIONAL_FIELDS).items():
            if k not in row:
                if k in RESULT_FIELDS:
                    problems.append(f"results[{i}].{k}: missing")
            elif not isinstance(row[k], types) or isinstance(row[k], bool):
                problems.append(f"results[{i}].{k}: {type(row[k]).__name__}, not {types[0].__name__}")
    return problems


def write_result(result: BenchResult, path: Path) -> Path:
    write_json(path, result.as_dict())
    return Path(path)


# The parts of the time to first token, in the order they are stacked, with their chart colours.
PARTS = (
    ("vision", "vision_ms_p50", "#8172b2"),
    ("prefill", "prefill_ms_p50", "#dd8452"),
    ("first token", "first_token_ms_p50", "#937860"),
)


def ttft_parts(row: BenchRow) -> list[tuple[str, float]]:
    """(part, ms) of a row's TTFT that it measured, in PARTS order; a row without a split: [("TTFT", p50)]."""
    parts = [(name, v) for name, key, _ in PARTS if (v := getattr(row, key)) is not None]
    return parts or [("TTFT", row.ttft_ms_p50)]


def fmt_split(row: BenchRow) -> str:
    """ "vision / prefill / first token" in ms, "-" for a part the row does not have."""
    if row.prefill_ms_p50 is None:
        return "n/a"
    return " / ".join("-" if (v := getattr(row, key)) is None else f"{v:,.1f}" for _, key, _ in PARTS)


def _ttft_panel(ax, rows: list[BenchRow], y) -> None:
    """TTFT p50 per row as stacked parts (vision, prefill, first token)."""
    colours = {name: c for name, _, c in PARTS}
    seen = set()
    for i, r in enumerate(rows):
        left = 0.0
        for name, v in ttft_parts(r):
            label = None if name in seen else name
            seen.add(name)
            ax.barh(y[i], v, left=left, color=colours.get(name, "#999999"), label=label)
            left += v
        ax.text(left, y[i], f" {r.ttft_ms_p50:,.0f} ms", va="center", fontsize=8)
    ax.set_xlabel("TTFT p50 ms: vision / prefill / first token (lower is better)")
    ax.set_xlim(0, max(r.ttft_ms_p50 for r in rows) * 1.35)
    ax.legend(fontsize=7, loc="lower right")


def plot(result: BenchResult, path: Path) -> Path:
    """Decode tokens/s, the time to first token in parts and peak memory per row, accuracy and
    roofline fraction written on the decode bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.results
    labels = [f"{r.name}\n{r.backend} {r.precision}" for r in rows]
    y = np.arange(len(rows))
    colors = [
        "#c44e52" if r.role == "teacher" else "#4c72b0" if r.backend == "torch" else "#55a868" for r in rows
    ]
    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(17, 1.4 + 0.7 * len(rows)), sharey=True)
    speed = [r.decode_tokens_per_s for r in rows]
    ax1.barh(y, speed, color=colors)
    for i, r in enumerate(rows):
        acc = "acc n/a" if r.accuracy is None else f"acc {100 * r.accuracy:.1f}%"
        roof = "" if r.roofline_fraction is None else f", {fmt_percent(r.roofline_fraction)} of roofline"
        ax1.text(speed[i], i, f" {acc}{roof}", va="center", fontsize=8)
    ax1.set_yticks(y, labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("decode tokens/s (higher is better)")
    ax1.set_xlim(0, max(speed) * 1.6)
    _ttft_panel(ax3, rows, y)
    mem = [r.peak_mem_mb for r in rows]
    ax2.barh(y, mem, color=colors)
    for i, m in enumerate(mem):
        ax2.text(m, i, f" {m:,.0f} MB", va="center", fontsize=8)
    ax2.set_xlabel("peak memory MB (lower is better)")
    ax2.set_xlim(0, max(mem) * 1.3)
    fig.suptitle(f"lsd-edge bench: {result.machine['label']}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fmt_percent(f: float | None) -> str:
    if f is None:
        return "n/a"
    return f"{100 * f:.1f}%" if f < 0.1 else f"{100 * f:.0f}%"


def to_markdown(result: BenchResult) -> str:
    """The table and the ratio lines as Markdown, for docs and reports."""
    head = (
        "| model | backend | decode tok/s | prefill tok/s | TTFT p50 / p90 ms "
        "| TTFT split ms (vision / prefill / first token) | visual tokens | e2e tok/s | peak MB "
        "| size MB | params | accuracy | roofline |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in result.results:
        tokens = "n/a" if r.visual_tokens is None else str(r.visual_tokens)
        lines.append(
            f"| {r.name} | {r.backend} {r.precision} | {r.decode_tokens_per_s:,.1f} | "
            f"{r.prefill_tokens_per_s:,.0f} | {r.ttft_ms_p50:,.1f} / {r.ttft_ms_p90:,.1f} | "
            f"{fmt_split(r)} | {tokens} | "
            f"{r.e2e_tokens_per_s:,.1f} | {r.peak_mem_mb:,.0f} | {r.size_mb:,.2f} | {r.params:,} | "
            f"{fmt_percent(r.accuracy)} | {fmt_percent(r.roofline_fraction)} |"
        )
    lines.append("")
    for q in result.ratios:
        delta = "n/a" if q["accuracy_delta"] is None else f"{100 * q['accuracy_delta']:+.1f} points"
        lines.append(
            f"- {q['name']} vs {q['vs']}: decode **{q['decode_speedup']:.2f}x**, peak memory "
            f"{q['memory_ratio']:.2f}x, size {q['size_ratio']:.3f}x, accuracy {delta}"
        )
    return "\n".join(lines) + "\n"
