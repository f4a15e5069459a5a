"""What every CLI module shares: the consoles, error exit and table printing."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

# Wide tables when the output is a file or a pipe (rich would wrap at 80 columns).
console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)


def fail(msg: object) -> NoReturn:
    """Print `error: msg` on stderr, one line, and exit 2 (a user's mistake, not a traceback).

    The message is printed as text (brackets in it are not rich markup) and not wrapped."""
    err.print(f"[bold red]error:[/] {escape(str(msg))}", soft_wrap=True)
    raise typer.Exit(2)


def print_rows(columns: list[str], rows: list[tuple], title: str | None = None) -> None:
    t = Table(title=title, show_lines=False)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    console.print(t)


def epoch_lines() -> None:
    """Without progress bars, the trainer's one line per epoch (loss, validation metric, best,
    seconds) and its notes go to stderr, so a scheduled or logged run shows how it goes."""
    lg = logging.getLogger("trainer")
    if not any(isinstance(h, _Stderr) for h in lg.handlers):
        lg.addHandler(_Stderr())
    lg.setLevel(logging.INFO)


class _Stderr(logging.Handler):
    """Each record as its message on the current sys.stderr (looked up at every line)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(record.getMessage(), file=sys.stderr, flush=True)
        except Exception:
            self.handleError(record)
