"""The run log every stage writes: run ids, one `pipeline_runs` row per run and the run's
`data_report` rows (what it dropped or repaired, with counts and one example each)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import duckdb
import polars as pl

from features import store
from features.store import Write


def new_run_id(stage: str, dataset: str) -> str:
    """A readable, unique run id: `<stage>-<dataset>-<UTC time>-<6 hex>`."""
    return f"{stage}-{dataset}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


@dataclass
class ReportRow:
    check_name: str
    action: str  # dropped | repaired | kept | info
    n: int
    example: str = ""


@dataclass
class Report:
    """Everything a run dropped or repaired, with counts and one example each."""

    rows: list[ReportRow] = field(default_factory=list)

    def add(self, check_name: str, action: str, n: int, example: object = "") -> None:
        if n:
            self.rows.append(ReportRow(check_name, action, int(n), str(example)[:300]))

    def count(self, check_name: str) -> int:
        return sum(r.n for r in self.rows if r.check_name == check_name)


def log_run(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    stage: str,
    dataset: str,
    started: datetime,
    summary: str,
    snapshot_id: int | None,
    report: Report | None = None,
    status: str = "finished",
) -> None:
    """One pipeline_runs row and the run's data_report rows, in one commit."""
    rows = report.rows if report else []
    run = pl.DataFrame(
        {
            "run_id": [run_id],
            "stage": [stage],
            "dataset": [dataset],
            "started_at": [started],
            "finished_at": [datetime.now(UTC)],
            "status": [status],
            "summary": [summary],
            "snapshot_id": [snapshot_id],
        },
        schema_overrides={"snapshot_id": pl.Int64},
    )
    rep = pl.DataFrame(
        {
            "run_id": [run_id] * len(rows),
            "dataset": [dataset] * len(rows),
            "stage": [stage] * len(rows),
            "check_name": [r.check_name for r in rows],
            "action": [r.action for r in rows],
            "n": [r.n for r in rows],
            "example": [r.example for r in rows],
        },
        schema={
            "run_id": pl.String,
            "dataset": pl.String,
            "stage": pl.String,
            "check_name": pl.String,
            "action": pl.String,
            "n": pl.Int64,
            "example": pl.String,
        },
    )
    # The same check can be reported twice by one run (e.g. two files): sum them.
    rep = rep.group_by(
        "run_id", "dataset", "stage", "check_name", "action", maintain_order=True
    ).agg(pl.col("n").sum(), pl.col("example").first())
    store.write(con, [Write("pipeline_runs", run), Write("data_report", rep)])
