"""The store API over DuckLake: one `connect()` context manager and idempotent writes.

DuckLake keeps every table as Parquet files under a data path and records tables, files and
snapshots in a catalog database. The default catalog is SQLite (`warehouse/catalog.sqlite`, in
WAL mode, so a reader can query while a flow writes) with data in `warehouse/data/`; any DuckLake
ATTACH string works (e.g. `ducklake:postgres:dbname=lake host=...` with `DATA_PATH
's3://bucket/lake/'`): set MSM4SR_LAKE_ATTACH / MSM4SR_LAKE_DATA. S3 credentials come from the
standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION,
AWS_ENDPOINT_URL) as a temporary DuckDB secret, or, when those are unset, from a persistent
DuckDB secret (docs/cluster.md).

Writes go through `upsert` / `replace_dataset`, which MERGE on the contract's keys inside one
transaction and skip the commit when nothing changed, so re-running a stage on the same input
leaves no new snapshot. Commits that hit a lock ("database is locked", a DuckLake write-write
conflict) are retried with backoff; other errors roll back and are raised.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import duckdb
import polars as pl
import pyarrow as pa

from features import contract
from features.contract import TableSpec

REPO_ROOT = Path(__file__).resolve().parents[1]
VIEWS_DIR = REPO_ROOT / "warehouse" / "views"
ALIAS = "lake"

T = TypeVar("T")


class WarehouseError(RuntimeError):
    """A terminal warehouse problem, with a message that says what to do."""


@dataclass
class DeletePlan:
    """What replacing a dataset's rows of one table would delete."""

    table: str
    dataset: str
    n_stored: int  # the dataset's rows in the table now
    n_delete: int  # of those, rows whose key is absent from the new rows
    examples: list[tuple] = field(default_factory=list)  # a few of the keys that would go

    @property
    def share(self) -> float:
        return self.n_delete / self.n_stored if self.n_stored else 0.0

    def describe(self) -> str:
        ex = ", ".join(str(k) for k in self.examples)
        return (
            f"{self.n_delete} of {self.n_stored} {self.table} rows ({self.share:.0%}"
            + (f"; e.g. {ex}" if ex else "")
            + ")"
        )


class DeleteRefused(WarehouseError):
    """A write would delete more of a dataset's stored rows than it was allowed to."""

    def __init__(self, plans: list[DeletePlan], limit: float, hint: str = "") -> None:
        self.plans = plans
        what = " and ".join(p.describe() for p in plans)
        super().__init__(
            f"refused: this would delete {what} of dataset {plans[0].dataset!r}, more than "
            f"{limit:.0%} of what is stored; nothing was written." + (f" {hint}" if hint else "")
        )


@dataclass
class WarehouseConfig:
    """Where the warehouse lives."""

    # Folder holding catalog.sqlite and data/ (the default single-machine layout).
    root: Path = field(
        default_factory=lambda: Path(os.environ.get("MSM4SR_WAREHOUSE", REPO_ROOT / "warehouse"))
    )
    # A full DuckLake ATTACH target overriding root, e.g. "ducklake:postgres:dbname=lake".
    attach: str | None = field(default_factory=lambda: os.environ.get("MSM4SR_LAKE_ATTACH"))
    # DATA_PATH for `attach` (e.g. "s3://bucket/lake/"); ignored for the default layout.
    data_path: str | None = field(default_factory=lambda: os.environ.get("MSM4SR_LAKE_DATA"))
    # Retries of a commit that hit a lock or a write-write conflict.
    max_retries: int = 8

    @property
    def catalog_path(self) -> Path:
        return Path(self.root) / "catalog.sqlite"

    def attach_sql(self, read_only: bool = False) -> str:
        """The ATTACH statement. The default layout's data path is always `<root>/data/`, where
        the folder lies now: OVERRIDE_DATA_PATH makes a copied or moved warehouse folder open
        (DuckLake records file paths relative to the data path, the data path itself absolute)."""
        opts = [f"DATA_PATH {_sql_literal(self.data_dir)}"] if self.data_dir else []
        if not self.attach:
            opts.append("OVERRIDE_DATA_PATH true")
        if read_only:
            opts.append("READ_ONLY")
        elif not self.attach:
            # The SQLite catalog in WAL mode (persistent: a reader then reads it so too):
            # readers neither block nor wait for a writer. In SQLite's default rollback-journal
            # mode two writers committing at once could wedge each other: one's failed commit
            # left a lock that failed every retry of both ("database is locked" for ~100 s,
            # then an error; 1 race in 3 in tests/test_lake_race.py).
            opts.append("META_JOURNAL_MODE 'WAL'")
        return f"ATTACH {_sql_literal(self.attach_target)} AS {ALIAS}" + (
            f" ({', '.join(opts)})" if opts else ""
        )

    @property
    def attach_target(self) -> str:
        return self.attach or f"ducklake:sqlite:{self.catalog_path}"

    @property
    def data_dir(self) -> str | None:
        """The DATA_PATH given on ATTACH (None: the one the catalog records)."""
        if self.attach:
            return self.data_path
        return str(Path(self.root).resolve() / "data") + "/"

    def exists(self) -> bool:
        return bool(self.attach) or self.catalog_path.exists()

    @property
    def location(self) -> str:
        """The catalog, for messages: the sqlite path, or the ATTACH target without a password."""
        if not self.attach:
            return str(self.catalog_path)
        return re.sub(r"(password=)\S+", r"\1***", self.attach, flags=re.IGNORECASE)


# --------------------------------------------------------------------------- extensions


def _wheel_extension(module: str) -> Path | None:
    """The extension binary shipped in a `duckdb-extension-*` wheel, if installed."""
    try:
        mod = __import__(module)
    except ImportError:
        return None
    base = Path(mod.__file__).parent / "extensions" / f"v{duckdb.__version__}"
    hits = sorted(base.glob("*.duckdb_extension"))
    return hits[0] if hits else None


# Wheel extensions whose signature DuckDB has checked in this process, with the file's
# (size, mtime_ns) then. Checking costs ~0.25 s a connection (ducklake + sqlite_scanner are
# ~35 MB each); a report or a training run opens hundreds of connections.
_VERIFIED: dict[Path, tuple[int, int]] = {}


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def extensions_for(cfg: WarehouseConfig) -> list[str]:
    """The DuckDB extensions a connection to this warehouse loads."""
    names = ["ducklake"]
    if not cfg.attach or cfg.attach.startswith("ducklake:sqlite:"):
        names.append("sqlite_scanner")
    elif cfg.attach.startswith("ducklake:postgres:"):
        names.append("postgres_scanner")
    if cfg.attach:  # a data path elsewhere than this disk (s3://, http...): httpfs
        names.append("httpfs")
    return names


def new_connection(names: list[str]) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the extensions `names` loaded.

    The first connection of a process has DuckDB check each wheel extension's signature; later
    ones load the same unchanged files without checking again (allow_unsigned_extensions only
    when every file to load was checked in this process and has not changed since)."""
    wheels = [_wheel_extension(f"duckdb_extension_{n}") for n in names]
    checked = all(w is not None and _VERIFIED.get(w) == _stamp(w) for w in wheels)
    con = duckdb.connect(config={"allow_unsigned_extensions": "true"} if checked else {})
    try:
        for name, wheel in zip(names, wheels, strict=True):
            load_extension(con, name, wheel)
            if wheel is not None and not checked:
                _VERIFIED[wheel] = _stamp(wheel)
    except BaseException:
        con.close()
        raise
    return con


def load_extension(con: duckdb.DuckDBPyConnection, name: str, wheel: Path | None = None) -> None:
    """LOAD an extension from its PyPI wheel; fall back to DuckDB's INSTALL (needs a network)."""
    wheel = wheel or _wheel_extension(f"duckdb_extension_{name}")
    if wheel is not None:
        con.execute(f"LOAD '{wheel}'")
        return
    try:
        con.execute(f"INSTALL {name}")
        con.execute(f"LOAD {name}")
    except duckdb.Error as e:
        raise WarehouseError(
            f"DuckDB extension {name!r} is not available: install the wheel "
            f"duckdb-extension-{name.replace('_', '-')}=={duckdb.__version__} or allow INSTALL "
            f"over a network ({e})"
        ) from e


def s3_secret_from_env(
    con: duckdb.DuckDBPyConnection, env: Mapping[str, str] | None = None
) -> bool:
    """CREATE a temporary S3 secret from the standard AWS variables; False when none are set.

    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (e.g. http://127.0.0.1:9000) points at an
    S3-compatible server: its scheme sets USE_SSL and it implies URL_STYLE 'path' unless
    MSM4SR_S3_URL_STYLE says otherwise.
    """
    env = os.environ if env is None else env
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        return False
    opts = {"KEY_ID": key, "SECRET": secret}
    if env.get("AWS_SESSION_TOKEN"):
        opts["SESSION_TOKEN"] = env["AWS_SESSION_TOKEN"]
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        opts["REGION"] = region
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    style = env.get("MSM4SR_S3_URL_STYLE")
    if endpoint:
        url = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        if url.scheme not in ("http", "https") or not url.netloc:
            raise WarehouseError(
                f"AWS_ENDPOINT_URL {endpoint!r} is not an http(s)://host[:port] URL"
            )
        opts["ENDPOINT"] = url.netloc
        opts["USE_SSL"] = "true" if url.scheme == "https" else "false"
        style = style or "path"
    if style:
        if style not in ("path", "vhost"):
            raise WarehouseError(f"MSM4SR_S3_URL_STYLE {style!r} is neither 'path' nor 'vhost'")
        opts["URL_STYLE"] = style
    body = ", ".join(
        f"{k} {v}" if k == "USE_SSL" else f"{k} {_sql_literal(v)}" for k, v in opts.items()
    )
    con.execute(f"CREATE OR REPLACE TEMPORARY SECRET msm4sr_s3_env (TYPE s3, {body})")
    return True


# --------------------------------------------------------------------------- connect


def _is_transient(e: Exception) -> bool:
    msg = str(e).lower()
    return any(
        s in msg
        for s in ("database is locked", "conflict", "could not commit", "busy", "lock on file")
    )


@contextlib.contextmanager
def connect(
    cfg: WarehouseConfig | None = None, *, create: bool = True, read_only: bool = False
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open DuckDB, ATTACH the DuckLake catalog as `lake`, `USE lake`; DETACH in `finally`.

    Args:
        create: create the catalog when missing. With create=False a missing catalog raises
            WarehouseError naming the path (e.g. `msm4sr sql` before any ingest). Every writable
            connection creates the contract tables (and write guards) it lacks, so an older
            warehouse opened by newer code gains them before its first write.
        read_only: attach READ_ONLY (queries only).
    """
    cfg = cfg or WarehouseConfig()
    if not cfg.exists():
        if not create:
            raise WarehouseError(
                f"no warehouse catalog at {cfg.catalog_path}: run `msm4sr ingest ...` first, or "
                f"point MSM4SR_WAREHOUSE / --warehouse at an existing warehouse folder"
            )
        (Path(cfg.root) / "data").mkdir(parents=True, exist_ok=True)
    con = new_connection(extensions_for(cfg))
    attached = False
    try:
        if cfg.attach:
            s3_secret_from_env(con)
        sql = cfg.attach_sql(read_only)
        _retry(lambda: con.execute(sql), cfg.max_retries, what=f"attaching {cfg.location}")
        attached = True
        con.execute(f"USE {ALIAS}")
        if not read_only:
            ensure_schema(con, cfg)
        yield con
    finally:
        if attached:
            with contextlib.suppress(duckdb.Error):
                con.execute("USE memory")
                con.execute(f"DETACH {ALIAS}")
        con.close()


def _retry(fn: Callable[[], T], max_retries: int, *, what: str) -> T:
    """Run fn, retrying transient (lock/conflict) errors with jittered exponential backoff."""
    for attempt in range(max_retries + 1):
        try:
            return fn()
        except duckdb.Error as e:
            if not _is_transient(e):
                raise
            if attempt == max_retries:
                raise WarehouseError(
                    f"warehouse still locked after {max_retries} retries while {what}: another "
                    f"process is writing (a running flow?). Wait for it and run again. ({e})"
                ) from e
            time.sleep(min(10.0, 0.1 * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "VARCHAR"
    if pa.types.is_int32(t):
        return "INTEGER"
    if pa.types.is_int64(t):
        return "BIGINT"
    if pa.types.is_float32(t):
        return "FLOAT"
    if pa.types.is_float64(t):
        return "DOUBLE"
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    if pa.types.is_list(t):
        return f"{_duck_type(t.value_type)}[]"
    if pa.types.is_struct(t):
        inner = ", ".join(f"{f.name} {_duck_type(f.type)}" for f in t)
        return f"STRUCT({inner})"
    raise TypeError(f"no DuckLake type for Arrow type {t}")


def create_table_sql(spec: TableSpec) -> str:
    cols = ", ".join(f"{f.name} {_duck_type(f.type)}" for f in spec.schema)
    return f"CREATE TABLE IF NOT EXISTS {spec.name} ({cols})"


def ensure_schema(con: duckdb.DuckDBPyConnection, cfg: WarehouseConfig | None = None) -> None:
    """Create missing contract tables and (re)create committed SQL views whose text changed.

    Nothing is committed when everything is already in place (no empty snapshot per open).
    """
    cfg = cfg or WarehouseConfig()
    have = {
        r[0]
        for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = ?", [ALIAS]
        ).fetchall()
    }
    specs = [*contract.TABLES.values(), contract.WRITE_GUARDS]
    tables = [create_table_sql(s) for s in specs if s.name not in have]
    # A guard row deleted by hand would leave its table's commits silently unguarded: re-seed.
    seed = bool(tables) or _guard_rows(con) < len(contract.TABLES)
    if seed:
        _retry(
            lambda: _transaction(con, [*tables, _seed_guards_sql()]),
            cfg.max_retries,
            what="creating tables",
        )
    stored = {
        r[0]: _view_body(r[1])
        for r in con.execute(
            "SELECT view_name, sql FROM duckdb_views() WHERE database_name = ?", [ALIAS]
        ).fetchall()
    }
    views = [
        f"CREATE OR REPLACE VIEW {name} AS {sql}"
        for name, sql in view_definitions().items()
        if stored.get(name) != _canonical_view(con, sql)
    ]
    if views:
        _retry(lambda: _transaction(con, views), cfg.max_retries, what="creating views")


def _guard_rows(con: duckdb.DuckDBPyConnection) -> int:
    """How many contract tables have a write_guards row (a read; nothing is committed)."""
    g = contract.WRITE_GUARDS.name
    names = ", ".join(_sql_literal(n) for n in contract.TABLES)
    return con.execute(
        f"SELECT count(DISTINCT table_name) FROM {g} WHERE table_name IN ({names})"
    ).fetchone()[0]


def _seed_guards_sql() -> str:
    """Insert the write_guards rows of the contract tables that have none (idempotent)."""
    g = contract.WRITE_GUARDS.name
    names = ", ".join(f"({_sql_literal(n)})" for n in contract.TABLES)
    return (
        f"INSERT INTO {g} SELECT v.name, 0 FROM (VALUES {names}) v(name) "
        f"WHERE v.name NOT IN (SELECT table_name FROM {g})"
    )


def _transaction(con: duckdb.DuckDBPyConnection, statements: list[str]) -> None:
    con.execute("BEGIN")
    try:
        for stmt in statements:
            con.execute(stmt)
        con.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")
        raise


def _view_body(create_sql: str) -> str:
    return create_sql.split(" AS ", 1)[1].strip().rstrip(";")


# view SELECT -> its canonical text: a function of the text (and DuckDB's version) only, so
# each view is probed once per process, not on every connection.
_CANONICAL: dict[str, str] = {}


def _canonical_view(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    """The SELECT as DuckDB stores it (normalised), found through a temporary probe view."""
    if sql not in _CANONICAL:
        _CANONICAL[sql] = _probe_view(con, sql)
    return _CANONICAL[sql]


def _probe_view(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    con.execute(f"CREATE OR REPLACE TEMP VIEW _msm4sr_probe AS {sql}")
    stored = con.execute(
        "SELECT sql FROM duckdb_views() WHERE view_name = '_msm4sr_probe' AND temporary"
    ).fetchone()[0]
    con.execute("DROP VIEW temp.main._msm4sr_probe")
    return _view_body(stored)


def view_definitions() -> dict[str, str]:
    """name -> SELECT of every committed view in warehouse/views/*.sql (file name = view name)."""
    out: dict[str, str] = {}
    for path in sorted(VIEWS_DIR.glob("*.sql")):
        lines = [ln for ln in path.read_text().splitlines() if not ln.strip().startswith("--")]
        out[path.stem] = "\n".join(lines).strip().rstrip(";")
    return out


# --------------------------------------------------------------------------- reads


def snapshot_id(con: duckdb.DuckDBPyConnection) -> int:
    """The current (latest) snapshot id of the warehouse."""
    row = con.execute(f"SELECT max(snapshot_id) FROM {ALIAS}.snapshots()").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def query(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> pa.Table:
    """Run a SELECT and return Arrow."""
    return con.execute(sql, params or []).fetch_arrow_table()


def read_table(
    con: duckdb.DuckDBPyConnection,
    name: str,
    *,
    where: str | None = None,
    params: list | None = None,
    snapshot: int | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """Read a contract table (optionally at a snapshot, with a parameterised filter) as Arrow."""
    spec = contract.spec(name)
    cols = ", ".join(columns or spec.columns)
    at = f" AT (VERSION => {int(snapshot)})" if snapshot is not None else ""
    sql = f"SELECT {cols} FROM {spec.name}{at}" + (f" WHERE {where}" if where else "")
    return query(con, sql, params)


def read_polars(con: duckdb.DuckDBPyConnection, name: str, **kw) -> pl.DataFrame:
    """`read_table` as a polars DataFrame."""
    return pl.from_arrow(read_table(con, name, **kw))  # type: ignore[return-value]


def table_counts(con: duckdb.DuckDBPyConnection) -> list[tuple[str, int]]:
    """(table, row count) of every table in the warehouse."""
    names = [
        r[0]
        for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = ? ORDER BY 1", [ALIAS]
        ).fetchall()
    ]
    return [(n, int(con.execute(f"SELECT count(*) FROM {n}").fetchone()[0])) for n in names]


# --------------------------------------------------------------------------- writes


@dataclass
class WriteResult:
    table: str
    inserted: int = 0
    updated: int = 0
    deleted: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.inserted or self.updated or self.deleted)


def conform(spec: TableSpec, data: pa.Table | pl.DataFrame) -> pa.Table:
    """Cast `data` to the contract schema: same columns, order and types; errors name the column."""
    tbl = data.to_arrow() if isinstance(data, pl.DataFrame) else data
    missing = [c for c in spec.columns if c not in tbl.column_names]
    if missing:
        raise ValueError(f"rows for {spec.name!r} lack columns {missing}; have {tbl.column_names}")
    tbl = tbl.select(spec.columns)
    try:
        return tbl.cast(spec.schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ValueError(f"rows for {spec.name!r} do not fit the contract schema: {e}") from e


def _count_deletes(
    con: duckdb.DuckDBPyConnection, spec: TableSpec, src: str, where: str, n_examples: int = 0
) -> tuple[int, int, list[tuple]]:
    """(stored rows matching `where`, of those the keys absent from `src`, a few such keys)."""
    keys = ", ".join(spec.key)
    gone = f"SELECT {keys} FROM {spec.name} WHERE {where} EXCEPT SELECT {keys} FROM {src}"
    n_stored = con.execute(f"SELECT count(*) FROM {spec.name} WHERE {where}").fetchone()[0]
    n_del = con.execute(f"SELECT count(*) FROM ({gone})").fetchone()[0] if n_stored else 0
    examples: list[tuple] = []
    if n_del and n_examples:
        shown = [k for k in spec.key if k != "dataset"] or list(spec.key)
        examples = con.execute(
            f"SELECT {', '.join(shown)} FROM ({gone}) ORDER BY ALL LIMIT {int(n_examples)}"
        ).fetchall()
        examples = [e[0] if len(e) == 1 else e for e in examples]
    return int(n_stored), int(n_del), examples


def plan_replace(
    con: duckdb.DuckDBPyConnection, table: str, dataset: str, rows: pa.Table | pl.DataFrame
) -> DeletePlan:
    """What `replace_dataset(table, dataset, rows)` would delete; `rows` need the key columns."""
    spec = contract.spec(table)
    tbl = rows.to_arrow() if isinstance(rows, pl.DataFrame) else rows
    keys = [k for k in spec.key if k != "dataset"]
    src = f"_plan_{spec.name}"
    con.register(src, tbl.select(keys))
    try:
        con.execute(
            f"CREATE OR REPLACE TEMP VIEW _plan_keys AS SELECT {_sql_literal(dataset)} AS dataset, "
            f"{', '.join(keys)} FROM {src}"
        )
        where = "dataset = " + _sql_literal(dataset)
        n_stored, n_del, ex = _count_deletes(con, spec, "_plan_keys", where, n_examples=3)
        con.execute("DROP VIEW _plan_keys")
    finally:
        con.unregister(src)
    return DeletePlan(spec.name, dataset, n_stored, n_del, ex)


def _merge(
    con: duckdb.DuckDBPyConnection,
    spec: TableSpec,
    rows: pa.Table,
    delete_where: str | None,
    max_delete_share: float | None = None,
    dataset: str = "",
) -> WriteResult:
    """Apply rows to spec's table inside the caller's transaction; return what changed.

    Only rows that are new or differ from what is stored are merged, so an unchanged input
    writes nothing. With `delete_where`, stored keys matching it but absent from rows go;
    more than `max_delete_share` of the stored rows going raises DeleteRefused.
    """
    key = spec.key
    on = " AND ".join(f"t.{k} IS NOT DISTINCT FROM s.{k}" for k in key)
    cols = ", ".join(spec.columns)
    src = f"_src_{spec.name}"
    con.register(src, rows)
    try:
        n_del = 0
        if delete_where is not None:
            n_stored, n_del, ex = _count_deletes(con, spec, src, delete_where, n_examples=3)
            plan = DeletePlan(spec.name, dataset, n_stored, n_del, ex)
            if max_delete_share is not None and plan.share > max_delete_share:
                raise DeleteRefused([plan], max_delete_share)
        # New keys, or stored keys whose other columns differ: a hash join on the key, so the
        # cost does not grow with the width of the rows (vectors) already stored.
        nonkey = [c for c in spec.columns if c not in key]
        differs = " OR ".join(f"s.{c} IS DISTINCT FROM t.{c}" for c in nonkey) or "FALSE"
        stored = f"(SELECT *, TRUE AS _hit FROM {spec.name}" + (
            f" WHERE {delete_where})" if delete_where else ")"
        )
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE _chg AS SELECT s.*, t._hit IS NOT NULL AS _matched "
            f"FROM {src} s LEFT JOIN {stored} t ON {on} "
            f"WHERE t._hit IS NULL OR {differs}"
        )
        n_chg, n_upd = con.execute(
            "SELECT count(*), count(*) FILTER (_matched) FROM _chg"
        ).fetchone()
        if n_del:
            con.execute(
                f"DELETE FROM {spec.name} t WHERE ({delete_where}) AND NOT EXISTS "
                f"(SELECT 1 FROM {src} s WHERE {on})"
            )
        if n_chg:
            sets = ", ".join(f"{c} = s.{c}" for c in nonkey) or f"{key[0]} = s.{key[0]}"
            con.execute(
                f"MERGE INTO {spec.name} t USING (SELECT {cols} FROM _chg) s ON ({on}) "
                f"WHEN MATCHED THEN UPDATE SET {sets} "
                f"WHEN NOT MATCHED THEN INSERT BY NAME"
            )
        con.execute("DROP TABLE _chg")
        return WriteResult(spec.name, n_chg - n_upd, n_upd, n_del)
    finally:
        con.unregister(src)


@dataclass
class Write:
    """One table's part of a multi-table commit (see `write`)."""

    table: str
    rows: pa.Table | pl.DataFrame
    # Set: make the table's rows of this dataset equal `rows` (stale keys deleted).
    replace_dataset: str | None = None
    # With replace_dataset: refuse (DeleteRefused, nothing committed) when more than this share
    # of the dataset's stored rows would be deleted. None: no limit.
    max_delete_share: float | None = None
    # Set {column: value or [values]}: make the table's rows matching it equal `rows` (stale
    # keys deleted), e.g. {"run_id": R} for one run's recommendations.
    replace_where: dict[str, str | list[str]] | None = None


def write(
    con: duckdb.DuckDBPyConnection, parts: list[Write], *, max_retries: int = 8
) -> list[WriteResult]:
    """Apply several table writes in ONE transaction: all land or none (a killed run leaves the
    warehouse as it was). Commits nothing when nothing changed. Lock conflicts are retried."""
    prepared: list[tuple[TableSpec, pa.Table, str | None, Write]] = []
    for part in parts:
        spec = contract.spec(part.table)
        data = conform(spec, part.rows)
        _check_unique_keys(spec, data)
        where = None
        if part.replace_dataset is not None:
            if not spec.per_dataset:
                raise ValueError(f"table {spec.name!r} is not partitioned by dataset")
            names = set(data["dataset"].to_pylist()) if data.num_rows else set()
            if names - {part.replace_dataset}:
                raise ValueError(
                    f"rows for dataset {part.replace_dataset!r} carry other dataset names: {names}"
                )
            where = "dataset = " + _sql_literal(part.replace_dataset)
        elif part.replace_where:
            where = _match_sql(spec, data, part.replace_where)
        elif data.num_rows == 0:
            continue
        prepared.append((spec, data, where, part))

    def run() -> list[WriteResult]:
        con.execute("BEGIN")
        try:
            results = [
                _merge(con, spec, data, where, part.max_delete_share, part.replace_dataset or "")
                for spec, data, where, part in prepared
            ]
            # Two commits adding the same new key would both land (DuckLake checks no keys):
            # bumping the table's guard row makes the later one conflict, and be retried.
            added = sorted({r.table for r in results if r.inserted})
            if added:
                con.execute(
                    f"UPDATE {contract.WRITE_GUARDS.name} SET n_commits = n_commits + 1 "
                    f"WHERE table_name IN ({', '.join(_sql_literal(t) for t in added)})"
                )
            con.execute("COMMIT" if any(r.changed for r in results) else "ROLLBACK")
            return results
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            raise

    if not prepared:
        return []
    return _retry(run, max_retries, what="writing " + ", ".join(p.table for p in parts))


def upsert(
    con: duckdb.DuckDBPyConnection,
    table: str,
    rows: pa.Table | pl.DataFrame,
    *,
    max_retries: int = 8,
) -> WriteResult:
    """Insert new keys and update changed rows of `table` in one transaction (see `write`)."""
    res = write(con, [Write(table, rows)], max_retries=max_retries)
    return res[0] if res else WriteResult(table)


def replace_dataset(
    con: duckdb.DuckDBPyConnection,
    table: str,
    dataset: str,
    rows: pa.Table | pl.DataFrame,
    *,
    max_retries: int = 8,
) -> WriteResult:
    """Make `table`'s rows of `dataset` equal `rows` in one transaction (see `write`)."""
    res = write(con, [Write(table, rows, replace_dataset=dataset)], max_retries=max_retries)
    return res[0] if res else WriteResult(table)


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _match_sql(spec: TableSpec, data: pa.Table, match: dict[str, str | list[str]]) -> str:
    """The WHERE of a `replace_where`; every row must match it (else ValueError)."""
    conds = []
    for col, want in match.items():
        if col not in spec.columns:
            raise ValueError(f"table {spec.name!r} has no column {col!r} to replace by")
        values = [want] if isinstance(want, str) else list(want)
        if not values:
            raise ValueError(f"replace_where {col!r}: no values")
        outside = set(data[col].to_pylist()) - set(values) if data.num_rows else set()
        if outside:
            raise ValueError(
                f"rows for {spec.name!r} carry {col} values outside the replaced ones: {sorted(outside)[:3]}"
            )
        conds.append(f"{col} IN ({', '.join(_sql_literal(str(v)) for v in values)})")
    return " AND ".join(conds)


def _check_unique_keys(spec: TableSpec, data: pa.Table) -> None:
    if data.num_rows == 0:
        return
    n_keys = pl.from_arrow(data.select(list(spec.key))).n_unique()
    if n_keys != data.num_rows:
        raise ValueError(
            f"rows for {spec.name!r} repeat a key {spec.key}: {data.num_rows - n_keys} duplicates"
        )
