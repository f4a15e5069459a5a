"""Issue 12, case 1: a re-ingest never removes rows it was not told to remove. An input with
no valid rows is refused and the dataset stays; a datetime or ISO-string timestamp in Parquet
simply works; an ingest that would delete a large share of a dataset's rows is refused (naming
what would go) unless --allow-deletes is given; report rows say what changed. On a real cut of
Amazon Office, through the CLI."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from features import store
from features.store import WarehouseConfig
from tests.cli_run import msm4sr, ok, one_line_error
from tests.helpers import write_office_cut

OFFICE_COLS = ("--item-key-col", "id", "--title-col", "text")


@pytest.fixture
def wh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WarehouseConfig:
    monkeypatch.setenv("MSM4SR_WAREHOUSE", str(tmp_path / "wh"))
    return WarehouseConfig(root=tmp_path / "wh", attach=None, data_path=None)


def ingest(inter: Path, items: Path, dataset: str = "office", *flags: str) -> str:
    return ok(
        "ingest", "generic", str(inter), str(items), "--dataset", dataset, *OFFICE_COLS, *flags
    )


def stored(wh: WarehouseConfig, dataset: str = "office") -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """(interactions, items, snapshot) of `dataset`, sorted."""
    with store.connect(wh, create=False, read_only=True) as con:
        where = f"dataset = '{dataset}'"
        inter = store.read_polars(con, "interactions", where=where).drop("dataset")
        items = store.read_polars(con, "items", where=where).drop("dataset")
        snap = store.snapshot_id(con)
    return inter.sort("user_id", "seq"), items.sort("item_id"), snap


def same(a: tuple, b: tuple) -> bool:
    return a[0].equals(b[0]) and a[1].equals(b[1]) and a[2] == b[2]


def last_ingest_report(wh: WarehouseConfig, dataset: str = "office") -> dict[str, int]:
    with store.connect(wh, create=False, read_only=True) as con:
        rows = con.execute(
            "SELECT check_name, n FROM data_report WHERE run_id = (SELECT run_id FROM "
            "pipeline_runs WHERE stage = 'ingest' AND dataset = ? ORDER BY started_at DESC "
            "LIMIT 1)",
            [dataset],
        ).fetchall()
    return dict(rows)


def test_an_input_without_valid_rows_is_refused_and_the_dataset_stays(
    wh: WarehouseConfig, tmp_path: Path
) -> None:
    inter, items = write_office_cut(tmp_path / "office", n_users=40)
    ingest(inter, items)
    before = stored(wh)
    assert before[0].height > 500
    header_only = tmp_path / "empty.csv"
    header_only.write_text(inter.read_text().splitlines()[0] + "\n")
    line = one_line_error(
        msm4sr(
            "ingest", "generic", str(header_only), str(items), "--dataset", "office", *OFFICE_COLS
        )
    )
    assert "no valid interactions" in line and "left as it was" in line
    # every row unparseable: refused too, and the message says which column and why
    garbage = tmp_path / "garbage.csv"
    garbage.write_text(
        "user_id,item_id,timestamp\n" + "".join(f"u{i},B00004VVIX,n/a\n" for i in range(9))
    )
    line = one_line_error(
        msm4sr("ingest", "generic", str(garbage), str(items), "--dataset", "office", *OFFICE_COLS)
    )
    assert "unparseable_timestamp 9" in line and "column 'timestamp'" in line
    assert same(stored(wh), before)  # same rows, no new snapshot


def test_datetime_and_string_timestamps_in_parquet_simply_work(
    wh: WarehouseConfig, tmp_path: Path
) -> None:
    inter, items = write_office_cut(tmp_path / "office", n_users=40)
    ingest(inter, items)
    csv_rows, _, snap = stored(wh)
    df = pl.read_csv(inter, schema_overrides={"user_id": pl.Int64, "timestamp": pl.Int64})
    as_datetime = df.with_columns(pl.from_epoch("timestamp", time_unit="s"))
    as_tz = as_datetime.with_columns(
        pl.col("timestamp").dt.replace_time_zone("UTC").dt.convert_time_zone("Asia/Tokyo")
    )
    as_iso = as_datetime.with_columns(pl.col("timestamp").dt.strftime("%Y-%m-%dT%H:%M:%S"))
    as_date_ms = df.with_columns(pl.col("timestamp") * 1000)
    for name, frame in [("dt", as_datetime), ("tz", as_tz), ("iso", as_iso), ("ms", as_date_ms)]:
        path = tmp_path / f"inter_{name}.parquet"
        frame.write_parquet(path)
        ingest(path, items)  # the same dataset again: nothing changes
        assert not [k for k in last_ingest_report(wh) if "_rows_" in k], name
        assert stored(wh)[0].equals(csv_rows), name
        ingest(path, items, f"office-{name}")  # and a new dataset gets every row
        assert stored(wh, f"office-{name}")[0].equals(csv_rows), name
    assert stored(wh)[2] > snap  # only run logs were committed to `office`


def test_a_large_delete_is_refused_unless_allowed_and_reported(
    wh: WarehouseConfig, tmp_path: Path
) -> None:
    inter, items = write_office_cut(tmp_path / "office", n_users=40)
    ingest(inter, items)
    full = stored(wh)
    assert last_ingest_report(wh)["interactions_rows_inserted"] == full[0].height
    few, few_items = write_office_cut(tmp_path / "few", n_users=10)
    res = msm4sr("ingest", "generic", str(few), str(few_items), "--dataset", "office", *OFFICE_COLS)
    line = one_line_error(res)
    assert f"of {full[0].height} interactions rows" in line and "--allow-deletes" in line
    assert "e.g." in line and "nothing was written" in line
    assert same(stored(wh), full)
    # a small change (2 of 40 users gone) is an ordinary re-ingest, reported row by row
    most, _ = write_office_cut(tmp_path / "most", n_users=38)
    ingest(most, items)
    after = stored(wh)
    gone = full[0].height - after[0].height
    assert gone > 0 and last_ingest_report(wh)["interactions_rows_deleted"] == gone
    # with the flag the large delete goes through, and says so
    ingest(few, few_items, "office", "--allow-deletes")
    small = stored(wh)
    report = last_ingest_report(wh)
    assert report["interactions_rows_deleted"] == after[0].height - small[0].height
    assert report["items_rows_deleted"] == after[1].height - small[1].height > 0
