"""The warehouse at scale: DuckLake with its catalog in a real PostgreSQL and its data in an
S3-compatible server (moto), both on 127.0.0.1, selected by environment variables only.

Reads equal the single-machine (sqlite) warehouse's row for row; snapshots, time travel and the
committed views work; two features flows in two processes (two machines: own local folders, one
lake) both commit and lose nothing.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from features import store
from features.store import WarehouseConfig
from pipeline.ingest import ingest
from pipeline.sources import read_source
from tests.ml_cut import write_ml_cut
from tests.servers import S3, Postgres, pg, s3  # noqa: F401  (session fixtures)

REPO = Path(__file__).resolve().parents[1]
BUCKET = "lake"
_ids = itertools.count()


@pytest.fixture
def lake_env(
    pg: Postgres,
    s3: S3,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, str]:
    """A new database and bucket prefix; the env that selects them (as a user would set it)."""
    n = next(_ids)
    dsn = pg.createdb(f"lake{n}_{os.getpid()}")
    client = s3.client()
    if BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=BUCKET)
    env = {
        "MSM4SR_WAREHOUSE": str(tmp_path / "local"),  # Prefect's state only: no catalog there
        "MSM4SR_LAKE_ATTACH": f"ducklake:postgres:{dsn}",
        "MSM4SR_LAKE_DATA": f"s3://{BUCKET}/t{n}/",
        **pg.env(),
        **s3.env(),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def _sorted(tbl: pa.Table, keys: list[str]) -> pa.Table:
    return tbl.sort_by([(k, "ascending") for k in keys])


def test_lake_on_postgres_and_s3_matches_sqlite_with_snapshots_and_views(
    lake_env: dict[str, str],
    wh: WarehouseConfig,
    s3: S3,
    tmp_path: Path,
) -> None:
    cfg = WarehouseConfig()  # from the environment only
    assert (
        cfg.attach and cfg.attach.startswith("ducklake:postgres:") and "password" not in cfg.attach
    )
    src = write_ml_cut(tmp_path / "ml", range(1, 31), max_ratings=1500)
    local = ingest(read_source("movielens", src, "cut"), wh, progress=False)
    lake = ingest(read_source("movielens", src, "cut"), cfg, progress=False)
    assert lake.n_interactions == local.n_interactions > 500 and lake.n_items == 30

    with (
        store.connect(wh, read_only=True) as a,
        store.connect(cfg, read_only=True, create=False) as b,
    ):
        for name in ("items", "interactions", "item_images"):
            key = list(store.contract.spec(name).key)
            assert _sorted(store.read_table(b, name), key).equals(
                _sorted(store.read_table(a, name), key)
            ), name
        # the committed views exist in the lake and answer like the local ones
        for view in store.view_definitions():
            assert (
                b.execute(f"SELECT count(*) FROM {view}").fetchone()
                == a.execute(f"SELECT count(*) FROM {view}").fetchone()
            )
        files = [
            r[0]
            for r in b.execute(
                "SELECT data_file FROM ducklake_list_files('lake', 'interactions')"
            ).fetchall()
        ]
    # Parquet lives in the bucket under MSM4SR_LAKE_DATA; nothing of the catalog on local disk.
    keys = s3.keys(BUCKET, lake_env["MSM4SR_LAKE_DATA"].split(f"{BUCKET}/", 1)[1])
    assert files and all(f.startswith(lake_env["MSM4SR_LAKE_DATA"]) for f in files)
    assert {f.split(f"s3://{BUCKET}/", 1)[1] for f in files} <= set(keys)
    assert not list(Path(lake_env["MSM4SR_WAREHOUSE"]).glob("**/catalog.sqlite"))

    with store.connect(cfg) as con:
        before = store.snapshot_id(con)
    with store.connect(cfg) as con:  # re-opening (tables, views in place) commits nothing
        assert store.snapshot_id(con) == before
        old = store.read_table(con, "items", where="item_id = '1'")
        res = store.upsert(con, "items", old.set_column(2, "title", pa.array(["Renamed (1995)"])))
        assert (res.inserted, res.updated) == (0, 1)
        assert store.snapshot_id(con) == before + 1
        assert (
            store.upsert(
                con, "items", store.read_table(con, "items", where="item_id = '1'")
            ).changed
            is False
        )
        assert store.snapshot_id(con) == before + 1
        # time travel: the old title at the old snapshot, the new one now
        assert store.read_table(con, "items", where="item_id = '1'", snapshot=before).equals(old)
        assert store.read_table(con, "items", where="item_id = '1'")["title"].to_pylist() == [
            "Renamed (1995)"
        ]
        # replace_dataset deletes stale keys, in the lake as on disk
        store.replace_dataset(
            con, "items", "cut", store.read_table(con, "items", where="item_id <> '2'")
        )
        assert con.execute("SELECT count(*) FROM items WHERE dataset = 'cut'").fetchone()[0] == 29
        assert (
            con.execute(f"SELECT count(*) FROM items AT (VERSION => {before})").fetchone()[0] == 30
        )


def test_persistent_duckdb_secret_instead_of_env(
    lake_env: dict[str, str],
    s3: S3,
    tmp_path: Path,
) -> None:
    # Another machine holds no AWS_* variables but a persistent DuckDB secret (in its HOME).
    home = tmp_path / "home"
    host, port = s3.endpoint.split("://", 1)[1].split(":")
    make_secret = (
        "import duckdb; from features.store import load_extension; c = duckdb.connect(); "
        "load_extension(c, 'httpfs'); c.execute(\"CREATE PERSISTENT SECRET lake_s3 (TYPE s3, KEY_ID 'testing', "
        f"SECRET 'testing', REGION 'us-east-1', ENDPOINT '{host}:{port}', URL_STYLE 'path', USE_SSL false, "
        f"SCOPE 's3://{BUCKET}')\")"
    )
    read = (
        "from features import store; import polars as pl\n"
        "with store.connect() as con:\n"
        "    store.upsert(con, 'items', pl.DataFrame({'dataset': ['s'], 'item_id': ['1'], 'title': ['t'], "
        "'text': ['x' * 64], 'categories': ['c'], 'n_images': [0]}).cast({'n_images': pl.Int32}))\n"
        "    con.execute(\"CALL ducklake_flush_inlined_data('lake')\")\n"
        "    print(con.execute(\"SELECT title FROM items WHERE dataset = 's'\").fetchall())\n"
    )
    no_aws = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {"HOME": str(home)}
    for code in (make_secret, read):
        r = subprocess.run(
            [sys.executable, "-c", code],
            env=no_aws,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[('t',)]"
    assert (home / ".duckdb" / "stored_secrets" / "lake_s3.duckdb_secret").exists()
    # and without any credentials the same read cannot reach the bucket: the secret was used
    r = subprocess.run(
        [sys.executable, "-c", read],
        env=no_aws | {"HOME": str(tmp_path / "empty")},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "lake.s3.amazonaws.com" in r.stderr, r.stderr[-2000:]


def test_two_features_flows_from_two_processes_both_commit(
    lake_env: dict[str, str], wh: WarehouseConfig, tmp_path: Path
) -> None:
    # Two machines: each its own local folder (Prefect's state), one lake in postgres + S3.
    cuts = {"cut_a": range(1, 19), "cut_b": range(19, 37)}
    procs = {}
    for name, ids in cuts.items():
        src = write_ml_cut(tmp_path / name, ids, max_ratings=1000)
        env = os.environ | {"MSM4SR_WAREHOUSE": str(tmp_path / f"machine_{name}")}
        procs[name] = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from flows.cli import main; main()",
                "features",
                "--path",
                str(src),
                "--dataset",
                name,
            ],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    outs = {n: p.communicate(timeout=300)[0] for n, p in procs.items()}
    assert {n: p.returncode for n, p in procs.items()} == {"cut_a": 0, "cut_b": 0}, outs

    # the same cuts ingested one after the other into a single-machine warehouse
    for name in cuts:
        ingest(read_source("movielens", tmp_path / name, name), wh, progress=False)
    with (
        store.connect(WarehouseConfig(), read_only=True, create=False) as con,
        store.connect(wh, read_only=True) as ref,
    ):
        for table in ("items", "interactions", "item_images"):
            key = list(store.contract.spec(table).key)
            assert _sorted(store.read_table(con, table), key).equals(
                _sorted(store.read_table(ref, table), key)
            ), table
        for name, ids in cuts.items():
            n_items, n_sent = con.execute(
                "SELECT (SELECT count(*) FROM items WHERE dataset = $1), "
                "(SELECT count(DISTINCT item_id) FROM item_sentences WHERE dataset = $1)",
                [name],
            ).fetchone()
            assert n_items == n_sent == len(ids), name
            stages = con.execute(
                "SELECT stage FROM pipeline_runs WHERE dataset = $1 ORDER BY stage", [name]
            ).fetchall()
            assert [s[0] for s in stages] == ["embed", "ingest", "tag"], name
            # the views see both datasets' features: every item has its text vectors
            n_feat = con.execute(
                "SELECT count(DISTINCT item_id) FROM item_text_features WHERE dataset = $1", [name]
            ).fetchone()[0]
            assert n_feat == len(ids), name
        posters = con.execute(
            "SELECT count(DISTINCT sha256) FROM item_images WHERE status = 'ok'"
        ).fetchone()[0]
        kw_rows, kw_keys = con.execute(
            "SELECT count(*), count(DISTINCT (sha256, tagger_version)) FROM image_keywords"
        ).fetchone()
        emb_rows, emb_keys = con.execute(
            "SELECT count(*), count(DISTINCT (text_sha256, encoder_version)) FROM text_embeddings"
        ).fetchone()
        n_img_feat = con.execute("SELECT count(*) FROM item_image_features").fetchone()[0]
    n_files = sum(len(list((tmp_path / n / "posters").iterdir())) for n in cuts)
    assert posters > 0.8 * n_files and kw_rows == kw_keys == posters
    assert emb_rows == emb_keys > 0
    assert n_img_feat > 0.8 * n_files


def test_s3_secret_from_env_reads_the_standard_aws_variables() -> None:
    import duckdb

    con = duckdb.connect()
    store.load_extension(con, "httpfs")
    assert store.s3_secret_from_env(con, {"AWS_REGION": "eu-west-1"}) is False  # no keys: nothing
    env = {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
    }
    assert store.s3_secret_from_env(con, env) is True
    secret = con.execute(
        "SELECT secret_string FROM duckdb_secrets() WHERE name = 'msm4sr_s3_env'"
    ).fetchone()[0]
    for part in (
        "key_id=k",
        "region=eu-west-1",
        "endpoint=127.0.0.1:9000",
        "url_style=path",
        "use_ssl=false",
    ):
        assert part in secret, secret
    store.s3_secret_from_env(
        con, env | {"AWS_ENDPOINT_URL_S3": "https://minio.internal", "MSM4SR_S3_URL_STYLE": "vhost"}
    )
    secret = con.execute(
        "SELECT secret_string FROM duckdb_secrets() WHERE name = 'msm4sr_s3_env'"
    ).fetchone()[0]
    assert (
        "endpoint=minio.internal" in secret
        and "use_ssl=true" in secret
        and "url_style=vhost" in secret
    )
    with pytest.raises(store.WarehouseError, match="MSM4SR_S3_URL_STYLE 'virtual'"):
        store.s3_secret_from_env(con, env | {"MSM4SR_S3_URL_STYLE": "virtual"})
    with pytest.raises(store.WarehouseError, match="ftp://x"):
        store.s3_secret_from_env(con, env | {"AWS_ENDPOINT_URL": "ftp://x"})
    # the catalog's password never shows in messages
    cfg = WarehouseConfig(
        attach="ducklake:postgres:dbname=lake host=db password=hunter2", data_path=None
    )
    assert "hunter2" not in cfg.location and "password=***" in cfg.location
