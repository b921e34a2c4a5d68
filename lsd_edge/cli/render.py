"""Every rich table and summary line the commands print: results in, renderables out.

Commands stay thin: they call one library function and hand its result to one function here. Each
function returns what to print, in order (a table, or lines of console markup).
"""

from __future__ import annotations

import json
from typing import Any

from rich import box
from rich.console import RenderableType
from rich.table import Table
from rich.tree import Tree

from lsd_edge.bench.report import BenchResult, fmt_percent, fmt_split


def tree(label: str, data: Any, node: Tree | None = None) -> Tree:
    """A resolved recipe (or any JSON) as a tree: tables as branches, values as leaves."""
    node = node or Tree(f"[bold]{label}")
    if isinstance(data, dict):
        for k, v in data.items():
            if isinstance(v, (dict, list)) and v and (isinstance(v, dict) or isinstance(v[0], dict)):
                tree(k, v, node.add(f"[cyan]{k}"))
            else:
                node.add(f"[cyan]{k}[/cyan] = {json.dumps(v)}")
    elif isinstance(data, list):
        for i, v in enumerate(data):
            name = v.get("name", i) if isinstance(v, dict) else i
            tree(str(i), v, node.add(f"[cyan][{i}][/cyan] {name}"))
    return node


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def percent(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


# ------------------------------------------------------------------------------------ recipes, memory


def memory_table(rows) -> Table:
    """`lsd_edge.train.memory.StepMemory` rows: each stage's estimated peak per process."""
    first = rows[0]
    unit, size = ("GiB", 2**30) if max(m.total for m in rows) >= 2**30 else ("MiB", 2**20)
    where = "CUDA, bf16 autocast" if first.device == "cuda" else "CPU, fp32"
    t = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        title=f"estimated peak memory per process, {unit} ({where})",
        caption=f"stud/teach: weights; t.fwd: the teacher's forward; gen: on-policy generation. Worst case: every sample "
        f"{first.seq_len} tokens, one image, all other tokens answers. *: activation checkpointing",
    )
    cols = {
        "stud": "student_weights",
        "grads": "gradients",
        "adamw": "optimizer",
        "teach": "teacher_weights",
        "activ": "activations",
        "logit": "logits",
        "t.fwd": "teacher_forward",
        "gen": "generation",
    }
    t.add_column("stage")
    t.add_column("batch", justify="right")
    for c in list(cols) + ["total"]:
        t.add_column(c, justify="right")
    for m in rows:
        t.add_row(
            m.stage + ("*" if m.checkpointing else ""),
            str(m.batch_size),
            *(f"{getattr(m, f) / size:.2f}" for f in cols.values()),
            f"[bold]{m.total / size:.2f}",
        )
    return t


def measured_table(m, estimate_total: int, stage: str) -> Table:
    """One measured step (`lsd_edge.train.measure.StepMeasurement`) against its estimate."""
    t = Table(title=f"measured: stage {stage}, {m.device}, random weights, synthetic worst-case batches")
    for col in ("peak memory", "estimate", "estimate / measured", "step", "tokens/s", "TFLOPS", "MFU"):
        t.add_column(col, justify="right")
    t.add_row(
        fmt_bytes(m.peak_bytes),
        fmt_bytes(estimate_total),
        f"{estimate_total / m.peak_bytes:.2f}",
        f"{m.step_seconds:.3f} s",
        f"{m.tokens_per_s:,.0f}",
        f"{m.tflops:.2f}",
        "n/a" if m.mfu is None else f"{100 * m.mfu:.1f}%",
    )
    return t


def model_info_lines(path, i) -> list[RenderableType]:
    t = Table(title=str(path))
    t.add_column("group")
    t.add_column("parameters", justify="right")
    for g, n in i.params.items():
        t.add_row(g, f"{n:,}")
    return [
        t,
        f"size on disk {i.size_mb:.2f} MB, dtype {i.dtype}, LLM {i.llm}, vision {i.vision}, "
        f"vocab rows {i.vocab_size} (tokenizer {i.tokenizer_size}), {i.image_tokens} visual tokens per image",
        f"vision tower: {i.sight.describe()}",
    ]


def models_table(teacher, student) -> Table:
    """Teacher and student `ModelShape`s side by side: how each sees, parameters per group."""
    t = Table(title="models (from their configs)", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("model", "visual tokens", "vision tower", "vision", "projector", "LLM", "total", "x teacher"):
        t.add_column(col, justify="left" if col in ("model", "vision tower") else "right")
    for name, m in (("teacher", teacher), ("student", student)):
        p = m.params
        t.add_row(
            name,
            str(m.image_tokens),
            m.sight.describe(),
            *(f"{p[g]:,}" for g in ("vision", "projector", "llm", "total")),
            f"{p['total'] / max(1, teacher.params['total']):.2f}",
        )
    return t


# -------------------------------------------------------------------------------------- training


def distill_report(report: dict[str, Any]) -> list[RenderableType]:
    t = Table(title=f"lsd-edge distill: {report['recipe']}")
    for col in ("model", "accuracy", "parameters", "size MB", "samples skipped"):
        t.add_column(col, justify="left" if col == "model" else "right")
    teacher, student = report["teacher"], report["student"]
    t.add_row("teacher", percent(teacher["accuracy"]), f"{teacher['params']:,}", f"{teacher['size_mb']:.2f}")
    for s in report["stages"]:
        bad = s.get("bad_samples") or {}
        skipped = f"{bad.get('total', 0):,}" if bad else ""
        t.add_row(f"  after {s['name']} ({s['kind']})", percent(s["accuracy"]), "", "", skipped)
    t.add_row(
        "[bold]student", percent(student["accuracy"]), f"{student['params']:,}", f"{student['size_mb']:.2f}"
    )
    ratio = student["params"] / max(1, teacher["params"])
    return [
        t,
        f"student: {student['path']} ({ratio:.2f}x the teacher's parameters); "
        f"report: {report['output_dir']}/report.json; {report['seconds']:.0f}s on {report['device']}",
    ]


def eval_result(model_dir, res) -> Table:
    t = Table(title=f"exact match: {model_dir}")
    t.add_column("type")
    t.add_column("n", justify="right")
    t.add_column("accuracy", justify="right")
    for k, v in res.by_type.items():
        t.add_row(k, str(v["n"]), f"{100 * v['accuracy']:.1f}%")
    t.add_row("[bold]all", str(res.n), f"[bold]{100 * res.accuracy:.1f}%")
    return t


def ablation(name: str, result: dict[str, Any]) -> list[RenderableType]:
    t = Table(title=f"ablation: {name}")
    t.add_column("scheme")
    t.add_column("accuracy", justify="right")
    t.add_column("steps", justify="right")
    for scheme, row in result["schemes"].items():
        t.add_row(scheme, f"{100 * row['accuracy']:.1f}%", str(row["steps"]))
    t.add_row("teacher", percent(result["teacher"].get("accuracy")), "")
    return [t, f"chart: {result['chart']}"]


def loss_bench(res, tokens: int, vocab: int, chunk: int) -> list[RenderableType]:
    t = Table(title=f"KL loss, {tokens:,} positions x {vocab:,} rows, on {res.device}")
    t.add_column("path")
    t.add_column("peak MB", justify="right")
    t.add_column("ms", justify="right")
    t.add_row("plain", f"{res.plain['peak_mb']:,.0f}", f"{res.plain['ms']:,.0f}")
    t.add_row(f"chunked ({chunk})", f"{res.chunked['peak_mb']:,.0f}", f"{res.chunked['ms']:,.0f}")
    return [
        t,
        f"chunked / plain: memory {res.chunked['peak_mb'] / max(res.plain['peak_mb'], 1e-9):.1%}, "
        f"time {res.chunked['ms'] / max(res.plain['ms'], 1e-9):.2f}x; max relative difference "
        f"{res.max_rel_diff:.1e} (loss and gradients)",
    ]


def teacher_cache(m: dict[str, Any], stage: str) -> list[RenderableType]:
    pos = m["positions"]
    verb = "made" if m["built"] else "up to date"
    lines: list[RenderableType] = [
        f"[green]teacher cache {verb}[/green]: {m['folder']} — {m['samples']:,} samples, "
        f"{pos['response']:,} response + {pos['visual']:,} visual positions, {m['images']:,} images, "
        f"top-{m['top_k']} ({', '.join(m['parts'])})",
        f"{m['bytes'] / 2**20:,.1f} MB on disk, {m['bytes_per_position']:,.0f} bytes per cached position "
        f"({m['topk_bytes_per_position']} for the top-k and tail), made in {m['seconds']:.1f}s",
    ]
    if not m["used_by_stage"]:
        lines.append(f"[yellow]stage {stage} does not use it yet: set teacher_cache = 'auto' on it[/yellow]")
    return lines


def regenerated(m: dict[str, Any], stage: str) -> list[RenderableType]:
    verb = "wrote" if m["built"] else "up to date:"
    lines: list[RenderableType] = [
        f"[green]{verb} {m['path']}[/green]: {m['answers']:,} answers to {m['records']:,} records, "
        f"{m['changed']:,} differ from the reference, {m['kept_reference']:,} empty kept the reference"
    ]
    if not m["used_by_stage"]:
        lines.append(f"[yellow]stage {stage} does not use it yet: set regenerate = true on it[/yellow]")
    return lines


# ----------------------------------------------------------------------------------- export, bench


def export_report(report: dict[str, Any]) -> list[RenderableType]:
    sizes, variants = report["sizes_mb"], report["variants"]
    latest = " (the most recent run's student)" if report["picked_latest_run"] else ""
    t = Table(title=f"lsd-edge export: {report['output']}")
    t.add_column("graph")
    for v in variants:
        t.add_column(f"{v} MB", justify="right")
    for g in ("vision_encoder", "embed_tokens", "decoder_model_merged", "total"):
        cells = [f"{sizes[v][g]:.3f}" for v in variants]
        if len(variants) > 1:
            cells[-1] += f" ({100 * report['size_ratio'][g]:.0f}%)"
        t.add_row(f"[bold]{g}" if g == "total" else g, *cells)
    p = report["parity"]
    tm = report["timing_s"]
    dec = report.get("decoder", {}).get(report["default_variant"], {})
    made_by = "model builder" if dec.get("kv_cache") == "shared" else "traced"
    line = (
        f"export {tm['export']:.1f}s (trace {tm.get('trace', 0):.1f}s, quantize {tm.get('quantize', 0):.1f}s, "
        f"waiting for the model builder {tm.get('builder_wait', 0):.1f}s; decoder: {made_by}"
        f"{', ' + dec['reason'] if dec.get('reason') else ''})"
    )
    mem = report.get("peak_rss_mb")
    if mem:
        line += f", peak memory {mem['process'] / 1024:.1f} GiB (builder {mem['subprocess'] / 1024:.1f} GiB)"
    speed = report.get("speed")
    if speed:
        v = report["default_variant"]
        line += (
            f"; decode {speed[f'onnx_{v}']['decode_tokens_per_s']:.0f} tok/s ONNX {v} vs "
            f"{speed['torch']['decode_tokens_per_s']:.0f} tok/s PyTorch ({speed['onnx_vs_torch_decode']:.2f}x) "
            f"on {speed['machine']}"
        )
    return [
        f"model: {report['model_dir']}{latest}",
        t,
        f"parity on {p['variants']['fp32']['samples']} samples ({p['source']}): fp32 logits max rel diff "
        f"{p['max_rel_logit_diff']:.1e}, greedy agreement {100 * p['greedy_agreement']:.0f}%; accuracy PyTorch "
        f"{percent(p['accuracy_torch'])} vs ONNX {report['default_variant']} {percent(p['accuracy_onnx'])}",
        line,
        f"[green]parity gate passed[/green]; report: {report['output']}/export_report.json",
    ]


def bench_table(result: BenchResult) -> Table:
    s = result.settings
    t = Table(
        title=f"lsd-edge bench: {result.source}",
        box=box.SIMPLE_HEAD,
        caption=f"{result.machine['label']}; bandwidth {result.machine['bandwidth_gb_s']:.1f} GB/s; "
        f"{s['prompts']} prompts x {s['repeats']} repeats, {s['max_new_tokens']} new tokens, "
        f"{s['threads']} thread(s) per process",
    )
    heads = ("model", "decode\ntok/s", "prefill\ntok/s", "TTFT ms\np50 / p90", "TTFT split ms\nvis/pre/1st")
    for col in (
        *heads,
        "visual\ntokens",
        "e2e\ntok/s",
        "peak\nMB",
        "size\nMB",
        "params",
        "accuracy",
        "roof-\nline",
    ):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in result.results:
        name = f"[bold]{r.name}[/bold]" if r.role == "teacher" else r.name
        t.add_row(
            f"{name}\n[dim]{r.backend} {r.precision}[/dim]",
            f"{r.decode_tokens_per_s:,.1f}",
            f"{r.prefill_tokens_per_s:,.0f}",
            f"{r.ttft_ms_p50:,.1f} / {r.ttft_ms_p90:,.1f}",
            fmt_split(r),
            "n/a" if r.visual_tokens is None else str(r.visual_tokens),
            f"{r.e2e_tokens_per_s:,.1f}",
            f"{r.peak_mem_mb:,.0f}",
            f"{r.size_mb:,.2f}",
            count(r.params),
            fmt_percent(r.accuracy),
            fmt_percent(r.roofline_fraction),
        )
    return t


def bench_lines(result: BenchResult) -> list[str]:
    """The efficiency line of each row against the teacher, then the notes."""
    lines = []
    for q in result.ratios:
        delta = "n/a" if q["accuracy_delta"] is None else f"{100 * q['accuracy_delta']:+.1f} points"
        lines.append(
            f"{q['name']} vs {q['vs']}: decode [bold]{q['decode_speedup']:.2f}x[/bold], peak memory "
            f"{q['memory_ratio']:.2f}x, size {q['size_ratio']:.3f}x, accuracy {delta}"
        )
    return lines + [f"[yellow]{note}[/yellow]" for note in result.notes]


def demo_models(teacher, students: dict[str, Any]) -> Table:
    t = Table(title="lsd-edge demo")
    for col in ("", "backend", "model", "parameters", "peak RSS MiB"):
        t.add_column(col, justify="right" if col in ("parameters", "peak RSS MiB") else "left")
    rows = [("teacher", "PyTorch" if teacher.backend == "torch" else "ONNX", teacher)]
    rows += [("student", b, r) for b, r in students.items()]
    for column, backend, runner in rows:
        i = runner.info()
        params = f"{i['params']:,}" if i.get("params") else "?"
        t.add_row(column, backend, i["path"], params, f"{i['memory']['peak_rss_mib']:.1f}")
    return t


def _same_pixels(parity: dict[str, Any]) -> str:
    """llama.cpp's exact match from PyTorch's pixels, where the report has it (older reports do not)."""
    same = parity.get("accuracy_llama_cpp_same_pixels")
    return "" if same is None else f", {percent(same)} from PyTorch's pixels"


def gguf_report(report: dict[str, Any]) -> list[RenderableType]:
    t = Table(title=f"lsd-edge export --gguf: {report['output']}")
    for col in ("file", "architecture", "tensors", "MB"):
        t.add_column(col, justify="left" if col in ("file", "architecture") else "right")
    for name, f in report["files"].items():
        t.add_row(name, f["architecture"], str(f["tensors"]), f"{f['mb']:.3f}")
    p, quant = report["parity"], report["settings"]["quant"]
    b = report["gate"]["bound"][quant]
    accuracy = report["settings"].get("note") or "no eval data: accuracy not compared"
    if p["accuracy_torch"] is not None:
        accuracy = (
            f"exact match on {p['accuracy_samples']} eval questions: PyTorch {percent(p['accuracy_torch'])}, "
            f"llama.cpp {percent(p['accuracy_llama_cpp'])} resizing the images itself (at most "
            f"{100 * b['max_accuracy_drop']:g} points below){_same_pixels(p)}; same answers from the same "
            f"pixels {100 * p['answer_agreement']:.1f}% (floor {100 * b['min_answer_agreement']:g}%)"
        )
    return [
        f"model: {report['model_dir']} ({quant}, mmproj {report['settings']['mmproj']})",
        t,
        f"gate judged by {p['judged_by']}; {accuracy}",
        f"parity on {p['samples']} prompts ({p['source']}): llama.cpp logits max rel diff "
        f"{p['max_rel_logit_diff']:.1e} (bound {b['max_rel_logit_diff']:g}), first token "
        f"{100 * p['first_token_agreement']:.0f}% (floor {100 * b['min_first_token_agreement']:.0f}%), "
        f"greedy tokens kept {100 * p['greedy_token_agreement']:.0f}% (floor "
        f"{100 * b['min_greedy_agreement']:.0f}%), whole answers {100 * p['greedy_agreement']:.0f}%, "
        f"tokenizer agreement {100 * p['tokenizer']['agreement']:.0f}%",
        f"[green]parity gate passed[/green]; report: {report['output']}/export_report.json; "
        f"Ollama: cd {report['output']} && ollama create NAME -f Modelfile",
    ]
