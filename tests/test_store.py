"""The DuckLake store: contract tables, idempotent writes, snapshots, locks, clear errors."""

from __future__ import annotations

import subprocess
import sys

import duckdb
import pyarrow as pa
import pytest

from features import contract, store
from features.store import WarehouseConfig, WarehouseError, Write


def items(ids: list[str], title: str = "t") -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            "dataset": ["d"] * n,
            "item_id": ids,
            "title": [f"{title}{i}" for i in ids],
            "text": [""] * n,
            "categories": [None] * n,
            "n_images": [0] * n,
        }
    )


def test_connect_creates_every_contract_table_and_view(wh: WarehouseConfig) -> None:
    with store.connect(wh) as con:
        names = {t for t, _ in store.table_counts(con)}
        views = {
            r[0]
            for r in con.execute(
                "SELECT view_name FROM duckdb_views() WHERE database_name='lake'"
            ).fetchall()
        }
    assert names == set(contract.TABLES) | {contract.WRITE_GUARDS.name}
    assert {"item_text_features", "item_image_features", "item_keywords"} <= views
    assert wh.catalog_path.exists()


def test_extensions_are_signature_checked_once_per_process_and_again_when_changed(
    wh: WarehouseConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "_VERIFIED", {})

    def unsigned_allowed() -> bool:
        with store.connect(wh) as con:
            return con.execute("SELECT current_setting('allow_unsigned_extensions')").fetchone()[0]

    assert unsigned_allowed() is False  # first connection: DuckDB checks the signatures
    assert set(store._VERIFIED) == {
        store._wheel_extension(f"duckdb_extension_{n}") for n in store.extensions_for(wh)
    }
    assert unsigned_allowed() is True  # the same files again: not re-checked
    some = next(iter(store._VERIFIED))
    store._VERIFIED[some] = (0, 0)  # as if the file changed since it was checked
    assert unsigned_allowed() is False
    assert store._VERIFIED[some] == store._stamp(some)


def test_a_view_whose_text_changed_is_recreated_on_connect(wh: WarehouseConfig) -> None:
    with store.connect(wh) as con:
        want = con.execute(
            "SELECT sql FROM duckdb_views() WHERE view_name = 'item_keywords'"
        ).fetchone()[0]
        con.execute("CREATE OR REPLACE VIEW item_keywords AS SELECT 1 AS x")
    with store.connect(wh) as con:  # the process already knows the canonical text
        got = con.execute(
            "SELECT sql FROM duckdb_views() WHERE view_name = 'item_keywords'"
        ).fetchone()[0]
    assert got == want


def test_reopening_commits_nothing(wh: WarehouseConfig) -> None:
    with store.connect(wh) as con:
        first = store.snapshot_id(con)
    with store.connect(wh) as con:
        assert store.snapshot_id(con) == first


def test_upsert_is_idempotent_and_skips_unchanged_rows(wh: WarehouseConfig) -> None:
    with store.connect(wh) as con:
        r1 = store.upsert(con, "items", items(["1", "2"]))
        s1 = store.snapshot_id(con)
        r2 = store.upsert(con, "items", items(["1", "2"]))
        assert (r1.inserted, r2.changed) == (2, False)
        assert store.snapshot_id(con) == s1  # nothing changed -> no snapshot
        r3 = store.upsert(con, "items", items(["2", "3"], title="new"))
        assert (r3.inserted, r3.updated, r3.deleted) == (1, 1, 0)
        rows = store.read_table(con, "items", where="dataset = ?", params=["d"]).to_pylist()
        assert sorted((r["item_id"], r["title"]) for r in rows) == [
            ("1", "t1"),
            ("2", "new2"),
            ("3", "new3"),
        ]
        # time travel: the first snapshot still has two rows
        assert store.read_table(con, "items", snapshot=s1).num_rows == 2


def test_replace_dataset_deletes_stale_keys_only_in_that_dataset(wh: WarehouseConfig) -> None:
    other = items(["9"]).set_column(0, "dataset", pa.array(["other"]))
    with store.connect(wh) as con:
        store.upsert(con, "items", other)
        store.replace_dataset(con, "items", "d", items(["1", "2"]))
        res = store.replace_dataset(con, "items", "d", items(["2"]))
        assert res.deleted == 1
        got = sorted(r["item_id"] for r in store.read_table(con, "items").to_pylist())
    assert got == ["2", "9"]


def test_write_is_all_or_nothing(wh: WarehouseConfig) -> None:
    bad_interactions = pa.table({"dataset": ["d"], "user_id": ["u"]})  # lacks columns
    with store.connect(wh) as con:
        with pytest.raises(ValueError, match="lack columns"):
            store.write(
                con, [Write("items", items(["1"])), Write("interactions", bad_interactions)]
            )
        assert store.read_table(con, "items").num_rows == 0


def test_duplicate_keys_are_rejected_with_the_table_named(wh: WarehouseConfig) -> None:
    with store.connect(wh) as con, pytest.raises(ValueError, match="items.*repeat a key"):
        store.upsert(con, "items", items(["1", "1"]))


def test_missing_catalog_is_a_clear_error(tmp_path) -> None:
    cfg = WarehouseConfig(root=tmp_path / "nowhere", attach=None, data_path=None)
    with pytest.raises(WarehouseError, match="no warehouse catalog at .*nowhere.*msm4sr ingest"):
        with store.connect(cfg, create=False):
            pass


def test_transient_errors_are_retried_then_reported() -> None:
    calls = {"n": 0}

    def flaky() -> int:
        calls["n"] += 1
        if calls["n"] < 3:
            raise duckdb.TransactionException("database is locked")
        return 7

    assert store._retry(flaky, 5, what="testing") == 7

    def locked() -> None:
        raise duckdb.TransactionException("database is locked")

    with pytest.raises(WarehouseError, match="still locked after 2 retries while testing"):
        store._retry(locked, 2, what="testing")

    def terminal() -> None:
        raise duckdb.BinderException("no such column")

    with pytest.raises(duckdb.BinderException):
        store._retry(terminal, 5, what="testing")


WRITER = """
import sys
from pathlib import Path
import pyarrow as pa
from features import store
from features.store import WarehouseConfig
wh = WarehouseConfig(root=Path(sys.argv[1]), attach=None, data_path=None)
with store.connect(wh) as con:
    for k in range(5):
        row = {"dataset": ["d"], "item_id": [sys.argv[2] + str(k)], "title": ["x"], "text": [""],
               "categories": [None], "n_images": [0]}
        store.upsert(con, "items", pa.table(row))
"""


def test_two_writer_processes_both_commit_nothing_lost(wh: WarehouseConfig) -> None:
    with store.connect(wh):
        pass
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(wh.root), p], stderr=subprocess.PIPE, text=True
        )
        for p in ("a", "b")
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    with store.connect(wh) as con:
        ids = sorted(r["item_id"] for r in store.read_table(con, "items").to_pylist())
    assert ids == [f"{p}{k}" for p in "ab" for k in range(5)]


def test_list_and_struct_columns_round_trip(wh: WarehouseConfig) -> None:
    rows = pa.table(
        {
            "sha256": ["abc"],
            "tagger_version": ["v1"],
            "status": ["tagged"],
            "keywords": [[{"word": "tabby cat", "score": 0.9, "source": "m"}]],
            "text": ["tabby cat"],
        }
    )
    with store.connect(wh) as con:
        store.upsert(con, "image_keywords", rows)
        got = store.read_table(con, "image_keywords").to_pylist()[0]
    assert got["keywords"][0]["word"] == "tabby cat"
    assert got["keywords"][0]["score"] == pytest.approx(0.9)
