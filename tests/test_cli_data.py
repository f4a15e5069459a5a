"""The data commands as a user runs them, on the real MovieLens-1M and Amazon Office."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import build
from tests.conftest import ML1M, OFFICE, require

runner = CliRunner()


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MSM4SR_WAREHOUSE", str(tmp_path / "wh"))
    monkeypatch.setenv("MSM4SR_DATA", str(tmp_path / "nodata"))
    app = build()

    def run(*args: str) -> str:
        res = runner.invoke(app, list(args), catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return res.output

    run.app = app  # type: ignore[attr-defined]
    return run


def scalar(out: str) -> str:
    return out.strip().splitlines()[-1].strip()


def test_help_lists_the_subcommands(cli) -> None:
    out = cli("--help")
    for cmd in ("ingest", "sql", "tables", "validate"):
        assert cmd in out


def test_ingest_movielens_and_office_then_query(cli) -> None:
    ml = require(ML1M)
    out = cli("ingest", "movielens", str(ml))
    assert "3883 items, 6040 users, 1000209 interactions" in out
    cli("ingest", "amazon-office", str(require(OFFICE)))
    q = "select count(*) from interactions where dataset='ml-1m'"
    assert scalar(cli("sql", q, "--csv")) == "1000209"
    assert scalar(cli("sql", "select count(*) from items where dataset='ml-1m'", "--csv")) == "3883"
    assert (
        scalar(
            cli(
                "sql",
                "select count(*) from item_images where dataset='ml-1m' and status='ok'",
                "--csv",
            )
        )
        == "3872"
    )
    assert (
        scalar(
            cli("sql", "select count(*) from interactions where dataset='amazon-office'", "--csv")
        )
        == "53258"
    )
    snap = scalar(cli("sql", "select max(snapshot_id) from lake.snapshots()", "--csv"))
    again = cli("ingest", "movielens", str(ml))
    assert "changed {'items': 0, 'interactions': 0, 'item_images': 0}" in " ".join(again.split())
    # only the run log was committed
    assert (
        int(scalar(cli("sql", "select max(snapshot_id) from lake.snapshots()", "--csv")))
        == int(snap) + 1
    )
    tables = cli("tables")
    assert "interactions" in tables and "1053467" in tables
    val = cli("validate", "--dataset", "ml-1m")
    assert "no integrity errors" in val and "movie_without_poster" in val


def test_errors_are_messages_not_tracebacks(cli) -> None:
    res = runner.invoke(cli.app, ["sql", "select 1"])
    assert res.exit_code == 2 and "no warehouse catalog" in res.output
    res = runner.invoke(cli.app, ["ingest", "movielens"])
    assert (
        res.exit_code == 2
        and "MovieLens not found at" in res.output
        and "ratings.dat" in res.output
    )
    cli("ingest", "amazon-office", str(require(OFFICE)))
    res = runner.invoke(cli.app, ["sql", "select nope from items"])
    assert res.exit_code == 2 and "nope" in res.output
    res = runner.invoke(cli.app, ["validate", "--dataset", "unknown"])
    assert res.exit_code == 2 and "amazon-office" in res.output
