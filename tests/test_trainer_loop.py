"""Trainer runs on a real (small) warehouse: logging, resume, inductive scoring, CLI, learning."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from features import store
from tests.trainer_fixtures import ML_CUT, OFFICE_CUT, warehouse_copy
from trainer.config import Config, batch_lr, merge
from trainer.finished_runs import evaluate_run, load_run
from trainer.recommend import recommend
from trainer.stages import finetune, pretrain

QUICK = {"batch_size": 64, "max_epochs": 2}


def _cfg(dataset: str = ML_CUT, **sections: dict) -> Config:
    base = {
        "data": {"dataset": dataset},
        "pretrain": dict(QUICK),
        "finetune": dict(QUICK),
        "runtime": {"progress": False, "device": "cpu"},
    }
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return merge(Config(), base)


@pytest.fixture(scope="module")
def wh(tmp_path_factory):
    return warehouse_copy(tmp_path_factory.mktemp("loop") / "wh")


@pytest.fixture(scope="module")
def trained(wh):
    """One pre-training and one transductive fine-tuning run from it, 2 epochs each."""
    cfg = _cfg()
    pre = pretrain(cfg, wh)
    ft = finetune(cfg, wh, from_run=pre.run_id)
    return cfg, pre, ft


def test_runs_and_metrics_are_logged(wh, trained) -> None:
    cfg, pre, ft = trained
    with store.connect(wh, create=False, read_only=True) as con:
        runs = {r["run_id"]: r for r in store.read_table(con, "runs").to_pylist()}
        metrics = store.query(
            con, "SELECT * FROM metrics WHERE run_id = ?", [ft.run_id]
        ).to_pylist()
        pre_metrics = store.query(
            con, "SELECT metric FROM metrics WHERE run_id = ? AND split = 'train'", [pre.run_id]
        ).to_pylist()
    p, f = runs[pre.run_id], runs[ft.run_id]
    assert (p["kind"], p["status"], f["kind"], f["status"]) == (
        "pretrain",
        "finished",
        "finetune",
        "finished",
    )
    assert f["parent_run_id"] == pre.run_id and f["model"] == "M2SE (text+image), transductive"
    assert p["snapshot_id"] == f["snapshot_id"] and p["seed"] == 2020 and len(p["git_commit"]) >= 7
    conf = json.loads(f["config"])
    assert (
        conf["data"]["encoder_version"]
        and conf["data"]["tagger_version"]
        and conf["finetune"]["max_epochs"] == 2
    )
    pop = runs[f"{ft.run_id}-popularity"]
    assert pop["kind"] == "baseline" and pop["parent_run_id"] == ft.run_id
    assert {"loss", "loss_nip_text", "loss_nip_image", "loss_cmcl", "samples_per_s"} <= {
        r["metric"] for r in pre_metrics
    }
    keys = {(r["epoch"], r["split"], r["subset"], r["metric"]) for r in metrics}
    assert {
        (1, "train", "all", "loss_ce"),
        (2, "train", "all", "lr"),
        (2, "valid", "all", "Recall@20"),
        (-1, "test", "all", "NDCG@10"),
        (-1, "test", "all", "MRR@50"),
    } <= keys
    # The CSV beside the checkpoint holds the same rows.
    with open(ft.checkpoint_dir / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {(int(r["epoch"]), r["split"], r["subset"], r["metric"]) for r in rows} == keys
    assert (ft.checkpoint_dir / "last.pt").is_file() and (ft.checkpoint_dir / "best.pt").is_file()
    assert str(ft.checkpoint_dir).startswith(str(wh.root))


def test_evaluate_reproduces_the_final_metrics_and_recommend_prints_titles(wh, trained) -> None:
    _, _, ft = trained
    ev = evaluate_run(ft.run_id, wh)
    assert ev.test["all"] == pytest.approx(ft.test["all"])
    assert (ev.best_epoch, ev.best_valid) == (ft.best_epoch, pytest.approx(ft.best_valid))
    assert ev.popularity["test"]["all"]["NDCG@10"] == pytest.approx(
        ft.popularity["test"]["all"]["NDCG@10"]
    )
    with store.connect(wh, create=False, read_only=True) as con:
        user, seen = (
            "10",
            {
                r["item_id"]
                for r in store.query(
                    con,
                    "SELECT item_id FROM interactions WHERE dataset = ? AND user_id = '10'",
                    [ML_CUT],
                ).to_pylist()
            },
        )
        titles = {
            r["item_id"]: r["title"]
            for r in store.query(
                con, "SELECT item_id, title FROM items WHERE dataset = ?", [ML_CUT]
            ).to_pylist()
        }
    recs = recommend(ft.run_id, user, 5, wh)
    assert len(recs) == 5 and all(
        r.item_id not in seen and r.title == titles[r.item_id] for r in recs
    )
    assert [r.score for r in recs] == sorted((r.score for r in recs), reverse=True)


def test_per_case_ndcg_names_each_case_by_its_source_user(wh, trained) -> None:
    from trainer.paired import case_ndcg

    _, _, ft = trained
    cases = case_ndcg(ft.run_id, wh, "test")
    assert cases.ndcg.mean() == pytest.approx(ft.test["all"]["NDCG@10"], abs=1e-6)
    with store.connect(wh, create=False, read_only=True) as con:
        last = dict(
            con.execute(
                "SELECT user_id, arg_max(item_id, seq) FROM interactions WHERE dataset = ? "
                "GROUP BY user_id",
                [ML_CUT],
            ).fetchall()
        )
    assert sorted(cases.user_ids) == sorted(last)  # one test case per user, by source id
    item_ids = load_run(ft.run_id, wh).data.item_ids
    assert all(last[u] == item_ids[t] for u, t in zip(cases.user_ids, cases.targets, strict=True))


def test_resume_after_a_kill_ends_with_the_same_metrics(tmp_path: Path) -> None:
    wh = warehouse_copy(tmp_path / "wh")
    cfg = _cfg(pretrain={"max_epochs": 3})
    full = pretrain(cfg, wh)

    class Killed(Exception):
        pass

    def kill_after_2(epoch: int) -> None:
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        pretrain(cfg, wh, on_epoch_end=kill_after_2)
    with store.connect(wh, create=False, read_only=True) as con:
        failed = store.query(con, "SELECT run_id FROM runs WHERE status = 'failed'").to_pylist()
    assert len(failed) == 1
    resumed = pretrain(cfg, wh, resume=failed[0]["run_id"])
    assert resumed.run_id == failed[0]["run_id"] and resumed.epochs_run == 3
    assert resumed.best_epoch == full.best_epoch
    assert resumed.valid["all"] == full.valid["all"]  # bit-identical on CPU
    assert resumed.test["all"] == full.test["all"]
    with store.connect(wh, create=False, read_only=True) as con:

        def losses(run: str) -> list:
            return store.query(
                con,
                "SELECT epoch, value FROM metrics WHERE run_id = ? AND metric = 'loss' ORDER BY epoch",
                [run],
            ).to_pylist()

        assert losses(resumed.run_id) == losses(full.run_id)
        status = store.query(
            con, "SELECT status FROM runs WHERE run_id = ?", [resumed.run_id]
        ).to_pylist()
    assert status == [{"status": "finished"}]


def test_inductive_finetune_on_a_text_only_dataset(tmp_path: Path) -> None:
    wh = warehouse_copy(tmp_path / "wh")
    cfg = _cfg(OFFICE_CUT, finetune={"transductive": False, "max_epochs": 1})
    ft = finetune(cfg, wh)  # from scratch
    pt = torch.load(ft.checkpoint_dir / "best.pt", weights_only=False)
    assert not any(k.startswith("item_embedding") for k in pt["model"])
    assert 0.0 <= ft.test["all"]["Recall@50"] <= 1.0
    assert "cold" in ft.test and ft.test["cold"]["n_cases"] > 0


def test_cli_pretrain_finetune_recommend(tmp_path: Path) -> None:
    from flows.cli import build

    wh = warehouse_copy(tmp_path / "wh")
    app = build()
    runner = CliRunner()
    common = ["--warehouse", str(wh.root)]
    r = runner.invoke(
        app,
        [
            *common,
            "pretrain",
            "--dataset",
            ML_CUT,
            "--max-epochs",
            "1",
            "--batch-size",
            "64",
            "--no-progress",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    with store.connect(wh, create=False, read_only=True) as con:
        pre = store.query(con, "SELECT run_id FROM runs WHERE kind = 'pretrain'").to_pylist()[0][
            "run_id"
        ]
    assert pre in r.output and "popularity" in r.output
    r = runner.invoke(
        app,
        [
            *common,
            "finetune",
            "--from",
            pre,
            "--dataset",
            ML_CUT,
            "--set",
            "finetune.max_epochs=1",
            "--set",
            "finetune.batch_size=64",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    with store.connect(wh, create=False, read_only=True) as con:
        ft = store.query(con, "SELECT run_id FROM runs WHERE kind = 'finetune'").to_pylist()[0][
            "run_id"
        ]
    r = runner.invoke(app, [*common, "recommend", "--run", ft, "--user", "10", "-k", "3"])
    assert r.exit_code == 0, r.output
    assert "(19" in r.output  # MovieLens titles carry their year
    r = runner.invoke(
        app, [*common, "finetune", "--from", "no-such-run", "--dataset", ML_CUT, "--no-progress"]
    )
    assert r.exit_code == 2 and "no-such-run" in r.output


@pytest.mark.slow  # covered by bench/trainer.py (its learning check against popularity)
def test_overfits_fifty_sequences(tmp_path: Path) -> None:
    """End-to-end learning check: 50 users' sequences are memorised (train targets ranked near top)."""
    import numpy as np

    from trainer.data import load_dataset
    from trainer.trainer import Trainer

    wh = warehouse_copy(tmp_path / "wh")
    cfg = _cfg(
        finetune={
            "max_epochs": 60,
            "lr": 3e-3,
            "weight_decay": 0.0,
            "batch_size": 50,
            "patience": 1000,
        },
        model={"hidden_dropout": 0.0, "attn_dropout": 0.0, "adaptor_dropout": 0.0},
    )
    data = load_dataset(cfg.data, wh)
    keep = np.arange(50)
    seqs = [data.user_items(u) for u in keep]
    data.offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
    data.items = np.concatenate(seqs)
    data.user_ids = [data.user_ids[u] for u in keep]
    tr = Trainer(cfg, data, "finetune", wh)
    first = tr.train_epoch(1)["loss"]
    for e in range(2, 61):
        last = tr.train_epoch(e)["loss"]
    assert last < 0.2 * first


def test_a_time_budget_stops_before_the_next_epoch(wh) -> None:
    cfg = _cfg(
        model={"arch": "sasrec"}, finetune={"max_epochs": 5, "patience": 5, "max_seconds": 1e-3}
    )
    res = finetune(cfg, wh)
    assert (res.epochs_run, res.best_epoch) == (1, 1) and res.seconds > 0
    with store.connect(wh, create=False, read_only=True) as con:
        got = dict(
            con.execute(
                "SELECT metric, value FROM metrics WHERE run_id = ? AND epoch = -1 "
                "AND split = 'train'",
                [res.run_id],
            ).fetchall()
        )
    assert got["epochs"] == 1 and got["best_epoch"] == 1 and got["train_seconds"] > 0


def test_the_time_budget_starts_an_epoch_only_if_it_should_end_within_it(wh) -> None:
    from trainer.data import load_dataset
    from trainer.trainer import Trainer

    cfg = _cfg(model={"arch": "sasrec"})
    tr = Trainer(cfg, load_dataset(cfg.data, wh), "finetune", wh)
    assert tr._epoch_fits(1e-9) and tr._epoch_fits(None)  # the first epoch always runs
    tr.epoch, tr.elapsed = 2, 10.0  # 5 s an epoch so far: the third would end at 15 s
    assert tr._epoch_fits(15.0) and not tr._epoch_fits(14.9)


def test_the_lr_decays_after_each_plateau_of_decay_patience_epochs(wh) -> None:
    from trainer.data import load_dataset
    from trainer.trainer import Trainer

    cfg = _cfg(model={"arch": "sasrec"}, finetune={"lr_decay": 0.5, "decay_patience": 2})
    tr = Trainer(cfg, load_dataset(cfg.data, wh), "finetune", wh)
    lr0 = tr.opt.param_groups[0]["lr"]
    seen = []
    for epoch, score in enumerate([0.10, 0.09, 0.08, 0.12, 0.11, 0.10, 0.09, 0.08], start=1):
        seen.append((tr.record_score(score, epoch), tr.opt.param_groups[0]["lr"] / lr0))
    assert seen == [
        (True, 1.0),
        (False, 1.0),
        (False, 0.5),  # 2 epochs without a better score
        (True, 0.5),  # a new best resets the count, not the lr
        (False, 0.5),
        (False, 0.25),
        (False, 0.25),
        (False, 0.125),
    ]
    assert (tr.best, tr.best_epoch, tr.bad_epochs) == (0.12, 4, 4)
    flat = _cfg(model={"arch": "sasrec"}, finetune={"lr_decay": 1.0})  # a constant lr
    constant = Trainer(flat, load_dataset(cfg.data, wh), "finetune", wh)
    for epoch in range(1, 6):
        constant.record_score(0.0, epoch)
    assert constant.opt.param_groups[0]["lr"] == constant.tcfg.lr


def test_min_delta_stops_on_real_gains_while_the_best_epoch_and_lr_follow_every_gain(wh) -> None:
    from trainer.data import load_dataset
    from trainer.trainer import Trainer

    cfg = _cfg(
        model={"arch": "sasrec"},
        finetune={"lr_decay": 0.5, "decay_patience": 2, "min_delta": 0.1},
    )
    tr = Trainer(cfg, load_dataset(cfg.data, wh), "finetune", wh)
    lr0 = tr.opt.param_groups[0]["lr"]
    seen = []
    # 0.105 and 0.109 are better scores but within 10% of the 0.10 that last reset the count;
    # 0.12 is a real gain (> 0.11).
    for epoch, score in enumerate([0.10, 0.105, 0.109, 0.12, 0.125, 0.125, 0.13], start=1):
        best = tr.record_score(score, epoch)
        seen.append((best, tr.stale_epochs, tr.bad_epochs, tr.opt.param_groups[0]["lr"] / lr0))
    assert seen == [
        (True, 0, 0, 1.0),
        (True, 1, 0, 1.0),
        (True, 2, 0, 1.0),
        (True, 0, 0, 1.0),
        (True, 1, 0, 1.0),
        (False, 2, 1, 1.0),
        (True, 3, 0, 1.0),
    ]
    assert (tr.best, tr.best_epoch, tr.stop_ref) == (0.13, 7, 0.12)
    # Without min_delta the two counts are one.
    plain = Trainer(_cfg(model={"arch": "sasrec"}), load_dataset(cfg.data, wh), "finetune", wh)
    for epoch, score in enumerate([0.10, 0.105, 0.104, 0.2, 0.19], start=1):
        plain.record_score(score, epoch)
        assert plain.stale_epochs == plain.bad_epochs


@pytest.mark.parametrize(("patience", "min_delta"), [(2, 0.0), (2, 0.01), (3, 0.001), (4, 0.01)])
def test_the_trainers_stop_is_the_one_bench_stop_rule_reads_off_a_curve(
    wh, patience: int, min_delta: float
) -> None:
    """bench/stop_rule.py predicts shorter runs from logged curves with this rule."""
    from tests.test_stop_rule import stop_rule
    from trainer.data import load_dataset
    from trainer.trainer import Trainer

    cfg = _cfg(model={"arch": "sasrec"}, finetune={"patience": patience, "min_delta": min_delta})
    data = load_dataset(cfg.data, wh)
    jumpy = [(e, 0.1 + 0.01 * ((e * 7) % 5) + 0.002 * e) for e in range(1, 40)]
    creep = [(e, 0.1 + 0.03 * (1 - 0.8**e) + 0.001 * (e % 3 == 0)) for e in range(1, 40)]
    for curve in (jumpy, creep):
        tr = Trainer(cfg, data, "finetune", wh)
        for epoch, score in curve:
            tr.record_score(score, epoch)
            if tr.stale_epochs >= patience:  # the fit loop's condition
                break
        assert (tr.best, tr.best_epoch, epoch) == stop_rule.stop(curve, patience, min_delta)


def test_a_run_with_min_delta_stops_after_patience_epochs_without_a_real_gain(wh) -> None:
    """No later epoch beats the first by 1e6 times: the run stops after 1 + patience epochs and
    still evaluates its best epoch, whichever that was."""
    cfg = _cfg(
        model={"arch": "sasrec"},
        finetune={"max_epochs": 10, "patience": 2, "min_delta": 1e6, "lr": 2e-3},
    )
    res = finetune(cfg, wh)
    assert res.epochs_run == 3
    with store.connect(wh, create=False, read_only=True) as con:
        curve = con.execute(
            "SELECT epoch, value FROM metrics WHERE run_id = ? AND split = 'valid' "
            "AND subset = 'all' AND metric = 'NDCG@10' AND epoch > 0 ORDER BY epoch",
            [res.run_id],
        ).fetchall()
    assert [e for e, _ in curve] == [1, 2, 3]
    assert res.best_epoch == max(curve, key=lambda r: (r[1], -r[0]))[0]


def test_finetune_keeps_the_pretrained_shape_and_takes_its_own_regularisation(wh, trained) -> None:
    """Fine-tuning from a pre-training run: the network's shape comes from that run, dropouts
    and the ID embedding's init from the fine-tuning config (they change no weight's shape)."""
    cfg, pre, _ = trained
    ft_cfg = _cfg(
        model={"hidden_size": 32, "n_heads": 2, "hidden_dropout": 0.35, "id_init_std": 0.5},
        finetune={"max_epochs": 1},
    )
    ft = finetune(ft_cfg, wh, from_run=pre.run_id)
    with store.connect(wh, create=False, read_only=True) as con:
        row = store.query(con, "SELECT config FROM runs WHERE run_id = ?", [ft.run_id]).to_pylist()
    model = json.loads(row[0]["config"])["model"]
    assert model["hidden_size"] == cfg.model.hidden_size != 32
    assert (model["hidden_dropout"], model["id_init_std"]) == (0.35, 0.5)
    # lr None (M2SE's default) is resolved by the batch, and the stored config holds the value.
    assert ft_cfg.finetune.lr is None
    assert json.loads(row[0]["config"])["finetune"]["lr"] == batch_lr(ft_cfg.finetune.batch_size)
    pt = torch.load(ft.checkpoint_dir / "best.pt", weights_only=False)
    assert pt["model"]["item_embedding.weight"].shape[1] == cfg.model.hidden_size
