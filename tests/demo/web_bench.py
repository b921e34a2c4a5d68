"""Time the in-browser page (`lsd-edge demo --web`) in headless Chromium and transformers.js in Node
beside lsd-edge's own ONNX runner, on the same export, prompts and machine; prints one Markdown row
per (backend, threads).

    python -m tests.demo.web_bench EXPORT_DIR SHAPES_DIR --variant int8 [--tokens 64] [--prompts 6]

SHAPES_DIR holds eval.json and images/. Every generation runs to --tokens new tokens (the end of the
answer ignored), greedy, after one untimed warm-up; the figures are medians over the prompts. The
page's times are taken in its worker (performance.now()), the runner's with time.perf_counter();
both start before the image is read.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
from pathlib import Path

from lsd_edge.demo.web_page import make_server, web_settings
from lsd_edge.runtime.machine import cpu_name
from lsd_edge.runtime.onnx.runner import OnnxRunner

from ..browser import ask_web_page, chromium, open_web_page


def prompts(shapes: Path, n: int) -> list[tuple[Path, str]]:
    recs = json.loads((shapes / "eval.json").read_text())[:n]
    return [
        (shapes / "images" / r["image"], r["conversations"][0]["value"].replace("<image>", "").strip())
        for r in recs
    ]


def in_browser(export: Path, variant: str, pairs, tokens: int, threads: int) -> tuple[float, float]:
    """Median (time to first token in ms, decode tokens/s) of the page."""
    srv = make_server(web_settings(export, variant, max_new_tokens=tokens), port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with chromium() as driver:
            open_web_page(driver, f"{srv.url}?threads={threads}")
            ask_web_page(driver, *pairs[0], tokens, ignore_eos=True)  # warm-up
            got = [ask_web_page(driver, image, q, tokens, ignore_eos=True) for image, q in pairs]
    finally:
        srv.shutdown()
        srv.server_close()
    assert all(a.state == "done" and a.tokens == tokens for a in got), got
    return statistics.median(a.ttft_ms for a in got), statistics.median(a.tokens_per_s for a in got)


def in_runner(export: Path, variant: str, pairs, tokens: int, threads: int) -> tuple[float, float]:
    """Median (time to first token in ms, decode tokens/s) of lsd-edge's ONNX runner."""
    runner = OnnxRunner(export, variant=variant, threads=threads)
    runner.generate(*pairs[0], tokens, ignore_eos=True)  # warm-up
    got = [runner.generate(image, q, tokens, ignore_eos=True) for image, q in pairs]
    assert all(g.new_tokens == tokens for g in got)
    return statistics.median(1000 * g.ttft_s for g in got), statistics.median(
        g.decode_tokens_per_s for g in got
    )


def in_node(export: Path, variant: str, pairs, tokens: int, threads: int) -> tuple[float, float]:
    """Median (time to first token in ms, decode tokens/s) of transformers.js in Node (web/bench.mjs)."""
    import subprocess
    import tempfile

    from lsd_edge.runtime.onnx.layout import JS_DTYPE

    web = Path(__file__).resolve().parents[2] / "web"
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([{"image": str(image), "question": q} for image, q in pairs], f)
    cmd = ["node", str(web / "bench.mjs"), str(export), JS_DTYPE[variant], f.name, str(tokens), str(threads)]
    out = json.loads(
        subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    )
    Path(f.name).unlink()
    return 1000 * out["ttft_s"], out["decode_tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("shapes", type=Path)
    ap.add_argument("--variant", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    args = ap.parse_args()
    variant = web_settings(args.export, args.variant).variant
    pairs = prompts(args.shapes, args.prompts)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"{args.export} · {variant} · {args.tokens} tokens · {len(pairs)} prompts · {cpu_name()}, "
        f"{os.cpu_count()} cores · load average {load}"
    )
    print("| backend | threads | time to first token | decode tokens/s |\n|---|---|---|---|")
    for threads in args.threads:
        for name, measure in (
            ("Chromium, transformers.js WASM", in_browser),
            ("Node, transformers.js (onnxruntime-node)", in_node),
            ("lsd-edge OnnxRunner", in_runner),
        ):
            ttft, rate = measure(args.export, variant, pairs, args.tokens, threads)
            print(f"| {name} | {threads} | {ttft:.1f} ms | {rate:.0f} |", flush=True)


if __name__ == "__main__":
    main()
