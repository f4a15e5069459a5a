"""The `msm4sr` CLI run in-process as a user runs it: an exception that escapes a command (a
traceback for the user) fails the test; `one_line_error` checks what a refused command prints."""

from __future__ import annotations

from click.testing import Result
from typer.testing import CliRunner

from flows.cli import build

_runner = CliRunner()


def msm4sr(*args: str) -> Result:
    """Invoke the CLI with `args`; re-raise anything but a normal exit (a traceback)."""
    res = _runner.invoke(build(), list(args), catch_exceptions=True)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise AssertionError(f"msm4sr {' '.join(args)} raised instead of exiting") from (
            res.exception
        )
    return res


def ok(*args: str) -> str:
    """Output of a command that must succeed."""
    res = msm4sr(*args)
    assert res.exit_code == 0, res.output
    return res.output


def one_line_error(res: Result) -> str:
    """The single `error: ...` line of a refused command (exit 2, no traceback)."""
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output, res.output
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.output
    return errors[0]


def scalar(out: str) -> str:
    """The last line of `msm4sr sql ... --csv` (a one-value query)."""
    return out.strip().splitlines()[-1].strip()
