"""How long work reports itself: rich progress bars on a terminal, nothing in tests.

Library code talks to a `Reporter`; the CLI passes a `RichReporter`, tests a `QuietReporter`.
"""

from __future__ import annotations

from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Reporter(Protocol):
    def task(self, description: str, total: int) -> None: ...
    def advance(self, n: int = 1, info: str = "") -> None: ...
    def done(self) -> None: ...
    def message(self, text: str) -> None: ...


class QuietReporter:
    def __init__(self) -> None:
        self.messages: list[str] = []

    def task(self, description: str, total: int) -> None:
        pass

    def advance(self, n: int = 1, info: str = "") -> None:
        pass

    def done(self) -> None:
        pass

    def message(self, text: str) -> None:
        self.messages.append(text)


class RichReporter:
    """One progress bar at a time, with a free-text field for loss terms and rates."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._task = None

    def task(self, description: str, total: int) -> None:
        self.done()
        self._progress = Progress(
            TextColumn("[bold cyan]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, info="")

    def advance(self, n: int = 1, info: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n, info=info)

    def done(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def message(self, text: str) -> None:
        self.console.print(text)


def ticker(reporter: Reporter):
    """A `progress(done, total)` callback that advances the reporter's current bar to `done`."""
    last = [0]

    def tick(done: int, total: int) -> None:
        reporter.advance(done - last[0])
        last[0] = done

    return tick
