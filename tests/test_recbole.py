"""RecBole atomic files in and out, on real DuckLake warehouses: a hand-written atomic dataset
with the usual defects, and a real MovieLens cut exported and read back."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from features import store
from features.store import WarehouseConfig
from pipeline.ingest import ingest
from pipeline.sources import read_source
from pipeline.sources.base import SourceError
from pipeline.sources.recbole import export_recbole, read_recbole
from tests.ml_cut import write_ml_cut


def write_atomic(folder: Path, name: str, inter: list[str], item: list[str] | None) -> Path:
    d = folder / name
    d.mkdir(parents=True)
    (d / f"{name}.inter").write_text("\n".join(inter) + "\n")
    if item is not None:
        (d / f"{name}.item").write_text("\n".join(item) + "\n")
    return d


def sequences(wh: WarehouseConfig, dataset: str) -> dict[str, list[str]]:
    """user -> items in `seq` order, as the trainer reads them."""
    with store.connect(wh, create=False, read_only=True) as con:
        rows = con.execute(
            "SELECT user_id, list(item_id ORDER BY seq) FROM interactions WHERE dataset = ? "
            "GROUP BY user_id",
            [dataset],
        ).fetchall()
    return dict(rows)


def test_read_recbole_keeps_time_order_ties_in_file_order_and_reports_bad_lines(
    tmp_path: Path, wh: WarehouseConfig
) -> None:
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    inter += [f"u1\ti{k}\t4\t{100 + k}" for k in (5, 4, 3, 2, 1)]  # file order != time order
    inter += [
        "u2\ti1\t3\t50",
        "u2\ti2\t3\t50",
        "u2\ti3\t3\t50.5",
        "u2\ti4\t3\t50.2",
        "u2\ti5\t3\t7",
    ]
    inter += ["u2\ti1\t5\t60"]  # repeated pair: the last (latest) one is kept
    inter += ["u3\ti1\t3\t1", "u3\ti2\t3\t2"]  # 2 interactions: below the threshold
    inter += ["u1\ti9\t4", "u1\ti8\t4\tnot-a-time"]  # ragged, unparseable
    item = ["item_id:token\tmovie_title:token_seq\tgenre:token_seq"]
    item += [f"i{k}\tMovie {k}\tDrama" for k in range(1, 6)]
    raw = read_recbole(write_atomic(tmp_path, "tiny", inter, item))
    assert raw.dataset == "tiny"
    s = ingest(raw, wh, progress=False)
    assert (s.n_users, s.n_interactions, s.n_items) == (2, 10, 5)
    seqs = sequences(wh, "tiny")
    assert seqs["u1"] == ["i1", "i2", "i3", "i4", "i5"]
    # 7 < 50 = 50 (file order) < 50.2 < 50.5 < 60 (the repeated i1 moved to its last time)
    assert seqs["u2"] == ["i5", "i2", "i4", "i3", "i1"]
    checks = {r["check_name"]: r["n"] for r in s.report}
    assert checks["ragged_line"] == 1
    assert checks["unparseable_interaction"] == 1
    assert checks["duplicate_interaction"] == 1
    assert checks["user_below_5_interactions"] == 2
    with store.connect(wh, create=False, read_only=True) as con:
        titles = dict(
            con.execute("SELECT item_id, title || '|' || categories FROM items").fetchall()
        )
    assert titles["i3"] == "Movie 3|Drama"


def test_read_recbole_without_item_file_or_timestamp(tmp_path: Path, wh: WarehouseConfig) -> None:
    inter = ["user_id:token\titem_id:token"] + [f"7\t{k}" for k in (3, 1, 2, 9, 4)]
    raw = read_recbole(write_atomic(tmp_path, "bare", inter, None), dataset="other")
    s = ingest(raw, wh, progress=False)
    assert (s.dataset, s.n_items) == ("other", 5)
    assert sequences(wh, "other")["7"] == ["3", "1", "2", "9", "4"]  # file order is time order


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("user_id\titem_id:token", "header field 'user_id' is not name:type"),
        ("user_id:token\titem_id:int", "header field 'item_id:int'"),
        ("uid:token\titem_id:token", "has no field 'user_id'"),
    ],
)
def test_malformed_atomic_files_are_one_line_errors(
    tmp_path: Path, header: str, message: str
) -> None:
    d = write_atomic(tmp_path, "bad", [header, "1\t2"], None)
    with pytest.raises(SourceError, match=message) as e:
        read_recbole(d)
    assert "\n" not in str(e.value)


def test_folder_without_a_single_inter_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.inter").write_text("user_id:token\titem_id:token\n")
    (tmp_path / "b.inter").write_text("user_id:token\titem_id:token\n")
    with pytest.raises(SourceError, match=r"expected one <name>.inter file, found \['a', 'b'\]"):
        read_recbole(tmp_path)


def test_export_then_ingest_round_trips_a_real_movielens_cut(
    tmp_path: Path, wh: WarehouseConfig
) -> None:
    src = write_ml_cut(tmp_path / "ml", range(1, 121), max_ratings=6000)
    ingest(read_source("movielens", src, "cut"), wh, progress=False)
    with store.connect(wh, create=False, read_only=True) as con:
        ties = con.execute(
            "SELECT count(*) FROM (SELECT user_id, ts FROM interactions WHERE dataset = 'cut' "
            "GROUP BY ALL HAVING count(*) > 1)"
        ).fetchone()[0]
        snap = store.snapshot_id(con)
    assert ties > 10  # same-second ratings: the case the timestamps must order
    out = export_recbole("cut", tmp_path / "rb", wh, name="ml_cut")
    assert out == tmp_path / "rb" / "ml_cut"
    lines = (out / "ml_cut.inter").read_text().splitlines()
    assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float"
    assert (out / "ml_cut.item").read_text().splitlines()[0] == (
        "item_id:token\ttitle:token_seq\tcategories:token_seq"
    )
    # RecBole's time ordering (a sort by timestamp, then per-user grouping) gives `seq` order.
    df = pl.read_csv(
        out / "ml_cut.inter",
        separator="\t",
        schema_overrides={"user_id:token": pl.String, "item_id:token": pl.String},
    )
    df.columns = ["user_id", "item_id", "timestamp"]
    by_time = df.sample(fraction=1.0, shuffle=True, seed=1).sort("timestamp")
    recbole_order = dict(
        by_time.group_by("user_id", maintain_order=True).agg("item_id").iter_rows()
    )
    original = sequences(wh, "cut")
    assert recbole_order == original
    assert (
        by_time.group_by("user_id")
        .agg(pl.col("timestamp").n_unique() == pl.len())
        .get_column("timestamp")
        .all()
    )

    back = ingest(read_recbole(out, dataset="cut-back"), wh, progress=False)
    assert (back.n_users, back.n_interactions) == (len(original), df.height)
    assert sequences(wh, "cut-back") == original
    assert not [r for r in back.report if r["action"] == "dropped"]
    # an export at the earlier snapshot after a change still writes the old rows
    ingest(
        read_source("movielens", write_ml_cut(tmp_path / "ml2", range(1, 61)), "cut"),
        wh,
        progress=False,
        allow_deletes=True,
    )
    old = export_recbole("cut", tmp_path / "old", wh, snapshot=snap)
    assert (old / "cut.inter").read_text() == (out / "ml_cut.inter").read_text()


def test_export_of_an_unknown_dataset_names_the_known_ones(
    tmp_path: Path, wh: WarehouseConfig
) -> None:
    inter = ["user_id:token\titem_id:token"] + [f"7\t{k}" for k in range(5)]
    ingest(read_recbole(write_atomic(tmp_path, "x", inter, None)), wh, progress=False)
    with pytest.raises(
        ValueError, match=r"no interactions for dataset='nope' .* datasets: \['x'\]"
    ):
        export_recbole("nope", tmp_path / "out", wh)
