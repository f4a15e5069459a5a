"""Recommendations as a table: a real fine-tuned run on the small real warehouse scores every
user in batches, writes `recommendations` in one transaction, reruns replace the run's rows,
the view joins titles; the CLI, and the train flow's option through Prefect."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from features import store
from tests.test_trainer_loop import _cfg
from tests.trainer_fixtures import ML_CUT, warehouse_copy
from trainer.recommend import recommend, recommend_users
from trainer.runlog import RunError
from trainer.stages import finetune


@pytest.fixture(scope="module")
def wh(tmp_path_factory):
    return warehouse_copy(tmp_path_factory.mktemp("recs") / "wh")


@pytest.fixture(scope="module")
def run_id(wh) -> str:
    """A transductive M2SE fine-tuned from scratch for one epoch (text + image features)."""
    return finetune(_cfg(finetune={"max_epochs": 1, "batch_size": 64}), wh).run_id


def rows_of(wh, run: str) -> list[dict]:
    with store.connect(wh, create=False, read_only=True) as con:
        return store.query(
            con, "SELECT * FROM recommendations WHERE run_id = ? ORDER BY user_id, rank", [run]
        ).to_pylist()


def test_every_user_is_scored_in_batches_and_written_once(wh, run_id: str) -> None:
    with store.connect(wh, create=False, read_only=True) as con:
        n_users = con.execute(
            "SELECT count(DISTINCT user_id) FROM interactions WHERE dataset = ?", [ML_CUT]
        ).fetchone()[0]
        history = con.execute(
            "SELECT user_id, list(item_id) FROM interactions WHERE dataset = ? GROUP BY 1", [ML_CUT]
        ).fetchall()
        run_snap = con.execute(
            "SELECT snapshot_id FROM runs WHERE run_id = ?", [run_id]
        ).fetchone()[0]
    # batches of 7 users: several batches, the last one partial
    s = recommend_users(run_id, None, 5, wh, batch_size=7)
    assert (s.n_users, s.n_rows, s.dataset) == (n_users, n_users * 5, ML_CUT)
    rows = rows_of(wh, run_id)
    assert len(rows) == n_users * 5
    assert {r["snapshot_id"] for r in rows} == {run_snap}
    seen = dict(history)
    by_user: dict[str, list[dict]] = {}
    for r in rows:
        by_user.setdefault(r["user_id"], []).append(r)
    for user, recs in by_user.items():
        assert [r["rank"] for r in recs] == [1, 2, 3, 4, 5]
        scores = [r["score"] for r in recs]
        assert scores == sorted(scores, reverse=True)
        assert not {r["item_id"] for r in recs} & set(seen[user])  # nothing the user has
    # the batched scores are the single-user path's
    for user in sorted(by_user)[:3]:
        single = recommend(run_id, user, 5, wh)
        assert [r.item_id for r in single] == [r["item_id"] for r in by_user[user]]
        assert np.allclose(
            [r.score for r in single], [r["score"] for r in by_user[user]], atol=1e-5
        )


def test_rerun_replaces_the_runs_rows_and_a_list_replaces_only_its_users(wh, run_id: str) -> None:
    recommend_users(run_id, None, 5, wh)
    everyone = recommend_users(run_id, None, 3, wh)
    rows = rows_of(wh, run_id)
    assert len(rows) == everyone.n_users * 3 and max(r["rank"] for r in rows) == 3
    users = sorted({r["user_id"] for r in rows})[:2]
    few = recommend_users(run_id, users, 2, wh, include_seen=True)
    assert few.n_rows == 4
    rows = rows_of(wh, run_id)
    per_user = {u: sum(r["user_id"] == u for r in rows) for u in {r["user_id"] for r in rows}}
    assert per_user[users[0]] == per_user[users[1]] == 2
    assert all(n == 3 for u, n in per_user.items() if u not in users)
    # an unchanged rerun commits nothing new
    with store.connect(wh, create=False, read_only=True) as con:
        before = store.snapshot_id(con)
    recommend_users(run_id, users, 2, wh, include_seen=True)
    with store.connect(wh, create=False, read_only=True) as con:
        assert store.snapshot_id(con) == before


def test_view_joins_titles_and_bad_requests_are_one_line(wh, run_id: str) -> None:
    recommend_users(run_id, None, 3, wh)
    with store.connect(wh) as con:
        user = con.execute(
            "SELECT min(user_id) FROM recommendations WHERE run_id = ?", [run_id]
        ).fetchone()[0]
        got = con.execute(
            "SELECT rank, item_id, title, score FROM recommended_items "
            "WHERE run_id = ? AND user_id = ? ORDER BY rank",
            [run_id, user],
        ).fetchall()
        titles = dict(
            con.execute("SELECT item_id, title FROM items WHERE dataset = ?", [ML_CUT]).fetchall()
        )
    assert [g[0] for g in got] == [1, 2, 3]
    assert all(g[2] == titles[g[1]] and g[2] for g in got)  # e.g. "Toy Story (1995)"
    with pytest.raises(RunError, match=r"users \['nobody'\] are not in dataset 'ml-cut'"):
        recommend_users(run_id, ["nobody"], 3, wh)
    with pytest.raises(ValueError, match="k=0"):
        recommend_users(run_id, None, 0, wh)


def test_cli_recommend_all_list_and_one(wh, run_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.cli import build

    monkeypatch.setenv("MSM4SR_WAREHOUSE", str(wh.root))
    runner = CliRunner()
    app = build()

    def cli(*args: str, code: int = 0) -> str:
        res = runner.invoke(app, list(args), catch_exceptions=False)
        assert res.exit_code == code, res.output
        return " ".join(res.output.split())

    out = cli("recommend", "--run", run_id, "--all", "-k", "4", "--no-progress")
    n_users = len({r["user_id"] for r in rows_of(wh, run_id)})
    assert f"{n_users} users x top 4 = {n_users * 4} rows" in out and "recommended_items" in out
    users = sorted({r["user_id"] for r in rows_of(wh, run_id)})[:2]
    out = cli("recommend", "--run", run_id, "--user", users[0], "--user", users[1], "-k", "2")
    assert "2 users x top 2 = 4 rows" in out
    out = cli("recommend", "--run", run_id, "--user", users[0], "-k", "3")
    assert f"top 3 for user {users[0]}" in out and len(rows_of(wh, run_id)) == (n_users - 2) * 4 + 4
    assert "name the users" in cli("recommend", "--run", run_id, code=2)
    assert "not in dataset" in cli(
        "recommend", "--run", run_id, "--user", "nobody", "--write", code=2
    )


def test_train_flow_writes_recommendations_after_evaluation(
    wh, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from flows.train import train_flow

    monkeypatch.setenv("MSM4SR_WAREHOUSE", str(wh.root))
    cfg = {
        "model": {"arch": "sasrec"},
        "finetune": {"batch_size": 64},
        "runtime": {"progress": False, "device": "cpu"},
    }
    with prefect_test_harness(server_startup_timeout=120):
        res = train_flow(ML_CUT, config=cfg, finetune_epochs=1, skip_pretrain=True, recommend_k=3)
    ft = res["finetune_run"]
    rows = rows_of(wh, ft)
    assert res["recommendations"]["n_rows"] == len(rows) == res["recommendations"]["n_users"] * 3
    with store.connect(wh, create=False, read_only=True) as con:
        order = con.execute(
            "SELECT r.run_id FROM runs r WHERE r.parent_run_id = ? AND r.kind = 'evaluate'", [ft]
        ).fetchall()
    assert order  # the evaluation ran before, as a run of its own
