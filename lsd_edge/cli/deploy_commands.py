"""Commands that ship the student: export, bench, bench-loss, demo."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lsd_edge.bench.loss import bench_loss as run_bench_loss
from lsd_edge.bench.plan import BenchSettings
from lsd_edge.bench.report import plot, to_markdown, write_result
from lsd_edge.cli import render
from lsd_edge.cli.app import app, out, reporter, write_json_out
from lsd_edge.demo.examples import shapes_examples
from lsd_edge.demo.models import load_models, resolve_paths
from lsd_edge.demo.web_page import make_server, serve, web_settings
from lsd_edge.errors import LsdEdgeError

PANEL = "Export, bench and demo"


@app.command("export", rich_help_panel=PANEL)
def export_(
    model_dir: Annotated[
        Path | None,
        typer.Argument(help="A model folder (default: the student of the most recent run under runs/)."),
    ] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Add int8 graphs (*_int8.onnx).")] = False,
    int4: Annotated[bool, typer.Option("--int4", help="Add 4-bit weight-only graphs (*_q4.onnx).")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="Add float16 graphs (*_fp16.onnx).")] = False,
    fp32: Annotated[bool, typer.Option("--fp32", help="Write the fp32 graphs only.")] = False,
    target: Annotated[
        str | None, typer.Option("--target", help="cpu or cuda (default: the recipe's export.target).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="Export folder (default <run>/onnx, or <MODEL_DIR>-onnx).")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="LLaVA-format eval JSON for the parity gate (default: the recipe's)."),
    ] = None,
    images: Annotated[Path | None, typer.Option("--images", help="Image folder of --data.")] = None,
    samples: Annotated[
        int | None, typer.Option("--samples", min=1, help="Questions for the logit and greedy-token checks.")
    ] = None,
    eval_samples: Annotated[
        int | None, typer.Option("--eval-samples", min=1, help="Questions for the accuracy comparison.")
    ] = None,
    opset: Annotated[int | None, typer.Option("--opset", min=17, max=23, help="ONNX opset.")] = None,
    decoder: Annotated[
        str | None, typer.Option("--decoder", help="auto (the builder's where it can), builder, traced.")
    ] = None,
    gguf: Annotated[bool, typer.Option("--gguf", help="Write <name>.gguf + mmproj for llama.cpp.")] = False,
    quant: Annotated[
        str | None, typer.Option("--quant", help="With --gguf: q8_0 (default), q4_0 or f16.")
    ] = None,
    mmproj_quant: Annotated[
        str | None, typer.Option("--mmproj-quant", help="With --gguf: the mmproj's, f16 or q8_0 (default).")
    ] = None,
) -> None:
    """Export a student to ONNX (three graphs + a quantized variant), check parity with PyTorch, report sizes and speed.

    With --gguf, to GGUF instead: the LLM with its tokenizer and chat template, the mmproj file, a
    Modelfile for Ollama, gated on llama.cpp's own outputs against PyTorch's: logits, first and greedy
    tokens, tokenizer, and exact match on the eval data (needs `pip install -e .[gguf]`)."""
    if gguf:
        settings = dict(quant=quant, mmproj_quant=mmproj_quant, data=data, images=images, samples=samples)
        settings["eval_samples"] = eval_samples
        return gguf_export(model_dir, output, settings, (int8, int4, fp16, fp32, target, opset, decoder))
    if quant is not None or mmproj_quant is not None:
        raise LsdEdgeError(
            "--quant and --mmproj-quant go with --gguf; for ONNX pick one of --int8, --int4, --fp16, --fp32"
        )
    chosen = [name for name, on in (("int8", int8), ("int4", int4), ("fp16", fp16), ("none", fp32)) if on]
    if len(chosen) > 1:
        raise LsdEdgeError("pick one of --int8, --int4, --fp16, --fp32")
    if target is not None and target not in ("cpu", "cuda"):
        raise LsdEdgeError(f"--target {target}: choose cpu or cuda")
    overrides = {
        "quantize": chosen[0] if chosen else None,
        "target": target,
        "data": data,
        "images": images,
        "parity_samples": samples,
        "eval_samples": eval_samples,
        "opset": opset,
        "decoder": decoder,
    }
    from lsd_edge.export.onnx.pipeline import export  # ONNX's libraries load for an export only

    result = export(model_dir, output, overrides, reporter())
    for line in render.export_report(result.report):
        out.print(line)


def gguf_export(model_dir, output, settings: dict, onnx_options) -> None:
    """`lsd-edge export --gguf`: the GGUF pair, gated on llama.cpp, and its summary."""
    if any(onnx_options):
        raise LsdEdgeError(
            "--gguf takes --quant q8_0|q4_0|f16 and --mmproj-quant; --int8, --int4, --fp16, --fp32, --target, "
            "--opset, --decoder are ONNX's"
        )
    from lsd_edge.export.gguf.pipeline import export_gguf

    result = export_gguf(model_dir, output, settings, reporter())
    for line in render.gguf_report(result.report):
        out.print(line)


@app.command("bench", rich_help_panel=PANEL)
def bench_(
    teacher: Annotated[
        Path | None, typer.Option("--teacher", help="Teacher model folder (default: the latest run's).")
    ] = None,
    student: Annotated[
        Path | None, typer.Option("--student", help="Student model folder (default: the latest run's).")
    ] = None,
    onnx: Annotated[
        list[Path] | None,
        typer.Option("--onnx", help="ONNX export folder (repeatable; default: the latest run's onnx*/)."),
    ] = None,
    arch: Annotated[
        list[str] | None,
        typer.Option(
            "--arch",
            help="A real architecture, random weights (repeatable): students qwen0.5b, qwen1.8b (SigLIP-so400m "
            "at 384 px: 729 visual tokens), qwen0.5b-edge-b16 (SigLIP-B/16 at 224 px: 196), qwen0.5b-edge-224, "
            "qwen0.5b-edge-168 (so400m at 224 / 168 px: 256 / 144), with ONNX rows; teachers qwen4b, llava7b.",
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    dtype: Annotated[
        str,
        typer.Option("--dtype", help="PyTorch rows: auto (bf16 on cuda, fp32 on cpu), float32, bfloat16."),
    ] = "auto",
    variant: Annotated[
        list[str] | None,
        typer.Option("--variant", help="ONNX variants to measure (repeatable; default: every one exported)."),
    ] = None,
    prefill: Annotated[
        str, typer.Option("--prefill", help="ONNX rows' prompt path: auto, gemm (int8 GEMM) or exported.")
    ] = "auto",
    prompts: Annotated[
        int | None,
        typer.Option(
            "--prompts",
            help="Eval prompts (with an image) per repeat (default: the recipe's [bench], else 8).",
        ),
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-new-tokens",
            help="New tokens per generation, EOS ignored (default: the recipe's [bench], else 128).",
        ),
    ] = None,
    repeats: Annotated[
        int | None,
        typer.Option(
            "--repeats", help="Timed passes over the prompts (default: the recipe's [bench], else 3)."
        ),
    ] = None,
    warmup: Annotated[
        int | None,
        typer.Option("--warmup", help="Untimed generations first (default: the recipe's [bench], else 1)."),
    ] = None,
    eval_samples: Annotated[
        int | None,
        typer.Option("--eval-samples", help="Questions for accuracy (default: the recipe's eval split)."),
    ] = None,
    no_accuracy: Annotated[bool, typer.Option("--no-accuracy", help="Skip the accuracy column.")] = False,
    data: Annotated[
        Path | None, typer.Option("--data", help="LLaVA-format eval JSON (default: the recipe's eval split).")
    ] = None,
    images: Annotated[Path | None, typer.Option("--images", help="Image folder of --data.")] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="Threads per measured process (default: every core).")
    ] = None,
    copy_mb: Annotated[
        int, typer.Option("--copy-mb", help="MiB copied to measure memory bandwidth (roofline).")
    ] = 1024,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Write the results here (default: <run>/bench.json for a run)."),
    ] = None,
    plot_out: Annotated[Path | None, typer.Option("--plot", help="Write a PNG chart here.")] = None,
    markdown_out: Annotated[
        Path | None, typer.Option("--markdown", help="Write the table as Markdown here.")
    ] = None,
    llama_bench: Annotated[
        Path | None, typer.Option("--llama-bench", help="llama.cpp's llama-bench: a row per --gguf file.")
    ] = None,
    gguf: Annotated[list[Path] | None, typer.Option("--gguf", help="A GGUF file (repeatable).")] = None,
) -> None:
    """Teacher vs student vs ONNX student: TTFT, tokens/s, memory, size, accuracy, against the roofline."""
    settings = BenchSettings(
        device=device,
        dtype=dtype,
        prompts=prompts,
        max_new_tokens=max_new_tokens,
        repeats=repeats,
        warmup=warmup,
        eval_samples=eval_samples,
        accuracy=not no_accuracy,
        data=data,
        images=images,
        variants=variant or None,
        prefill=prefill,
        threads=threads,
        copy_mb=copy_mb,
        llama_bench=llama_bench,
        gguf=gguf or None,
    )
    from lsd_edge.bench.runner import bench  # it exports random-weight models: ONNX's libraries

    command = "lsd-edge " + " ".join(sys.argv[1:])
    result = bench(teacher, student, onnx, arch, settings, reporter(), command=command)
    # Piped output has no terminal width, and rich would wrap the table into 80 columns.
    (out if out.is_terminal else Console(width=160)).print(render.bench_table(result))
    for line in render.bench_lines(result):
        out.print(line, soft_wrap=True)
    json_out = json_out or (result.run / "bench.json" if result.run is not None else None)
    if json_out:
        out.print(f"wrote {write_result(result, json_out)}")
    if plot_out:
        out.print(f"wrote {plot(result, plot_out)}")
    if markdown_out:
        markdown_out.write_text(to_markdown(result), encoding="utf-8")
        out.print(f"wrote {markdown_out}")


@app.command("bench-loss", rich_help_panel=PANEL)
def bench_loss(
    vocab: Annotated[int, typer.Option("--vocab", min=1, help="Vocabulary rows.")] = 151936,
    tokens: Annotated[int, typer.Option("--tokens", min=1, help="Positions (B x T) in the batch.")] = 4096,
    student_hidden: Annotated[int, typer.Option("--student-hidden", min=1)] = 896,
    teacher_hidden: Annotated[int, typer.Option("--teacher-hidden", min=1)] = 2048,
    chunk: Annotated[int, typer.Option("--chunk", min=1, help="Positions per chunk.")] = 256,
    kind: Annotated[str, typer.Option("--kind", help="forward, reverse, jsd or skew.")] = "forward",
    temperature: Annotated[float, typer.Option("--temperature", min=0.01)] = 1.0,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed runs of each path.")] = 3,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result as JSON here.")] = None,
) -> None:
    """Plain vs chunked response KL (forward + backward): peak memory, time, and their difference."""
    res = run_bench_loss(
        vocab,
        tokens,
        student_hidden,
        teacher_hidden,
        chunk,
        kind,
        temperature,
        repeats,
        device,
        0,
        reporter(),
    )
    for line in render.loss_bench(res, tokens, vocab, chunk):
        out.print(line)
    write_json_out(json_out, res.as_dict())


@app.command("demo", rich_help_panel=PANEL)
def demo_(
    export_dir: Annotated[
        Path | None,
        typer.Argument(
            metavar="EXPORT_DIR",
            help="With --web: the ONNX export folder the page loads (default: the latest run's).",
        ),
    ] = None,
    web: Annotated[
        bool,
        typer.Option(
            "--web",
            help="Serve the in-browser page instead: the student answers in the browser (transformers.js), "
            "no model runs here.",
        ),
    ] = False,
    web_assets: Annotated[
        Path | None,
        typer.Option(
            "--web-assets",
            help="With --web: node_modules with @huggingface/transformers and onnxruntime-web "
            "(default: $LSD_EDGE_WEB_ASSETS, else the checkout's web/node_modules).",
        ),
    ] = None,
    variant: Annotated[
        str | None,
        typer.Option(
            "--variant", help="With --web: int8, int4, fp16 or fp32 (default: the export's own variant)."
        ),
    ] = None,
    teacher: Annotated[
        Path | None,
        typer.Option("--teacher", help="Teacher model folder (default: the latest run's teacher/)."),
    ] = None,
    student: Annotated[
        Path | None,
        typer.Option(
            "--student",
            help="Student model folder or its ONNX export folder (default: the latest run's student/ and onnx/).",
        ),
    ] = None,
    onnx: Annotated[
        Path | None,
        typer.Option(
            "--onnx", help="The student's ONNX export (default: <run>/onnx or <student>-onnx if there)."
        ),
    ] = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to serve on; 127.0.0.1 keeps the page on this machine.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to serve on.")] = 7860,
    share: Annotated[
        bool,
        typer.Option(
            "--share", help="Also open a public *.gradio.live link (anyone with it can use the page)."
        ),
    ] = False,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda.")] = "auto",
    max_new_tokens: Annotated[
        int,
        typer.Option("--max-new-tokens", min=1, max=2048, help="The most new tokens a request may ask for."),
    ] = 64,
    concurrency: Annotated[
        int,
        typer.Option(
            "--concurrency", min=1, max=64, help="Requests answered at once (each runs both models)."
        ),
    ] = 2,
    queue_size: Annotated[
        int, typer.Option("--queue-size", min=1, help="Requests that may wait; more are refused.")
    ] = 64,
) -> None:
    """Open the side-by-side page: teacher and student answer the same image and question, streaming.

    With --web, a page where the student's ONNX export answers in the browser itself."""
    if web:
        if teacher is not None or student is not None or share:
            raise LsdEdgeError(
                "--teacher, --student and --share are for the side-by-side page; with --web give the "
                "export folder as EXPORT_DIR"
            )
        return web_demo(export_dir or onnx, variant, web_assets, host, port, max_new_tokens)
    if export_dir is not None or web_assets is not None or variant is not None:
        raise LsdEdgeError(
            "EXPORT_DIR, --web-assets and --variant are for `lsd-edge demo --web`; the side-by-side "
            "page takes --student and --onnx"
        )
    from lsd_edge.demo import page  # gradio: only for this command

    paths = resolve_paths(teacher, student, onnx)
    examples = shapes_examples([paths.run, paths.student, paths.teacher])
    teacher_runner, students = load_models(paths, device, examples, reporter())
    limits = page.Limits(
        max_new_tokens=max_new_tokens,
        default_new_tokens=min(24, max_new_tokens),
        concurrency=concurrency,
        queue_size=queue_size,
    )
    app_page = page.build_app(teacher_runner, students, examples, limits, paths.notes)
    out.print(render.demo_models(teacher_runner, students))
    for note in paths.notes:
        out.print(f"[yellow]note: {note}[/yellow]")
    if host not in ("127.0.0.1", "localhost", "::1"):
        out.print(f"[yellow]serving on {host}: anyone who can reach this machine can use the page[/yellow]")
    if share:
        out.print(
            "[yellow]--share: a public link through gradio.live; anyone with it can use the page[/yellow]"
        )
    for url in page.launch(app_page, host, port, share):
        out.print(f"[green]serving the demo on {url}[/green] (Ctrl+C stops it)")
    app_page.block_thread()


def web_demo(
    export_dir: Path | None,
    variant: str | None,
    assets: Path | None,
    host: str,
    port: int,
    max_new_tokens: int,
) -> None:
    """`lsd-edge demo --web`: check the export and the JS assets, then serve the page until Ctrl+C."""
    settings = web_settings(export_dir, variant, assets, max_new_tokens)
    server = make_server(settings, host, port)
    out.print(
        f"export {settings.export} · variant {settings.variant} (transformers.js dtype {settings.dtype}) · "
        f"JS assets from {settings.assets}",
        soft_wrap=True,
    )
    if host not in ("127.0.0.1", "localhost", "::1"):
        out.print(f"[yellow]serving on {host}: anyone who can reach this machine can load the page[/yellow]")
    out.print(f"[green]serving the in-browser student on {server.url}[/green] (Ctrl+C stops it)")
    serve(server)
