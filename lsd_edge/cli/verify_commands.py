"""`lsd-edge verify`: one table of accuracy per runtime and variant of the given exports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lsd_edge.cli import render_verify
from lsd_edge.cli.app import app, out, reporter, write_json_out
from lsd_edge.verify.plan import RUNTIMES, VerifyError
from lsd_edge.verify.report import DEFAULT_MAX_DROP, Bounds, parse_bound
from lsd_edge.verify.run import VerifySettings, verify

PANEL = "Export, bench and demo"
ROWS = f"RUNTIME=VALUE or RUNTIME/VARIANT=VALUE for one runtime or row ({', '.join(RUNTIMES)}); repeatable"


@app.command("verify", rich_help_panel=PANEL)
def verify_(
    exports: Annotated[
        list[Path], typer.Argument(help="Folders written by `lsd-edge export` (ONNX) or `export --gguf`.")
    ],
    n: Annotated[int, typer.Option("--n", min=1, help="Eval questions every runtime answers.")] = 100,
    data: Annotated[
        Path | None, typer.Option("--data", help="LLaVA-format eval JSON (default: the recipe's eval split).")
    ] = None,
    images: Annotated[Path | None, typer.Option("--images", help="Image folder of --data.")] = None,
    pytorch: Annotated[
        Path | None,
        typer.Option("--pytorch", help="The PyTorch folder (default: the one the export reports name)."),
    ] = None,
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help=f"Run only these runtimes (repeatable): {', '.join(RUNTIMES)}."),
    ] = None,
    require: Annotated[
        list[str] | None,
        typer.Option("--require", help="Fail, not skip, when this runtime cannot run here (repeatable)."),
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option("--max-new-tokens", min=1, help="Default: the recipe's eval settings, else 8."),
    ] = None,
    max_drop: Annotated[
        list[str] | None,
        typer.Option(
            "--max-drop",
            help=f"Exact match at most this many points below PyTorch's (default {DEFAULT_MAX_DROP:g}); {ROWS}.",
        ),
    ] = None,
    min_agreement: Annotated[
        list[str] | None,
        typer.Option("--min-agreement", help=f"Share of answers identical to PyTorch's, 0-1; {ROWS}."),
    ] = None,
    max_kl: Annotated[
        list[str] | None, typer.Option("--max-kl", help=f"First-token KL against PyTorch's; {ROWS}.")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result as JSON here.")] = None,
) -> None:
    """Exact match, agreement with PyTorch and first-token KL of every runtime and variant the exports
    hold: PyTorch, ONNX Runtime, transformers.js in Node and in the browser page, llama.cpp. Exits 1
    when one falls below its bound."""
    for name in require or []:
        if name not in RUNTIMES:
            raise VerifyError(f"--require {name}: choose among {', '.join(RUNTIMES)}")
    bounds = Bounds(
        max_drop={"": DEFAULT_MAX_DROP, **parse_bound(max_drop or [], "--max-drop")},
        min_agreement=parse_bound(min_agreement or [], "--min-agreement"),
        max_kl=parse_bound(max_kl or [], "--max-kl"),
        require=set(require or []),
    )
    settings = VerifySettings(n, data, images, pytorch, only, max_new_tokens, bounds)
    result = verify(exports, settings, reporter())
    for line in render_verify.verify_report(result):
        out.print(line)
    write_json_out(json_out, result.as_dict())
    if result.failures:
        more = f" (and {len(result.failures) - 1} more above)" if len(result.failures) > 1 else ""
        raise VerifyError(f"verify failed: {result.failures[0]}{more}")
    out.print(f"[green]every runtime within its bounds[/green] ({len(result.rows)} rows)")
