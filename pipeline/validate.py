"""`msm4sr validate`: what the last ingest dropped or repaired, plus integrity checks run on the
warehouse itself. Results are printed and stored (data_report rows of a `validate` run)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb

from features import store
from features.runlog import Report, log_run, new_run_id
from features.store import WarehouseConfig

# (check name, severity, SQL returning (n, example) for dataset = $1)
CHECKS: list[tuple[str, str, str]] = [
    (
        "interaction_item_not_in_items",
        "error",
        "SELECT count(*), any_value(i.item_id) FROM interactions i ANTI JOIN items t "
        "ON t.dataset = i.dataset AND t.item_id = i.item_id WHERE i.dataset = $1",
    ),
    (
        "user_below_min_interactions",
        "error",
        "SELECT count(*), any_value(user_id) FROM (SELECT user_id FROM interactions "
        "WHERE dataset = $1 GROUP BY user_id HAVING count(*) < $2)",
    ),
    (
        "seq_not_contiguous",
        "error",
        "SELECT count(*), any_value(user_id) FROM (SELECT user_id FROM interactions "
        "WHERE dataset = $1 GROUP BY user_id HAVING max(seq) + 1 <> count(*) OR min(seq) <> 0)",
    ),
    (
        "image_of_unknown_item",
        "error",
        "SELECT count(*), any_value(m.item_id) FROM item_images m ANTI JOIN items t "
        "ON t.dataset = m.dataset AND t.item_id = m.item_id WHERE m.dataset = $1",
    ),
    (
        "item_with_empty_text",
        "info",
        "SELECT count(*), any_value(item_id) FROM items WHERE dataset = $1 "
        "AND coalesce(title, '') = '' AND coalesce(text, '') = '' AND coalesce(categories, '') = ''",
    ),
    (
        "item_without_ok_image",
        "info",
        "SELECT count(*), any_value(item_id) FROM items WHERE dataset = $1 AND n_images = 0",
    ),
    (
        "image_not_ok",
        "warning",
        "SELECT count(*), any_value(uri || ': ' || status || ' ' || coalesce(error, '')) "
        "FROM item_images WHERE dataset = $1 AND status <> 'ok'",
    ),
]


@dataclass
class Finding:
    source: str  # "ingest <run_id>" or "warehouse"
    check_name: str
    action: str  # dropped / repaired / kept / info (ingest) or error / warning / info (warehouse)
    n: int
    example: str


def validate(
    dataset: str, wh: WarehouseConfig | None = None, min_user_interactions: int = 5
) -> list[Finding]:
    """Findings of the last ingest of `dataset` and of the warehouse checks; logs a validate run."""
    started = datetime.now(UTC)
    findings: list[Finding] = []
    with store.connect(wh, create=False) as con:
        n_inter = con.execute(
            "SELECT count(*) FROM interactions WHERE dataset = ?", [dataset]
        ).fetchone()[0]
        n_items = con.execute("SELECT count(*) FROM items WHERE dataset = ?", [dataset]).fetchone()[
            0
        ]
        if not n_inter and not n_items:
            known = [
                r[0]
                for r in con.execute("SELECT DISTINCT dataset FROM items ORDER BY 1").fetchall()
            ]
            raise ValueError(f"{dataset=} is not in the warehouse; ingested datasets: {known}")
        last = con.execute(
            "SELECT run_id FROM pipeline_runs WHERE stage = 'ingest' AND dataset = ? "
            "ORDER BY started_at DESC LIMIT 1",
            [dataset],
        ).fetchone()
        if last:
            for check, action, n, ex in con.execute(
                "SELECT check_name, action, n, example FROM data_report WHERE run_id = ? ORDER BY check_name",
                [last[0]],
            ).fetchall():
                findings.append(Finding(f"ingest {last[0]}", check, action, int(n), ex or ""))
        report = Report()
        for check, severity, sql in CHECKS:
            n, ex = _run_check(con, sql, dataset, min_user_interactions)
            findings.append(Finding("warehouse", check, severity if n else "ok", n, ex))
            report.add(check, severity, n, ex)
        run_id = new_run_id("validate", dataset)
        summary = {
            "n_items": n_items,
            "n_interactions": n_inter,
            "errors": sum(f.n for f in findings if f.action == "error"),
        }
        log_run(
            con,
            run_id,
            "validate",
            dataset,
            started,
            json.dumps(summary),
            store.snapshot_id(con),
            report,
        )
    return findings


def _run_check(con: duckdb.DuckDBPyConnection, sql: str, dataset: str, k: int) -> tuple[int, str]:
    params = [dataset, k] if "$2" in sql else [dataset]
    n, ex = con.execute(sql, params).fetchone()
    return int(n or 0), "" if ex is None else str(ex)
