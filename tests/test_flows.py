"""Prefect flows on real components: the features flow with the real tagger and encoder on a
real MovieLens cut, incremental reruns, a killed stage, and two flows at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from features import store
from features.store import WarehouseConfig
from tests.ml_cut import write_ml_cut

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def env_wh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WarehouseConfig:
    monkeypatch.setenv("MSM4SR_WAREHOUSE", str(tmp_path / "wh"))
    return WarehouseConfig(root=tmp_path / "wh", attach=None, data_path=None)


def test_features_flow_then_incremental_rerun(harness, env_wh: WarehouseConfig, tmp_path: Path) -> None:
    from flows.features import features_flow

    src = write_ml_cut(tmp_path / "ml", range(1, 41))
    first = features_flow(path=str(src), dataset="cut")
    assert first["ingest"]["n_items"] == 40
    n_posters = len(list((src / "posters").iterdir()))
    assert first["tag"]["n_new"] == n_posters and first["tag"]["n_tagged"] == n_posters
    assert first["embed"]["n_encoded"] > 40
    assert set(first["seconds_per_stage"]) == {"ingest", "tag", "embed"}

    again = features_flow(path=str(src), dataset="cut")
    assert again["ingest"]["rows_changed"] == {"items": 0, "interactions": 0, "item_images": 0}
    assert again["tag"]["n_new"] == 0 and again["embed"]["n_encoded"] == 0

    # 3 new movies with posters and ratings: only their images and strings are processed.
    write_ml_cut(tmp_path / "ml", range(1, 44))
    more = features_flow(path=str(src), dataset="cut")
    new_posters = len(list((src / "posters").iterdir())) - n_posters
    assert more["ingest"]["n_items"] == 43
    assert more["tag"]["n_new"] == new_posters
    assert 0 < more["embed"]["n_encoded"] <= 3 * 3 + new_posters  # title, genres, keywords
    with store.connect(env_wh) as con:
        dup = con.execute(
            "SELECT count(*) FROM (SELECT text_sha256, encoder_version FROM text_embeddings "
            "GROUP BY ALL HAVING count(*) > 1)"
        ).fetchone()[0]
        runs = con.execute("SELECT count(*) FROM pipeline_runs WHERE dataset = 'cut'").fetchone()[0]
    assert dup == 0 and runs == 9  # 3 flows x (ingest, tag, embed)


def _cli(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "msm4sr"), *args] if (REPO / ".venv").exists() else [sys.executable, "-m", "flows.cli", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_killed_tagging_leaves_warehouse_consistent_and_rerun_completes(env_wh: WarehouseConfig, tmp_path: Path) -> None:
    from pipeline.ingest import ingest
    from pipeline.sources.movielens import read_movielens

    # ~1,200 real posters: tagging takes several seconds even on a fast machine
    src = write_ml_cut(tmp_path / "ml", range(1, 1251), max_ratings=5000)
    ingest(read_movielens(src, "cut"), env_wh, progress=False)
    env = dict(os.environ)
    # small chunks so the kill lands between commits, after some rows are in
    code = (
        "from pipeline.tagging import TaggerConfig, tag_dataset\n"
        "from features.store import WarehouseConfig\n"
        f"tag_dataset('cut', TaggerConfig(chunk_size=16, batch_size=8), WarehouseConfig(root=__import__('pathlib').Path({str(env_wh.root)!r})), progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO)
    deadline = time.monotonic() + 240
    n = 0
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        with store.connect(env_wh, read_only=True, create=False) as con:
            n = con.execute("SELECT count(*) FROM image_keywords").fetchone()[0]
        if n >= 32:
            break
    assert proc.poll() is None, "tagging finished before it could be killed: use more images"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with store.connect(env_wh) as con:  # opens, consistent
        after_kill = con.execute("SELECT count(*) FROM image_keywords").fetchone()[0]
        total = con.execute("SELECT count(DISTINCT sha256) FROM item_images WHERE status = 'ok'").fetchone()[0]
    assert 32 <= after_kill < total

    from pipeline.tagging import TaggerConfig, tag_dataset

    s = tag_dataset("cut", TaggerConfig(chunk_size=16, batch_size=8), env_wh, progress=False)
    assert s.n_new == total - after_kill
    with store.connect(env_wh) as con:
        rows, keys = con.execute("SELECT count(*), count(DISTINCT (sha256, tagger_version)) FROM image_keywords").fetchone()
    assert rows == keys == total


def test_two_features_flows_at_once_lose_and_double_nothing(env_wh: WarehouseConfig, tmp_path: Path) -> None:
    src = write_ml_cut(tmp_path / "ml", range(1, 31), max_ratings=1500)
    env = dict(os.environ)
    procs = [_cli("features", "--path", str(src), "--dataset", "cut", env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    with store.connect(env_wh) as con:
        n_items, n_inter = con.execute(
            "SELECT (SELECT count(*) FROM items WHERE dataset='cut'), (SELECT count(*) FROM interactions WHERE dataset='cut')"
        ).fetchone()
        kw_rows, kw_keys = con.execute("SELECT count(*), count(DISTINCT (sha256, tagger_version)) FROM image_keywords").fetchone()
        emb_rows, emb_keys = con.execute("SELECT count(*), count(DISTINCT (text_sha256, encoder_version)) FROM text_embeddings").fetchone()
        n_posters = con.execute("SELECT count(*) FROM item_images WHERE status='ok'").fetchone()[0]
    assert n_items == 30
    assert kw_rows == kw_keys == n_posters
    assert emb_rows == emb_keys
