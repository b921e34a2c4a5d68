"""Issue 26's side-by-side at real size: llama.cpp's `llama-mtmd-cli` beside lsd-edge's ONNX students,
the same architectures with random weights, in alternating rounds on one machine.

    python scripts/mtmd_figures.py --llama-cpp-bin LLAMA_CPP/build/bin --out runs/mtmd-figures
    python scripts/mtmd_figures.py --llama-cpp-bin DIR --arch qwen0.5b --arch qwen0.5b-edge-168 --threads 2

For each architecture (default: `qwen0.5b` and the three edge students of scripts/edge_figures.py):
1. the GGUF files, written by lsd-edge's own writers (`lsd_edge.export.gguf.llm.write_llm` and
   `.vision.write_mmproj`, what `lsd-edge export --gguf` writes) from the random-weight model of
   `--arch` (seed 0): the Qwen1.5-0.5B LLM once in Q8_0 and in Q4_0 (every architecture here has the
   same LLM and tokenizer) and each tower's mmproj (q8_0 by default; f16 with `--mmproj-quant f16`),
   into --gguf-dir, kept for later runs. Not through `lsd-edge export --gguf`: its parity gate runs
   the PyTorch model and llama.cpp side by side on eval prompts, which a random-weight model at real
   size does not need for a speed figure (the gate is tested on trained tiny models).
2. the ONNX exports (`lsd-edge bench --arch`'s cache, runs/bench-arch, as edge_figures.py makes them).
3. rounds (--rounds, the order of the two sides swapped each round): on each thread count,
   llama-mtmd-cli answers the first --mtmd-prompts ShapesVQA questions (one image each; the bench's
   generated set) with each --llm-quant LLM (Q8_0 and Q4_0), greedy, `-n` new tokens, and `lsd-edge
   bench --onnx <export> --variant V` answers --prompts questions x --repeats at the same bits (int8
   for Q8_0, int4 for Q4_0; int4 with the runner's default prefill, the int8 GEMM).
Writes raw/<arch>-<T>t-r<round>-{mtmd,onnx}.json and figures.md: per architecture, bits and threads,
llama.cpp's image encode, prompt eval and decode beside lsd-edge's vision, prefill and decode (each
side's best round of its medians), with the TTFT and prefill ratios. `--table-only` rebuilds
figures.md from raw/ (several runs, e.g. one per architecture, fill one table).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from statistics import median

import torch
from edge_figures import EDGE, exports, onnx_settings

from lsd_edge.bench.mtmd import run_mtmd
from lsd_edge.bench.plan import synthetic_prompts
from lsd_edge.bench.report import write_result
from lsd_edge.bench.runner import bench
from lsd_edge.data.shapes import vocabulary
from lsd_edge.export.gguf.llm import write_llm
from lsd_edge.export.gguf.vision import write_mmproj
from lsd_edge.models import archs
from lsd_edge.models.info import random_model
from lsd_edge.progress import RichReporter
from lsd_edge.workspace import RUNS_ROOT, arch_exports_dir

# lsd-edge's ONNX variant -> the llama.cpp LLM quant at equal bits
EQUAL_BITS = {"int8": "q8_0", "int4": "q4_0"}
LLM = "qwen05b"  # the LLM every architecture here shares (Qwen1.5-0.5B sizes, the arch tokenizer)
TARGET = 1.5  # issue 26: prefill at least 1.5x llama.cpp's at equal bits


def llm_path(gguf_dir: Path, quant: str) -> Path:
    return gguf_dir / f"{LLM}-{quant}.gguf"


def mmproj_path(gguf_dir: Path, arch: str, quant: str) -> Path:
    return gguf_dir / f"mmproj-{arch}-{quant}.gguf"


def write_ggufs(names: list[str], gguf_dir: Path, llm_quants: list[str], mm_quants: list[str]) -> None:
    """The LLM in each quant (from the first architecture's model) and each architecture's mmproj,
    written by lsd-edge's GGUF writers where missing."""
    gguf_dir.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        todo_llm = [q for q in llm_quants if not llm_path(gguf_dir, q).is_file()] if i == 0 else []
        todo_mm = [q for q in mm_quants if not mmproj_path(gguf_dir, name, q).is_file()]
        if not todo_llm and not todo_mm:
            continue
        config, processor = archs.ARCHS[name].build(vocabulary())
        model = random_model(config, torch.float32, torch.device("cpu"), 0)
        eos = processor.tokenizer.eos_token_id
        for q in todo_llm:
            print(f"writing {llm_path(gguf_dir, q)}", flush=True)
            tmp = llm_path(gguf_dir, q).with_suffix(".tmp")
            write_llm(model, processor, eos, tmp, q, LLM, f"--arch {name}").rename(llm_path(gguf_dir, q))
        for q in todo_mm:
            print(f"writing {mmproj_path(gguf_dir, name, q)}", flush=True)
            tmp = mmproj_path(gguf_dir, name, q).with_suffix(".tmp")
            write_mmproj(model, processor, tmp, q, name, f"--arch {name}").rename(
                mmproj_path(gguf_dir, name, q)
            )
        del model


def mtmd_side(a, name: str, threads: int, prompts: list[dict]) -> list[dict]:
    """llama-mtmd-cli on each LLM quant x mmproj quant x prompt: one record each."""
    binary = a.llama_cpp_bin / "llama-mtmd-cli"
    out = []
    for q in a.llm_quant:
        for mq in a.mmproj_quant:
            for p in prompts[: a.mtmd_prompts]:
                run = run_mtmd(
                    binary,
                    llm_path(a.gguf_dir, q),
                    mmproj_path(a.gguf_dir, name, mq),
                    Path(p["image"]),
                    p["question"],
                    threads,
                    a.max_new_tokens,
                )
                rec = run.as_dict() | {"arch": name, "llm_quant": q, "mmproj_quant": mq}
                print(
                    f"  mtmd {name} {q}/{mq} {threads}t: encode {rec['encode_ms']:.0f} ms, prefill "
                    f"{rec['prefill_ms']:.0f} ms / {rec['prompt_tokens']} tok, "
                    f"decode {rec['decode_tokens_per_s']:.1f} tok/s",
                    flush=True,
                )
                out.append(rec)
    return out


def onnx_side(a, folder: Path, threads: int, out: Path) -> None:
    variants = [v for v, q in EQUAL_BITS.items() if q in a.llm_quant]  # at the bits llama.cpp runs
    settings = onnx_settings(variants, threads, a.prompts, a.repeats, a.max_new_tokens)
    result = bench(
        onnx=[folder], settings=settings, reporter=RichReporter(), command=f"mtmd_figures.py {threads}t"
    )
    write_result(result, out)


def measure(a, folders: dict[Path, str]) -> None:
    raw = a.out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mtmd-figures-") as tmp:
        prompts = synthetic_prompts(max(a.prompts, a.mtmd_prompts), Path(tmp) / "shapes")
        for r in range(a.rounds):
            for t in a.threads:
                for folder, name in folders.items():
                    stem = raw / f"{name}-{t}t-r{r + a.first_round}"
                    sides = [x for x in ("mtmd", "onnx") if x in a.side]
                    sides = sides if r % 2 == 0 else sides[::-1]
                    for side in sides:
                        print(f"round {r + a.first_round}: {side} {name} on {t} thread(s)", flush=True)
                        if side == "mtmd":
                            recs = mtmd_side(a, name, t, prompts)
                            Path(f"{stem}-mtmd.json").write_text(json.dumps(recs, indent=1), encoding="utf-8")
                        else:
                            onnx_side(a, folder, t, Path(f"{stem}-onnx.json"))


def _best(values: list[float], low: bool) -> float:
    return min(values) if low else max(values)


def collect(raw: Path) -> tuple[dict, dict, dict]:
    """From raw/: per (arch, threads, bits) llama.cpp's and lsd-edge's figures (each round's medians,
    then the best round), and the machines' labels and load."""
    llama, onnx, machine = defaultdict(list), defaultdict(list), {}
    for f in sorted(raw.glob("*-mtmd.json")):
        groups = defaultdict(list)
        for rec in json.loads(f.read_text()):
            groups[(rec["arch"], rec["threads"], rec["llm_quant"], rec["mmproj_quant"])].append(rec)
        for key, recs in groups.items():
            llama[key].append({k: median(x[k] for x in recs) for k in MTMD_KEYS})
    for f in sorted(raw.glob("*-onnx.json")):
        data = json.loads(f.read_text())
        arch = f.name.rsplit("-", 3)[0]
        machine[f.name] = (
            data["machine"]["label"],
            data["machine"]["load_avg_start"],
            data["machine"]["load_avg_end"],
        )
        for row in data["results"]:
            threads = data["settings"]["threads"]
            onnx[(arch, threads, row["precision"])].append(
                {
                    "vision_ms": row["vision_ms_p50"],
                    "prefill_ms": row["prefill_ms_p50"],
                    "prompt_tokens": row["prompt_tokens"],
                    "prefill_tokens_per_s": row["prompt_tokens"] / (row["prefill_ms_p50"] / 1000),
                    "decode_tokens_per_s": row["decode_tokens_per_s"],
                    "ttft_ms": row["ttft_ms_p50"],
                }
            )
    return llama, onnx, machine


MTMD_KEYS = (
    "encode_ms",
    "prefill_ms",
    "prompt_tokens",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "ttft_ms",
)
LOW = {"encode_ms", "ttft_ms", "vision_ms", "prefill_ms", "prompt_tokens"}


def best(rounds: list[dict]) -> dict:
    return {k: _best([r[k] for r in rounds], k in LOW) for k in rounds[0]} | {"rounds": len(rounds)}


def table(llama: dict, onnx: dict) -> str:
    lines = [
        "| architecture | bits | threads | llama.cpp LLM / mmproj | encode ms | prefill ms (tokens) | "
        "prefill tok/s | decode tok/s | TTFT ms | lsd-edge ONNX | vision ms | prefill ms (tokens) | "
        "prefill tok/s | decode tok/s | TTFT ms | TTFT lsd-edge / llama.cpp | prefill lsd-edge / llama.cpp |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {n: i for i, n in enumerate(EDGE)}
    for key in sorted(llama, key=lambda k: (order.get(k[0], 99), -int(k[2][1]), k[3], k[1])):
        arch, threads, q, mq = key
        ll = best(llama[key])
        variant = {v: k for k, v in EQUAL_BITS.items()}[q]
        o = onnx.get((arch, threads, variant))
        cells = [
            arch, f"{q[1]}-bit", str(threads), f"{q.upper()} / {mq}", f"{ll['encode_ms']:,.0f}",
            f"{ll['prefill_ms']:,.0f} ({ll['prompt_tokens']:.0f})", f"{ll['prefill_tokens_per_s']:,.0f}",
            f"{ll['decode_tokens_per_s']:.1f}", f"{ll['ttft_ms']:,.0f}",
        ]  # fmt: skip
        if o is None or mq != "q8_0":
            cells += ["", "", "", "", "", "", "", ""]
        else:
            ob = best(o)
            ratio = ob["prefill_tokens_per_s"] / ll["prefill_tokens_per_s"]
            cells += [
                variant, f"{ob['vision_ms']:,.0f}", f"{ob['prefill_ms']:,.0f} ({ob['prompt_tokens']:.0f})",
                f"{ob['prefill_tokens_per_s']:,.0f}", f"{ob['decode_tokens_per_s']:.1f}", f"{ob['ttft_ms']:,.0f}",
                f"{ob['ttft_ms'] / ll['ttft_ms']:.2f}x",
                f"{ratio:.2f}x ({'met' if ratio >= TARGET else 'missed'})",
            ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(out: Path) -> str:
    llama, onnx, machine = collect(out / "raw")
    labels = sorted({m[0] for m in machine.values()})
    loads = [m[1] + m[2] for m in machine.values()]
    lo, hi = (min(x for x in sum(loads, [])), max(x for x in sum(loads, []))) if loads else (0, 0)
    where = (
        f"Machine: {', '.join(labels)}; load average {lo:.2f}-{hi:.2f} at the starts and ends of the "
        "lsd-edge benches."
        if labels
        else "llama.cpp's side alone (no lsd-edge bench in raw/)."
    )
    md = f"{where} Each side: the median of a round's answers, the best of the rounds.\n\n" + table(
        llama, onnx
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures.md").write_text(md, encoding="utf-8")
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp-bin", type=Path, default=None, help="the folder of llama-mtmd-cli")
    ap.add_argument("--arch", action="append", default=None, help=f"(repeatable; default: {', '.join(EDGE)})")
    ap.add_argument(
        "--threads", type=int, action="append", default=None, help="(repeatable; default: 1 and 2)"
    )
    ap.add_argument("--llm-quant", action="append", default=None, help="(repeatable; default: q8_0 and q4_0)")
    ap.add_argument("--mmproj-quant", action="append", default=None, help="(repeatable; default: q8_0)")
    ap.add_argument(
        "--side", action="append", choices=("mtmd", "onnx"), default=None, help="(repeatable; default: both)"
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--first-round", type=int, default=0, help="the first round's number in raw/ file names")
    ap.add_argument("--mtmd-prompts", type=int, default=2, help="questions llama-mtmd-cli answers per round")
    ap.add_argument("--prompts", type=int, default=4, help="questions lsd-edge's bench answers per round")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--gguf-dir", type=Path, default=RUNS_ROOT / "mtmd-gguf")
    ap.add_argument("--cache", type=Path, default=None, help="the ONNX exports (default: runs/bench-arch)")
    ap.add_argument("--out", type=Path, default=Path("runs/mtmd-figures"))
    ap.add_argument("--table-only", action="store_true", help="only rebuild figures.md from raw/")
    a = ap.parse_args()
    if not a.table_only:
        if a.llama_cpp_bin is None or not (a.llama_cpp_bin / "llama-mtmd-cli").is_file():
            sys.exit(
                f"--llama-cpp-bin {a.llama_cpp_bin}: no llama-mtmd-cli there; build it (docs/BENCHMARKS.md)"
            )
        names = a.arch or list(EDGE)
        a.threads = a.threads or [1, 2]
        a.side = a.side or ["mtmd", "onnx"]
        a.llm_quant = a.llm_quant or list(EQUAL_BITS.values())
        a.mmproj_quant = a.mmproj_quant or ["q8_0"]
        write_ggufs(names, a.gguf_dir, a.llm_quant, a.mmproj_quant)
        folders = exports(names, a.cache or arch_exports_dir(RUNS_ROOT), max(a.threads))
        measure(a, folders)
    print(write_table(a.out))


if __name__ == "__main__":
    main()
