"""User SQL on the warehouse that cannot write anything: the engine of `msm4sr sql`.

Four locks, each enough for the common attacks, together for the rest:

1. Only read statements: the string is split with DuckDB's own parser and every statement
   must be a SELECT (DESCRIBE / SHOW / SUMMARIZE / PRAGMA table_info parse as SELECT), or an
   EXPLAIN of one; ATTACH, DETACH, USE, COPY, EXPORT, SET, CREATE, INSERT... are refused before
   anything runs. One statement per call.
2. No writing functions inside a SELECT: DuckLake's maintenance functions (cleanup, merge,
   rewrite, expire, flush...), `query()` / `query_table()` (SQL in a string), `sqlite_attach` /
   `sqlite_query`, checkpoints and logging switches are refused by name, found in the parsed
   statement (`json_serialize_sql`).
3. The warehouse is attached READ_ONLY: DuckLake itself refuses any change.
4. External access is off (only the warehouse's data path may be read) and the configuration
   is locked, so no statement can turn these back on, read other files or load extensions.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import duckdb

from features import store
from features.store import ALIAS, WarehouseConfig

# Table functions that only read (everything else named ducklake_* may write).
_DUCKLAKE_READERS = {
    "ducklake_current_snapshot",
    "ducklake_last_committed_snapshot",
    "ducklake_list_files",
    "ducklake_options",
    "ducklake_settings",
    "ducklake_snapshots",
    "ducklake_table_changes",
    "ducklake_table_deletions",
    "ducklake_table_info",
    "ducklake_table_insertions",
    "ducklake_scan",
}
_REFUSED_FUNCTIONS = {
    "query",
    "query_table",
    "json_execute_serialized_sql",
    "sqlite_attach",
    "sqlite_query",
    "postgres_attach",
    "postgres_execute",
    "postgres_query",
    "mysql_execute",
    "mysql_query",
    "checkpoint",
    "force_checkpoint",
    "enable_logging",
    "disable_logging",
    "truncate_duckdb_logs",
    "enable_profiling",
    "disable_profiling",
}
_EXPLAIN = re.compile(r"^\s*explain\s+(analyze\s+)?", re.IGNORECASE)


class ReadOnlyError(ValueError):
    """The SQL is not a single read statement `msm4sr sql` runs."""


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[tuple]
    more: bool  # rows beyond the limit were left out


def _function_names(tree: Any) -> Iterator[str]:
    """Every function name in a parsed statement (json_serialize_sql output)."""
    if isinstance(tree, dict):
        name = tree.get("function_name")
        if isinstance(name, str):
            yield name.lower()
        for v in tree.values():
            yield from _function_names(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _function_names(v)


def _refused_function(name: str) -> bool:
    if name in _REFUSED_FUNCTIONS:
        return True
    return name.startswith("ducklake_") and name not in _DUCKLAKE_READERS


def check_query(con: duckdb.DuckDBPyConnection, query: str) -> str:
    """The one read statement of `query`, or ReadOnlyError saying why it is refused."""
    if not query or not query.strip():
        raise ReadOnlyError("empty query: give one SELECT statement")
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as e:
        raise ReadOnlyError(f"SQL does not parse: {str(e).splitlines()[0]}") from None
    if not statements:
        raise ReadOnlyError("empty query: give one SELECT statement")
    if len(statements) > 1:
        raise ReadOnlyError(
            f"{len(statements)} statements given: msm4sr sql runs one SELECT at a time"
        )
    stmt = statements[0]
    text = stmt.query
    if stmt.type == duckdb.StatementType.EXPLAIN:
        inner = _EXPLAIN.sub("", text, count=1)
        if inner == text:
            raise ReadOnlyError("only EXPLAIN [ANALYZE] SELECT ... is accepted")
        check_query(con, inner)
        return text
    if stmt.type != duckdb.StatementType.SELECT:
        raise ReadOnlyError(
            f"{stmt.type.name} statements are refused: msm4sr sql is read-only (SELECT only)"
        )
    parsed = json.loads(con.execute("SELECT json_serialize_sql(?)", [text]).fetchone()[0])
    if parsed.get("error"):
        raise ReadOnlyError(f"SQL refused: {parsed.get('error_message', 'not a plain SELECT')}")
    bad = sorted({n for n in _function_names(parsed) if _refused_function(n)})
    if bad:
        raise ReadOnlyError(f"function(s) {bad} are refused: msm4sr sql is read-only")
    return text


def lock_down(con: duckdb.DuckDBPyConnection, data_dir: str | None) -> None:
    """External access off except the warehouse's data path; configuration locked.

    data_dir: the DATA_PATH given on ATTACH; None reads the one the catalog records."""
    if not data_dir:
        row = con.execute(
            f"SELECT value FROM ducklake_options('{ALIAS}') WHERE option_name = 'data_path'"
        ).fetchone()
        data_dir = row[0] if row else None
    con.execute("SET allowed_directories = ?", [[data_dir] if data_dir else []])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


@contextlib.contextmanager
def open_readonly(wh: WarehouseConfig | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection with the warehouse attached READ_ONLY and locked down (see lock_down)."""
    wh = wh or WarehouseConfig()
    with store.connect(wh, create=False, read_only=True) as con:
        lock_down(con, wh.data_dir)
        yield con


def execute(con: duckdb.DuckDBPyConnection, query: str, limit: int) -> QueryResult:
    """Check `query` (check_query) and run it on a locked-down connection."""
    if limit < 0:
        raise ReadOnlyError(f"--limit {limit} must be >= 0")
    cur = con.execute(check_query(con, query))
    if cur.description is None:
        return QueryResult([], [], False)
    columns = [d[0] for d in cur.description]
    rows = cur.fetchmany(limit + 1)
    return QueryResult(columns, rows[:limit], len(rows) > limit)


def run_query(query: str, limit: int, wh: WarehouseConfig | None = None) -> QueryResult:
    """Run one read statement on its own READ_ONLY, locked-down attach of the warehouse."""
    with open_readonly(wh) as con:
        return execute(con, query, limit)
