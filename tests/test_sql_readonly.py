"""Issue 12, case 2: `msm4sr sql` cannot write. The issue's attack (re-attach the catalog
writable and delete), its variants (a plain sqlite attach of the catalog, COPY, DuckLake's
maintenance functions, SQL hidden in query(), switching external access back on) all fail
with one line, and afterwards the warehouse is byte-for-byte what it was; reads still work."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from features.store import WarehouseConfig
from tests.cli_run import msm4sr, ok, one_line_error, scalar
from tests.helpers import warehouse_fingerprint, write_office_cut


@pytest.fixture(scope="module")
def wh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A warehouse holding a real Amazon Office cut, ingested twice (two snapshots of data)."""
    root = tmp_path_factory.mktemp("sql")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MSM4SR_WAREHOUSE", str(root / "wh"))
        inter, items = write_office_cut(root / "office", n_users=40)
        ok(
            "ingest",
            "generic",
            str(inter),
            str(items),
            "--dataset",
            "office",
            "--item-key-col",
            "id",
            "--title-col",
            "text",
        )
        more, _ = write_office_cut(root / "office2", n_users=45)
        ok(
            "ingest",
            "generic",
            str(more),
            str(items),
            "--dataset",
            "office",
            "--item-key-col",
            "id",
            "--title-col",
            "text",
        )
        yield root / "wh"


def count(table: str) -> int:
    return int(scalar(ok("sql", f"select count(*) from {table}", "--csv")))


def attacks(wh: Path, out: Path) -> list[str]:
    cat, data = wh / "catalog.sqlite", f"{wh}/data/"
    return [
        # the issue's string
        f"USE memory; DETACH lake; ATTACH 'ducklake:sqlite:{cat}' AS w (DATA_PATH '{data}'); "
        "DELETE FROM w.interactions; DROP TABLE w.items",
        # its parts, one at a time
        "USE memory",
        "DETACH lake",
        f"ATTACH 'ducklake:sqlite:{cat}' AS w (DATA_PATH '{data}', OVERRIDE_DATA_PATH true)",
        f"ATTACH '{cat}' AS s (TYPE sqlite)",
        f"ATTACH '{cat}' AS s (TYPE sqlite); DELETE FROM s.ducklake_data_file",
        "DELETE FROM interactions",
        "DROP TABLE items",
        "INSERT INTO items (dataset, item_id) VALUES ('office', 'x')",
        "CREATE TABLE memory.main.t AS SELECT 1",
        "SELECT 1; DELETE FROM interactions",
        "EXPLAIN ANALYZE DELETE FROM interactions",
        # files written or read outside the warehouse
        f"COPY (SELECT * FROM items) TO '{out}/items.csv'",
        f"COPY items TO '{data}x.parquet'",
        f"EXPORT DATABASE '{out}/export'",
        "SELECT * FROM read_text('/etc/hostname')",
        # writing functions inside a SELECT
        "SELECT * FROM ducklake_cleanup_old_files('lake', cleanup_all => true)",
        "SELECT * FROM ducklake_merge_adjacent_files('lake')",
        "SELECT * FROM ducklake_rewrite_data_files('lake')",
        "SELECT * FROM ducklake_expire_snapshots('lake', older_than => now())",
        "CALL ducklake_expire_snapshots('lake', older_than => now())",
        "SELECT * FROM query('DELETE FROM interactions')",
        "SELECT * FROM (SELECT * FROM query('SELECT 1'))",
        f"SELECT * FROM sqlite_attach('{cat}')",
        f"SELECT * FROM sqlite_query('{cat}', 'DELETE FROM ducklake_data_file')",
        # configuration
        "SET enable_external_access = true",
        "RESET lock_configuration",
        "INSTALL httpfs",
        "LOAD sqlite_scanner",
        "CHECKPOINT",
    ]


def test_the_issues_attack_fails_with_one_line_and_changes_nothing(
    wh: Path, tmp_path: Path
) -> None:
    before = warehouse_fingerprint(wh)
    n_inter, n_items = count("interactions"), count("items")
    for sql in attacks(wh, tmp_path)[:1] + [f"COPY (SELECT * FROM items) TO '{tmp_path}/x.csv'"]:
        line = one_line_error(msm4sr("sql", sql))
        assert "read-only" in line or "statements given" in line, line
    assert (count("interactions"), count("items")) == (n_inter, n_items) and n_inter > 0
    assert warehouse_fingerprint(wh) == before and list(tmp_path.iterdir()) == []


def test_every_variant_is_refused_and_changes_nothing(wh: Path, tmp_path: Path) -> None:
    """All variants in one locked-down session (each would also fail on a fresh one): a
    refused statement leaves the session as it was, so later ones meet the same locks."""
    from features.readonly_sql import ReadOnlyError, execute, open_readonly

    before = warehouse_fingerprint(wh)
    wcfg = WarehouseConfig(root=wh, attach=None, data_path=None)
    with open_readonly(wcfg) as con:
        n_inter = execute(con, "select count(*) from interactions", 1).rows[0][0]
        for sql in attacks(wh, tmp_path):
            with pytest.raises((ReadOnlyError, duckdb.Error)) as e:
                execute(con, sql, 10)
            assert isinstance(e.value, ReadOnlyError) or "disabled" in str(e.value), (sql, e.value)
        assert execute(con, "select count(*) from interactions", 1).rows[0][0] == n_inter > 0
    assert warehouse_fingerprint(wh) == before and list(tmp_path.iterdir()) == []


def test_empty_and_broken_sql_are_one_line_errors(wh: Path) -> None:
    for sql in ("", "   ", " ; "):
        assert "empty query" in one_line_error(msm4sr("sql", sql))
    assert "SQL does not parse" in one_line_error(msm4sr("sql", "selec 1 frm"))
    assert "nope" in one_line_error(msm4sr("sql", "select nope from items"))


def test_reads_still_work(wh: Path) -> None:
    from features.readonly_sql import execute, open_readonly

    wcfg = WarehouseConfig(root=wh, attach=None, data_path=None)
    with open_readonly(wcfg) as con:

        def one(sql: str) -> object:
            return execute(con, sql, 5).rows[0][0]

        first = one("select min(snapshot_id) from pipeline_runs where stage = 'ingest'")
        then = one(f"select count(*) from interactions at (version => {first})")
        assert 0 < then < one("select count(*) from interactions")
        assert one("select count(*) from lake.snapshots()") >= 4
        assert "interactions" in [r[0] for r in execute(con, "show tables", 50).rows]
        assert one("describe items") == "dataset"
        assert "DUCKLAKE_SCAN" in str(execute(con, "explain select item_id from items", 5).rows)
        assert one("select count(*) from ducklake_table_info('lake')") > 0
    assert "office" in ok("sql", "select dataset from interactions limit 1")
