"""Data commands: ingest, sql, tables, validate."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from features import store
from features.store import WarehouseConfig, WarehouseError
from flows.cli_common import console, err, fail, print_rows
from pipeline.ingest import IngestSummary, ingest
from pipeline.preprocess import PreprocessConfig
from pipeline.sources import read_source
from pipeline.sources.amazon import read_amazon
from pipeline.sources.base import RawSource, SourceError
from pipeline.sources.generic import ColumnMap, read_generic
from pipeline.validate import validate

ingest_app = typer.Typer(help="Load a raw dataset into the warehouse (items, interactions, item_images).", no_args_is_help=True)

MinUser = Annotated[int, typer.Option(help="keep users with at least this many interactions")]


def _run_ingest(load, min_user: int) -> IngestSummary:
    try:
        raw: RawSource = load()
        summary = ingest(raw, WarehouseConfig(), pre=PreprocessConfig(min_user))
    except (SourceError, WarehouseError, ValueError) as e:
        fail(str(e))
    if summary.report:
        print_rows(
            ["check", "action", "rows", "example"],
            [(r["check_name"], r["action"], r["n"], r["example"]) for r in summary.report],
            title=f"ingest report ({summary.run_id})",
        )
    else:
        console.print(f"ingest {summary.run_id}: nothing dropped or repaired")
    console.print(
        f"[bold]{summary.dataset}[/]: {summary.n_items} items, {summary.n_users} users, "
        f"{summary.n_interactions} interactions, images {summary.images_by_status}; "
        f"rows changed {summary.rows_changed}; snapshot {summary.snapshot_id}; {summary.seconds:.1f}s"
    )
    return summary


@ingest_app.command("movielens")
def ingest_movielens(
    path: Annotated[Path | None, typer.Argument(help="folder with ratings.dat, movies.dat, posters/ (default: DATA/movielens-1m)")] = None,
    dataset: Annotated[str, typer.Option(help="dataset name in the warehouse")] = "ml-1m",
    min_user: MinUser = 5,
) -> None:
    """MovieLens in the GroupLens layout, with optional posters/<MovieID>.jpg."""
    _run_ingest(lambda: read_source("movielens", path, dataset), min_user)


@ingest_app.command("amazon")
def ingest_amazon(
    reviews: Annotated[Path, typer.Argument(help="reviews_*.json(.gz) (2014/2018) or <Category>.jsonl(.gz) (2023)")],
    meta: Annotated[Path, typer.Argument(help="meta_*.json(.gz) / meta_*.jsonl(.gz)")],
    dataset: Annotated[str, typer.Option(help="dataset name in the warehouse")] = "amazon",
    min_user: MinUser = 5,
) -> None:
    """Amazon review data (2014, 2018 or 2023 layout); image URLs are downloaded and cached."""
    _run_ingest(lambda: read_amazon(reviews, meta, dataset), min_user)


@ingest_app.command("generic")
def ingest_generic(
    interactions: Annotated[Path, typer.Argument(help="interactions CSV/TSV/Parquet")],
    items: Annotated[Path, typer.Argument(help="items CSV/TSV/Parquet")],
    dataset: Annotated[str, typer.Option(help="dataset name in the warehouse")],
    user_col: str = "user_id",
    item_col: str = "item_id",
    ts_col: str | None = "timestamp",
    rating_col: str | None = None,
    item_key_col: str = "item_id",
    title_col: str | None = "title",
    text_col: str | None = None,
    categories_col: str | None = None,
    images_col: Annotated[str | None, typer.Option(help="column of image paths/URLs, '|'-separated")] = None,
    min_user: MinUser = 5,
) -> None:
    """Any interactions file + items file with a column mapping."""
    cols = ColumnMap(user_col, item_col, ts_col, rating_col, item_key_col, title_col, text_col, categories_col, images_col)
    _run_ingest(lambda: read_generic(interactions, items, dataset, cols), min_user)


@ingest_app.command("amazon-office")
def ingest_office(
    path: Annotated[Path | None, typer.Argument(help="folder with interactions.csv, items.tsv (default: DATA/amazon-office)")] = None,
    dataset: Annotated[str, typer.Option(help="dataset name in the warehouse")] = "amazon-office",
    min_user: MinUser = 5,
) -> None:
    """The Amazon Office text-only dataset of ../shared/datasets (generic adapter preset)."""
    _run_ingest(lambda: read_source("amazon-office", path, dataset), min_user)


def sql(
    query: Annotated[str, typer.Argument(help="SQL over the warehouse tables and views")],
    limit: Annotated[int, typer.Option(help="rows to print at most")] = 50,
    csv: Annotated[bool, typer.Option(help="print CSV instead of a table")] = False,
) -> None:
    """Run SQL on the warehouse (read-only), e.g. `msm4sr sql "select count(*) from items"`."""
    try:
        with store.connect(WarehouseConfig(), create=False, read_only=True) as con:
            cur = con.execute(query)
            if cur.description is None:
                return
            cols = [d[0] for d in cur.description]
            rows = cur.fetchmany(limit + 1)
    except WarehouseError as e:
        fail(str(e))
    except Exception as e:  # a user's SQL error: show DuckDB's message, no traceback
        fail(f"{type(e).__name__}: {e}")
    if csv:
        import csv as _csv

        w = _csv.writer(sys.stdout)
        w.writerow(cols)
        w.writerows(rows[:limit])
    else:
        print_rows(cols, rows[:limit])
    if len(rows) > limit:
        err.print(f"(first {limit} rows; --limit to see more)")


def tables() -> None:
    """List warehouse tables with row counts, and the current snapshot id."""
    try:
        with store.connect(WarehouseConfig(), create=False, read_only=True) as con:
            counts = store.table_counts(con)
            snap = store.snapshot_id(con)
            views = [r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE database_name = 'lake' ORDER BY 1").fetchall()]
    except WarehouseError as e:
        fail(str(e))
    print_rows(["table", "rows"], counts, title=f"warehouse {WarehouseConfig().location} (snapshot {snap})")
    console.print("views: " + ", ".join(views))


def validate_cmd(
    dataset: Annotated[str, typer.Option(help="dataset to check")] = "ml-1m",
    min_user: MinUser = 5,
) -> None:
    """Report what ingest dropped or repaired and check the warehouse's integrity."""
    try:
        findings = validate(dataset, WarehouseConfig(), min_user)
    except (WarehouseError, ValueError) as e:
        fail(str(e))
    print_rows(
        ["source", "check", "action", "rows", "example"],
        [(f.source, f.check_name, f.action, f.n, f.example) for f in findings],
        title=f"validation of {dataset}",
    )
    errors = [f for f in findings if f.action == "error"]
    if errors:
        fail(f"{len(errors)} integrity checks failed: {[f.check_name for f in errors]}")
    console.print("[green]no integrity errors[/]")


def register(app: typer.Typer) -> None:
    app.add_typer(ingest_app, name="ingest")
    app.command("sql")(sql)
    app.command("tables")(tables)
    app.command("validate")(validate_cmd)
