"""Prefect flows on real components: the features flow with the real tagger and encoder on a
real MovieLens cut, incremental reruns, a killed stage, and two flows at once."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
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


def test_features_flow_then_incremental_rerun(
    harness, env_wh: WarehouseConfig, tmp_path: Path
) -> None:
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


def _cli(
    *args: str, env: dict[str, str], new_session: bool = False, stdout=subprocess.PIPE
) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "from flows.cli import main; main()", *args],
        env=env,
        cwd=REPO,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=new_session,
    )


def test_flow_killed_mid_tagging_leaves_warehouse_consistent_and_rerun_completes(
    env_wh: WarehouseConfig, tmp_path: Path
) -> None:
    # ~1,200 real posters: tagging takes several seconds even on a fast machine
    src = write_ml_cut(tmp_path / "ml", range(1, 1251), max_ratings=5000)
    env = dict(os.environ)
    args = ["features", "--path", str(src), "--dataset", "cut", "--no-embed"]
    # its own session: SIGKILL reaches the flow and the temporary Prefect server it started
    proc = _cli(*args, env=env, new_session=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    n = 0
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.3)
        if not env_wh.catalog_path.exists():
            continue
        try:
            with store.connect(env_wh, read_only=True, create=False) as con:
                n = con.execute("SELECT count(*) FROM image_keywords").fetchone()[0]
        except (duckdb.Error, store.WarehouseError):
            # the flow is still creating the warehouse: the catalog file exists before DuckLake's
            # metadata, and both before the first commit creates the tables
            continue
        if n >= 32:
            break
    assert proc.poll() is None, "the flow finished before it could be killed: use more images"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with store.connect(env_wh) as con:  # opens, consistent
        after_kill = con.execute("SELECT count(*) FROM image_keywords").fetchone()[0]
        total = con.execute(
            "SELECT count(DISTINCT sha256) FROM item_images WHERE status = 'ok'"
        ).fetchone()[0]
    assert 32 <= after_kill < total

    rerun = _cli(*args, env=env)
    out = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, out
    assert f'"n_new": {total - after_kill}' in out  # only what the killed run had not committed
    with store.connect(env_wh) as con:
        rows, keys = con.execute(
            "SELECT count(*), count(DISTINCT (sha256, tagger_version)) FROM image_keywords"
        ).fetchone()
        items = con.execute("SELECT count(*) FROM items WHERE dataset = 'cut'").fetchone()[0]
    assert rows == keys == total
    assert items == len((src / "movies.dat").read_bytes().splitlines())


def test_two_features_flows_at_once_lose_and_double_nothing(
    env_wh: WarehouseConfig, tmp_path: Path
) -> None:
    src = write_ml_cut(tmp_path / "ml", range(1, 31), max_ratings=1500)
    env = dict(os.environ)
    procs = [_cli("features", "--path", str(src), "--dataset", "cut", env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    with store.connect(env_wh) as con:
        n_items, n_inter = con.execute(
            "SELECT (SELECT count(*) FROM items WHERE dataset='cut'), (SELECT count(*) FROM interactions WHERE dataset='cut')"
        ).fetchone()
        kw_rows, kw_keys = con.execute(
            "SELECT count(*), count(DISTINCT (sha256, tagger_version)) FROM image_keywords"
        ).fetchone()
        emb_rows, emb_keys = con.execute(
            "SELECT count(*), count(DISTINCT (text_sha256, encoder_version)) FROM text_embeddings"
        ).fetchone()
        n_posters = con.execute("SELECT count(*) FROM item_images WHERE status='ok'").fetchone()[0]
    assert n_items == 30
    assert kw_rows == kw_keys == n_posters
    assert emb_rows == emb_keys


def test_features_flow_refuses_a_shrinking_reingest_unless_told(
    harness, env_wh: WarehouseConfig, tmp_path: Path
) -> None:
    """A scheduled re-ingest from a much smaller input is refused once (no retries of a refusal),
    through the CLI as one line; `allow_deletes` (a flow parameter, `--allow-deletes`) applies it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from features.store import DeleteRefused
    from flows.features import features_flow
    from tests.cli_run import msm4sr, one_line_error

    src = write_ml_cut(tmp_path / "ml", range(1, 41))
    assert (
        features_flow(path=str(src), dataset="cut", tag=False, embed=False)["ingest"]["n_items"]
        == 40
    )
    shutil.rmtree(src)
    write_ml_cut(src, range(1, 11))
    state = features_flow(path=str(src), dataset="cut", tag=False, embed=False, return_state=True)
    assert state.is_failed()
    with pytest.raises(DeleteRefused):
        state.result()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    assert [r.run_count for r in runs if r.name.startswith("ingest")] == [1]
    line = one_line_error(
        msm4sr(
            "features",
            "--path",
            str(src),
            "--dataset",
            "cut",
            "--no-tag",
            "--no-embed",
            "--no-progress",
        )
    )
    assert "--allow-deletes" in line or "allow" in line, line
    with store.connect(env_wh, create=False, read_only=True) as con:
        (n,) = con.execute("SELECT count(*) FROM items WHERE dataset = 'cut'").fetchone()
        (ingests,) = con.execute(
            "SELECT count(*) FROM pipeline_runs WHERE dataset = 'cut' AND stage = 'ingest'"
        ).fetchone()
    assert n == 40 and ingests == 1  # nothing written by the refused runs

    done = features_flow(path=str(src), dataset="cut", tag=False, embed=False, allow_deletes=True)
    assert done["ingest"]["n_items"] == 10
