"""`lsd-edge verify`'s table: one row per runtime and variant, its figures against PyTorch's and
its bound, then the notes and the rows that fell below (results in, renderables out, as
`lsd_edge.cli.render`)."""

from __future__ import annotations

from rich import box
from rich.console import RenderableType
from rich.markup import escape
from rich.table import Table

from lsd_edge.verify.report import VerifyResult


def verify_report(result: VerifyResult) -> list[RenderableType]:
    """`lsd-edge verify`: one row per runtime and variant, PyTorch's first, then why rows were skipped
    or stopped."""
    t = Table(
        title=f"lsd-edge verify: {result.reference}",
        box=box.SIMPLE_HEAD,
        caption=f"{result.questions} questions of {result.data}, {result.max_new_tokens} new tokens, greedy",
    )
    for col in (
        "runtime",
        "variant",
        "exact match",
        "agrees with\nPyTorch",
        "first-token\nKL",
        "s",
        "status",
    ):
        t.add_column(col, justify="left" if col in ("runtime", "variant", "status") else "right")
    notes = []
    for r in result.rows:
        status = {"ok": "[green]ok[/green]", "skipped": "[yellow]skipped[/yellow]"}.get(
            r.status, "[red]error[/red]"
        )
        if r.status == "ok" and any(f.startswith(f"{r.key}:") for f in result.failures):
            status = "[red]below its bound[/red]"
        if r.status == "skipped":  # an error's reason is among the failures below
            notes.append(f"[yellow]{r.key} skipped: {escape(r.reason or '')}[/yellow]")
        t.add_row(
            r.runtime,
            r.variant,
            "—" if r.accuracy is None else f"{100 * r.accuracy:.1f}%",
            "—" if r.agreement is None else f"{100 * r.agreement:.1f}%",
            "—" if r.first_token_kl is None else f"{r.first_token_kl:.2e}",
            "—" if r.seconds is None else f"{r.seconds:.1f}",
            status,
        )
    return [t, *notes, *(f"[red]{escape(f)}[/red]" for f in result.failures)]
