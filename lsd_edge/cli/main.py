"""`lsd-edge`: the commands, and the one place an `LsdEdgeError` is caught.

It becomes one red line and exit status 1 (`--debug` or LSD_EDGE_DEBUG=1 shows the traceback instead).
"""

from __future__ import annotations

import os
import sys

# Importing a command module registers its commands; --help lists the panels in this order (the flow).
# isort: off
from lsd_edge.cli import recipe_commands  # noqa: F401
from lsd_edge.cli import train_commands  # noqa: F401
from lsd_edge.cli import deploy_commands  # noqa: F401
from lsd_edge.cli import verify_commands  # noqa: F401

# isort: on
from rich.markup import escape

from lsd_edge.cli.app import app, err
from lsd_edge.errors import LsdEdgeError, RecipeError


def main() -> None:
    debug = os.environ.get("LSD_EDGE_DEBUG")
    try:
        _main()
    finally:
        # `--debug` sets LSD_EDGE_DEBUG for the command's library code and the processes it starts; a
        # caller running main() in-process (a test, a notebook) gets its own environment back.
        if debug is None:
            os.environ.pop("LSD_EDGE_DEBUG", None)
        else:
            os.environ["LSD_EDGE_DEBUG"] = debug


def _main() -> None:
    try:
        app()
    except LsdEdgeError as e:
        if os.environ.get("LSD_EDGE_DEBUG") == "1":
            raise
        lines = e.lines() if isinstance(e, RecipeError) else [str(e)]
        # escaped: a message may hold brackets (stage names, `pip install 'lsd-edge[track]'`)
        err.print(f"[bold red]error:[/bold red] {escape(lines[0])}", highlight=False, soft_wrap=True)
        for line in lines[1:]:
            err.print(f"[red]{escape(line)}[/red]", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:  # before a command runs (Typer handles those in one)
        interrupted()
    except SystemExit as e:
        # Typer turns Ctrl+C in a command into a silent exit 130 (`raise Exit(130) from e`): say what it means
        if e.code == 130 and _by_ctrl_c(e):
            interrupted()
        raise


def _by_ctrl_c(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def interrupted() -> None:
    err.print(
        "[bold red]interrupted[/bold red]: what was finished is kept; `lsd-edge distill --resume` continues a run",
        highlight=False,
        soft_wrap=True,
    )
    sys.exit(130)


if __name__ == "__main__":
    main()
