"""Tagging and embedding on a Dask task runner: a real 2-worker local cluster on 127.0.0.1 runs
the shards of the features flow, and the rows equal the single-process run's row for row."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import duckdb
import numpy as np
import pytest

from features import store
from features.store import WarehouseConfig
from pipeline.shards import Shard, shard_of, split
from tests.ml_cut import write_ml_cut


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_shards_partition_keys_alike_in_sql_and_python() -> None:
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(998)] + [
        "ff" * 32,
        "00" * 32,
    ]
    con = duckdb.connect()
    con.execute("CREATE TABLE k AS SELECT unnest(?::VARCHAR[]) AS sha", [keys])
    seen: list[str] = []
    for shard in split(3):
        in_sql = {
            r[0] for r in con.execute(f"SELECT sha FROM k WHERE {shard.sql('sha')}").fetchall()
        }
        assert in_sql == {k for k in keys if shard.owns(k)}
        assert len(in_sql) > len(keys) // 4  # even-ish: each of 3 shards holds about a third
        seen += in_sql
    assert sorted(seen) == sorted(keys)  # every key in exactly one shard
    assert Shard(0, 1).sql("sha") == "TRUE"
    with pytest.raises(ValueError, match="not a hex digest"):
        shard_of("not-hex", 2)
    with pytest.raises(ValueError, match="shards=0"):
        split(0)


def _rows(wh: WarehouseConfig) -> tuple[list, list, dict[str, int], list[str]]:
    with store.connect(wh, create=False, read_only=True) as con:
        kw = con.execute(
            "SELECT sha256, tagger_version, status, keywords, text FROM image_keywords ORDER BY ALL"
        ).fetchall()
        emb = con.execute(
            "SELECT text_sha256, encoder_version, text, vector, n_tokens, truncated "
            "FROM text_embeddings ORDER BY text_sha256"
        ).fetchall()
        runs = dict(
            con.execute("SELECT stage, count(*) FROM pipeline_runs GROUP BY stage").fetchall()
        )
        summaries = [
            r[0]
            for r in con.execute(
                "SELECT summary FROM pipeline_runs WHERE stage IN ('tag', 'embed') ORDER BY stage"
            ).fetchall()
        ]
    return kw, emb, runs, summaries


def test_dask_two_workers_equal_single_process_row_for_row(
    harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.features import features_flow

    src = write_ml_cut(tmp_path / "ml", range(1, 41), max_ratings=1000)
    whs = {}
    for name in ("one", "dask"):
        monkeypatch.setenv("MSM4SR_WAREHOUSE", str(tmp_path / name))
        whs[name] = WarehouseConfig(root=tmp_path / name, attach=None, data_path=None)
    monkeypatch.setenv("MSM4SR_WAREHOUSE", str(tmp_path / "one"))
    one = features_flow(path=str(src), dataset="cut")
    monkeypatch.setenv("MSM4SR_WAREHOUSE", str(tmp_path / "dask"))
    two = features_flow(path=str(src), dataset="cut", task_runner="dask", workers=2, threads=1)

    assert one["task_runner"] == "local" and two["task_runner"].startswith("dask")
    n_posters = len(list((src / "posters").iterdir()))
    assert two["tag"]["n_new"] == one["tag"]["n_new"] == n_posters
    assert two["tag"]["n_tagged"] == one["tag"]["n_tagged"] == n_posters
    assert two["embed"]["n_encoded"] == one["embed"]["n_encoded"] > 40
    assert two["embed"]["n_strings"] == one["embed"]["n_strings"]

    kw1, emb1, runs1, _ = _rows(whs["one"])
    kw2, emb2, runs2, sums = _rows(whs["dask"])
    # the same keys, statuses, keyword lists (words, sources, scores) and texts
    assert len(kw2) == len(kw1) == n_posters
    for a, b in zip(kw1, kw2, strict=True):
        assert a[:3] == b[:3] and a[4] == b[4]
        assert [(k["word"], k["source"]) for k in a[3]] == [(k["word"], k["source"]) for k in b[3]]
        np.testing.assert_allclose(
            [k["score"] for k in a[3]], [k["score"] for k in b[3]], atol=1e-5
        )
    # the same strings under the same keys; vectors equal up to batch padding (float32 noise)
    assert [r[:3] + r[4:] for r in emb1] == [r[:3] + r[4:] for r in emb2]
    v1 = np.array([r[3] for r in emb1], np.float32)  # (N, 384)
    v2 = np.array([r[3] for r in emb2], np.float32)
    np.testing.assert_allclose(v1, v2, atol=2e-5)
    # one pipeline_runs row per stage, like the single-process run; both workers took a shard
    assert runs2 == runs1 == {"ingest": 1, "tag": 1, "embed": 1}
    for text in sums:
        info = json.loads(text)
        assert info["n_shards"] == 2 and info["n_workers"] == 2, info["shards"]
        assert all(s["n_done"] > 0 for s in info["shards"])


def test_cluster_config_selects_runner_and_names_bad_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flows.features import ClusterConfig

    for var in (
        "MSM4SR_TASK_RUNNER",
        "MSM4SR_WORKERS",
        "MSM4SR_DASK_ADDRESS",
        "MSM4SR_SHARDS",
        "MSM4SR_THREADS",
    ):
        monkeypatch.delenv(var, raising=False)
    assert ClusterConfig().task_runner == "local"  # the default: one process, no Dask
    assert ClusterConfig(address="tcp://127.0.0.1:8786").task_runner == "dask"
    assert ClusterConfig(address="tcp://127.0.0.1:8786").worker_threads() is None
    monkeypatch.setenv("MSM4SR_TASK_RUNNER", "dask")
    monkeypatch.setenv("MSM4SR_WORKERS", "3")
    c = ClusterConfig()
    assert (c.task_runner, c.workers) == ("dask", 3)
    with pytest.raises(ValueError, match="task_runner='ray'"):
        ClusterConfig(task_runner="ray")
    with pytest.raises(ValueError, match="workers=0"):
        ClusterConfig(workers=0)


def test_failed_shard_logs_a_failed_run_and_the_rerun_fills_only_its_keys(
    harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shards commit their own rows: one shard failing leaves the other's rows, one failed run
    row, and a rerun encodes exactly the failed shard's keys (any Prefect task runner)."""
    from flows import features as ff
    from pipeline import embedding
    from pipeline.ingest import ingest
    from pipeline.sources import read_source

    src = write_ml_cut(tmp_path / "ml", range(1, 21), max_ratings=500)
    monkeypatch.setenv("MSM4SR_WAREHOUSE", str(tmp_path / "wh"))
    wh = WarehouseConfig(root=tmp_path / "wh", attach=None, data_path=None)
    ingest(read_source("movielens", src, "cut"), wh, progress=False)
    monkeypatch.setattr(ff, "embed_shard_task", ff.embed_shard_task.with_options(retries=0))
    real = embedding.embed_shard

    def lose_shard_1(plan, shard):
        if shard.index == 1:
            raise RuntimeError("worker lost")
        return real(plan, shard)

    monkeypatch.setattr(embedding, "embed_shard", lose_shard_1)
    with pytest.raises(RuntimeError, match="1 of 2 shards failed"):
        ff.cluster_stages_flow("cut", tag=False, embed=True, shards=2)
    with store.connect(wh, create=False) as con:
        keys = [r[0] for r in con.execute("SELECT text_sha256 FROM text_embeddings").fetchall()]
        runs = con.execute(
            "SELECT stage, status, summary FROM pipeline_runs WHERE stage = 'embed'"
        ).fetchall()
    assert keys and all(Shard(0, 2).owns(k) for k in keys)
    assert len(runs) == 1 and runs[0][1] == "failed"
    assert "worker lost" in json.loads(runs[0][2])["error"]

    monkeypatch.setattr(embedding, "embed_shard", real)
    again = ff.cluster_stages_flow("cut", tag=False, embed=True, shards=2)["embed"]
    assert again["n_encoded"] == again["n_strings"] - len(keys) > 0
    with store.connect(wh, create=False) as con:
        rows, distinct = con.execute(
            "SELECT count(*), count(DISTINCT text_sha256) FROM text_embeddings"
        ).fetchone()
        statuses = [
            r[0]
            for r in con.execute(
                "SELECT status FROM pipeline_runs WHERE stage = 'embed' ORDER BY started_at"
            ).fetchall()
        ]
    assert rows == distinct == again["n_strings"]
    assert statuses == ["failed", "finished"]
