"""Issue 12, case 6: Parquet inputs with unexpected types. Integer, float and categorical ids
and datetime timestamps are converted; a column whose type cannot hold its field (a list of
user ids, a boolean timestamp, a struct title) and a file that is not Parquet are one-line
errors naming the file, the column and the type; values that do not convert are report rows
naming the column."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from pipeline.preprocess import preprocess
from pipeline.sources.generic import ColumnMap, read_generic
from tests.cli_run import msm4sr, one_line_error
from tests.helpers import write_office_cut


@pytest.fixture
def office(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[pl.DataFrame, Path]:
    monkeypatch.setenv("MSM4SR_WAREHOUSE", str(tmp_path / "wh"))
    inter, items = write_office_cut(tmp_path / "office", n_users=25)
    df = pl.read_csv(inter, schema_overrides={"user_id": pl.Int64, "timestamp": pl.Int64})
    return df, items


def ingest(inter: Path, items: Path):  # noqa: ANN201
    return msm4sr(
        "ingest", "generic", str(inter), str(items), "--dataset", "office",
        "--item-key-col", "id", "--title-col", "text",
    )  # fmt: skip


def test_columns_of_the_wrong_type_are_one_line_errors(office, tmp_path: Path) -> None:
    df, items = office
    listed = tmp_path / "listed.parquet"
    df.with_columns(pl.concat_list("user_id")).write_parquet(listed)
    line = one_line_error(ingest(listed, items))
    assert "listed.parquet" in line and "'user_id'" in line and "List(Int64)" in line

    boolean = tmp_path / "boolean.parquet"
    df.with_columns(pl.col("timestamp") > 0).write_parquet(boolean)
    line = one_line_error(ingest(boolean, items))
    assert "boolean.parquet" in line and "'timestamp'" in line and "Boolean" in line

    not_parquet = tmp_path / "inter.parquet"
    not_parquet.write_text("user_id,item_id,timestamp\n1,B00004VVIX,970185600\n")
    line = one_line_error(ingest(not_parquet, items))
    assert "inter.parquet" in line and "not a readable Parquet file" in line

    struct_items = tmp_path / "items.parquet"
    pl.read_csv(items, separator="\t").with_columns(pl.struct("text")).write_parquet(struct_items)
    inter_ok = tmp_path / "inter_ok.parquet"
    df.write_parquet(inter_ok)
    line = one_line_error(ingest(inter_ok, struct_items))
    assert "items.parquet" in line and "'text'" in line and "Struct" in line


def test_typed_ids_and_timestamps_are_converted(office, tmp_path: Path) -> None:
    df, items = office
    as_strings = read_generic(_csv(df, tmp_path), items, "d", _cols())
    typed = df.with_columns(
        pl.col("user_id").cast(pl.Float64),  # 12.0 -> "12"
        pl.col("item_id").cast(pl.Categorical),
        pl.from_epoch("timestamp", time_unit="s").dt.replace_time_zone("UTC"),
    )
    typed.write_parquet(tmp_path / "typed.parquet")
    raw = read_generic(tmp_path / "typed.parquet", items, "d", _cols())
    assert raw.report.rows == as_strings.report.rows
    assert preprocess(raw)[1].equals(preprocess(as_strings)[1])


def test_values_that_do_not_convert_are_report_rows_naming_the_column(
    office, tmp_path: Path
) -> None:
    df, items = office
    mixed = df.with_columns(
        pl.when(pl.int_range(pl.len()) % 10 == 0)
        .then(pl.lit("not a time"))
        .otherwise(pl.from_epoch("timestamp", time_unit="s").dt.strftime("%Y-%m-%d %H:%M:%S"))
        .alias("timestamp"),
        pl.when(pl.int_range(pl.len()) == 3)
        .then(1.5)
        .otherwise(pl.col("user_id"))
        .alias("user_id"),
    )
    mixed.write_parquet(tmp_path / "mixed.parquet")
    raw = read_generic(tmp_path / "mixed.parquet", items, "d", _cols())
    rows = {r.check_name: r for r in raw.report.rows}
    bad_ts = rows["unparseable_timestamp"]
    assert bad_ts.n == (df.height + 9) // 10  # every 10th row; row index 3 goes for its id
    assert "column 'timestamp' (String) value not a time" in bad_ts.example
    assert (
        rows["unparseable_interaction"].n == 1
        and "'user_id'" in rows["unparseable_interaction"].example
    )
    assert raw.interactions.height + bad_ts.n + 1 == df.height == raw.n_read_interactions


def _csv(df: pl.DataFrame, tmp_path: Path) -> Path:
    path = tmp_path / "inter.csv"
    df.write_csv(path)
    return path


def _cols() -> ColumnMap:
    return ColumnMap(item_key="id", title="text")
