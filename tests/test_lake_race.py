"""Two writers adding the same content-addressed key at once (two machines embedding one string)
leave it once: DuckLake checks no keys and lets two concurrent appends both land, so `store.write`
bumps a guard row per table it adds keys to; of two such commits the later conflicts and is
retried against the other's rows. Both commits are forced to overlap (a barrier between each
one's merge and its COMMIT), on the PostgreSQL catalog of the scale-out layout (where it failed
before the guard) and on the default SQLite one."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pytest

from features import contract, store
from features.store import WarehouseConfig
from tests.servers import S3, Postgres, pg, s3  # noqa: F401  (session fixtures)
from tests.test_lake_scale import lake_env  # noqa: F401  (fixture)


def _rows(keys: list[str]) -> pa.Table:
    n = len(keys)
    return pa.table(
        {
            "text_sha256": keys,
            "encoder_version": ["v"] * n,
            "text": keys,
            "vector": [[1.0, 2.0]] * n,
            "n_tokens": [1] * n,
            "truncated": [False] * n,
        }
    )


def _overlapping_upserts(
    cfg: WarehouseConfig, monkeypatch: pytest.MonkeyPatch
) -> list[store.WriteResult]:
    """Two threads upsert {a, shared} and {shared, b}; both merge before either commits."""
    barrier = threading.Barrier(2, timeout=30)
    first = threading.local()
    merge = store._merge

    def merge_then_wait(*args, **kwargs):  # type: ignore[no-untyped-def]
        res = merge(*args, **kwargs)
        if not getattr(first, "done", False):  # only each thread's first attempt waits
            first.done = True
            barrier.wait()
        return res

    monkeypatch.setattr(store, "_merge", merge_then_wait)
    with store.connect(cfg):
        pass  # the catalog and tables exist before the race

    def upsert(keys: list[str]) -> store.WriteResult:
        with store.connect(cfg) as con:
            return store.upsert(con, "text_embeddings", _rows(keys))

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(upsert, [["a", "shared"], ["shared", "b"]]))


def _key_counts(cfg: WarehouseConfig) -> list[tuple[str, int]]:
    with store.connect(cfg, read_only=True) as con:
        return con.execute(
            "SELECT text_sha256, count(*) FROM text_embeddings GROUP BY 1 ORDER BY 1"
        ).fetchall()


def test_overlapping_commits_of_one_key_on_postgres_keep_one_row(
    lake_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = WarehouseConfig()
    results = _overlapping_upserts(cfg, monkeypatch)
    assert _key_counts(cfg) == [("a", 1), ("b", 1), ("shared", 1)]
    # one writer added two keys, the retried one only its own
    assert sorted(r.inserted for r in results) == [1, 2]
    with store.connect(cfg, read_only=True) as con:
        guards = dict(con.execute(f"SELECT * FROM {contract.WRITE_GUARDS.name}").fetchall())
    assert set(guards) == set(contract.TABLES) and guards["text_embeddings"] == 2


def test_overlapping_commits_of_one_key_on_sqlite_keep_one_row(
    wh: WarehouseConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite's write lock serialises these commits even without the guard (this passes without
    # it). What it checks: two writers committing at once on the default layout both land. In
    # SQLite's rollback-journal mode about 1 race in 3 wedged both (a failed commit left a lock
    # that failed every retry); the catalog's WAL mode (store.WarehouseConfig.attach_sql) ended it.
    results = _overlapping_upserts(wh, monkeypatch)
    assert _key_counts(wh) == [("a", 1), ("b", 1), ("shared", 1)]
    assert sorted(r.inserted for r in results) == [1, 2]


def test_a_warehouse_from_before_the_guards_gains_them_on_its_first_writable_open(
    wh: WarehouseConfig,
) -> None:
    with store.connect(wh) as con:
        con.execute(f"DROP TABLE {contract.WRITE_GUARDS.name}")
    # a shard worker's kind of connection (create=False: the catalog must exist) then writes
    with store.connect(wh, create=False) as con:
        assert store.upsert(con, "text_embeddings", _rows(["x"])).inserted == 1
        guards = dict(con.execute(f"SELECT * FROM {contract.WRITE_GUARDS.name}").fetchall())
    assert set(guards) == set(contract.TABLES) and guards["text_embeddings"] == 1


def test_a_guard_row_deleted_by_hand_is_seeded_again_on_the_next_writable_open(
    wh: WarehouseConfig,
) -> None:
    with store.connect(wh) as con:
        store.upsert(con, "text_embeddings", _rows(["x"]))
        con.execute(
            f"DELETE FROM {contract.WRITE_GUARDS.name} WHERE table_name = 'text_embeddings'"
        )
    with store.connect(wh, read_only=True) as con:  # a reader changes nothing
        names = {
            r[0]
            for r in con.execute(f"SELECT table_name FROM {contract.WRITE_GUARDS.name}").fetchall()
        }
    assert "text_embeddings" not in names
    with store.connect(wh) as con:
        assert store.upsert(con, "text_embeddings", _rows(["y"])).inserted == 1
        guards = dict(con.execute(f"SELECT * FROM {contract.WRITE_GUARDS.name}").fetchall())
    # back, and bumped by the new key's commit (its count restarts from 0)
    assert set(guards) == set(contract.TABLES) and guards["text_embeddings"] == 1
