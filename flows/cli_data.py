"""Data commands: ingest, sql, tables, validate."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from features import store
from features.readonly_sql import ReadOnlyError, run_query
from features.store import WarehouseConfig, WarehouseError
from flows.cli_common import console, err, fail, print_rows
from pipeline.ingest import REFUSALS, IngestSummary, ingest
from pipeline.preprocess import PreprocessConfig
from pipeline.sources import read_source
from pipeline.sources.amazon import read_amazon
from pipeline.sources.base import RawSource
from pipeline.sources.generic import ColumnMap, read_generic
from pipeline.validate import validate

ingest_app = typer.Typer(
    help="Load a raw dataset into the warehouse (items, interactions, item_images).",
    no_args_is_help=True,
)

MinUser = Annotated[int, typer.Option(help="keep users with at least this many interactions")]
Progress = Annotated[bool, typer.Option(help="progress bar (image downloads) on stderr")]
AllowDeletes = Annotated[
    bool,
    typer.Option(
        "--allow-deletes",
        help="let this ingest delete more than 20% of the dataset's stored rows (a re-ingest "
        "from a smaller input); without it such an ingest is refused, naming what would go",
    ),
]


def run_ingest(
    load: Callable[[], RawSource],
    min_user: int,
    progress: bool = True,
    allow_deletes: bool = False,
) -> IngestSummary:
    """Read with `load`, ingest, print the report and the counts (errors: one line, exit 2)."""
    try:
        raw: RawSource = load()
        summary = ingest(
            raw,
            WarehouseConfig(),
            pre=PreprocessConfig(min_user),
            progress=progress,
            allow_deletes=allow_deletes,
        )
    except REFUSALS as e:
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
    path: Annotated[
        Path | None,
        typer.Argument(
            help="folder with ratings.dat, movies.dat, posters/ (default: DATA/movielens-1m)"
        ),
    ] = None,
    dataset: Annotated[str, typer.Option(help="dataset name in the warehouse")] = "ml-1m",
    min_user: MinUser = 5,
    progress: Progress = True,
    allow_deletes: AllowDeletes = False,
) -> None:
    """MovieLens in the GroupLens layout, with optional posters/<MovieID>.jpg."""
    run_ingest(lambda: read_source("movielens", path, dataset), min_user, progress, allow_deletes)


@ingest_app.command("amazon")
def ingest_amazon(
    reviews: Annotated[
        Path, typer.Argument(help="reviews_*.json(.gz) (2014/2018) or <Category>.jsonl(.gz) (2023)")
    ],
    meta: Annotated[Path, typer.Argument(help="meta_*.json(.gz) / meta_*.jsonl(.gz)")],
    dataset: Annotated[str, typer.Option(help="dataset name in the warehouse")] = "amazon",
    min_user: MinUser = 5,
    progress: Progress = True,
    allow_deletes: AllowDeletes = False,
) -> None:
    """Amazon review data (2014, 2018 or 2023 layout); image URLs are downloaded and cached."""
    run_ingest(lambda: read_amazon(reviews, meta, dataset), min_user, progress, allow_deletes)


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
    images_col: Annotated[
        str | None, typer.Option(help="column of image paths/URLs, '|'-separated")
    ] = None,
    rating_min: Annotated[float | None, typer.Option(help="ratings below are dropped")] = 0.0,
    rating_max: Annotated[float | None, typer.Option(help="ratings above are dropped")] = None,
    min_user: MinUser = 5,
    progress: Progress = True,
    allow_deletes: AllowDeletes = False,
) -> None:
    """Any interactions file + items file with a column mapping."""
    cols = ColumnMap(
        user=user_col,
        item=item_col,
        ts=ts_col,
        rating=rating_col,
        item_key=item_key_col,
        title=title_col,
        text=text_col,
        categories=categories_col,
        images=images_col,
        rating_min=rating_min,
        rating_max=rating_max,
    )
    run_ingest(
        lambda: read_generic(interactions, items, dataset, cols), min_user, progress, allow_deletes
    )


@ingest_app.command("amazon-office")
def ingest_office(
    path: Annotated[
        Path | None,
        typer.Argument(
            help="folder with interactions.csv, items.tsv (default: DATA/amazon-office)"
        ),
    ] = None,
    dataset: Annotated[str, typer.Option(help="dataset name in the warehouse")] = "amazon-office",
    min_user: MinUser = 5,
    progress: Progress = True,
    allow_deletes: AllowDeletes = False,
) -> None:
    """The Amazon Office text-only dataset of ../shared/datasets (generic adapter preset)."""
    run_ingest(
        lambda: read_source("amazon-office", path, dataset), min_user, progress, allow_deletes
    )


def sql(
    query: Annotated[str, typer.Argument(help="SQL over the warehouse tables and views")],
    limit: Annotated[int, typer.Option(help="rows to print at most")] = 50,
    csv: Annotated[bool, typer.Option(help="print CSV instead of a table")] = False,
) -> None:
    """Run one SELECT on the warehouse, read-only: statements that write, ATTACH / COPY / SET
    and writing functions are refused (features/readonly_sql.py), e.g.
    `msm4sr sql "select count(*) from items"`."""
    try:
        res = run_query(query, limit, WarehouseConfig())
    except (WarehouseError, ReadOnlyError) as e:
        fail(str(e))
    except Exception as e:  # a user's SQL error: DuckDB's message on one line, no traceback
        fail(f"{type(e).__name__}: {' '.join(str(e).split())}")
    if csv:
        import csv as _csv

        w = _csv.writer(sys.stdout)
        w.writerow(res.columns)
        w.writerows(res.rows)
    else:
        print_rows(res.columns, res.rows)
    if res.more:
        err.print(f"(first {limit} rows; --limit to see more)")


def tables() -> None:
    """List warehouse tables with row counts, and the current snapshot id."""
    try:
        with store.connect(WarehouseConfig(), create=False, read_only=True) as con:
            counts = store.table_counts(con)
            snap = store.snapshot_id(con)
            views = [
                r[0]
                for r in con.execute(
                    "SELECT view_name FROM duckdb_views() WHERE database_name = 'lake' ORDER BY 1"
                ).fetchall()
            ]
    except WarehouseError as e:
        fail(str(e))
    print_rows(
        ["table", "rows"], counts, title=f"warehouse {WarehouseConfig().location} (snapshot {snap})"
    )
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
