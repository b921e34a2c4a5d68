"""The Typer application every command module registers on, and what the commands share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from transformers.utils import logging as hf_logging

from lsd_edge import __version__
from lsd_edge.files import write_json
from lsd_edge.progress import RichReporter

app = typer.Typer(
    name="lsd-edge",
    help="Distill a big LLaVA-style vision-language model into a small one, export it to ONNX, bench and demo it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Make or inspect data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data", rich_help_panel="Recipes, data and models")

out = Console()
err = Console(stderr=True)

SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a recipe key, e.g. --set stages[0].lr=1e-4 (repeatable).", show_default=False
    ),
]


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _version(value: bool) -> None:
    if value:
        out.print(f"lsd-edge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (also LSD_EDGE_DEBUG=1).")] = False,
) -> None:
    if debug:
        os.environ["LSD_EDGE_DEBUG"] = "1"
    quiet_libraries()


def reporter() -> RichReporter:
    return RichReporter(err)


def write_json_out(path: Path | None, data: Any) -> None:
    """The `--json OUT` of a command: the result as JSON, when asked for."""
    if path:
        write_json(path, data)
        out.print(f"wrote {path}")
