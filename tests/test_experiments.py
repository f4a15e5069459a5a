"""Issue #6: SASRec baseline, ablation switches, the held-out-items split, and `msm4sr report`
end to end on the small real warehouse (ml-cut with posters, office-cut text only)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from features import store
from features.store import WarehouseConfig
from tests.trainer_fixtures import ML_CUT, OFFICE_CUT, built_warehouse, warehouse_copy
from trainer.config import Config, M2SEConfig
from trainer.data import DataConfig, hold_out_items, load_dataset
from trainer.experiments import BUDGETS, plan, run_key
from trainer.model import M2SE
from trainer.runlog import valid_curve, valid_curves
from trainer.sasrec import SASRec
from trainer.trainer import model_name, without_empty_modality

REPO = Path(__file__).resolve().parents[1]


def _shared() -> WarehouseConfig:
    return WarehouseConfig(root=built_warehouse(), attach=None, data_path=None)


def test_hold_out_items_removes_them_from_every_train_part_only() -> None:
    rng = np.random.default_rng(0)
    lens = rng.integers(3, 30, size=200)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    items = rng.integers(1, 51, size=int(lens.sum())).astype(np.int64)
    users = [f"u{i}" for i in range(200)]
    new_items, new_off, new_users = hold_out_items(items, offsets, users, 50, 0.2, seed=7)

    # The same draw as the function's: 10 of the 50 items.
    held = set(np.random.default_rng(7).choice(np.arange(1, 51), 10, replace=False).tolist())
    assert len(held) == 10
    kept = {u: i for i, u in enumerate(users)}
    for j, u in enumerate(new_users):
        seq = new_items[new_off[j] : new_off[j + 1]]
        old = items[offsets[kept[u]] : offsets[kept[u] + 1]]
        assert len(seq) >= 3
        assert not held & set(seq[:-2].tolist())  # never in a train part
        assert seq[-2:].tolist() == old[-2:].tolist()  # valid / test targets untouched
        assert seq[:-2].tolist() == [x for x in old[:-2].tolist() if x not in held]
    dropped = set(users) - set(new_users)
    for u in dropped:  # dropped only when fewer than 3 items remain
        old = items[offsets[kept[u]] : offsets[kept[u] + 1]]
        assert len([x for x in old[:-2] if x not in held]) + 2 < 3


def test_held_out_dataset_has_unseen_targets_and_keeps_them_as_candidates() -> None:
    wh = _shared()
    full = load_dataset(DataConfig(dataset=ML_CUT), wh, "text")
    cut = load_dataset(DataConfig(dataset=ML_CUT, holdout_items=0.1, holdout_seed=3), wh, "text")
    assert cut.item_ids == full.item_ids  # every item stays a candidate
    counts = cut.train_counts()
    n_unseen = int((counts[1:] == 0).sum())
    assert n_unseen >= round(0.1 * full.n_items)
    test_targets = cut.items[cut.offsets[1:] - 1]
    assert (counts[test_targets] == 0).any()  # some test targets are held-out items


def test_sasrec_learns_the_next_item_and_ignores_features() -> None:
    torch.manual_seed(0)
    cfg = M2SEConfig(arch="sasrec", hidden_dropout=0.0, attn_dropout=0.0)
    m = SASRec(cfg, n_items=20, max_len=8)
    inputs = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]] * 4)
    targets = torch.tensor([[2, 3, 4, 5, 6, 7, 8, 9]] * 4)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        out = m.finetune_loss(None, inputs, targets)
        first = first if first is not None else float(out.loss.detach())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert float(out.loss.detach()) < 0.2 * first
    m.eval()
    tables = m.all_item_features(None)
    q = m.user_vectors(tables, inputs[:1, :3], torch.tensor([3]))
    scores = q @ m.candidates(tables).T
    scores[0, 0] = -1e9
    assert int(scores.argmax()) == 4  # after 1, 2, 3 comes 4


def test_nip_image_off_drops_the_term_and_both_off_is_an_error() -> None:
    torch.manual_seed(0)
    from trainer.data import FeatureStack

    n, d = 12, 16
    feats = {
        m: FeatureStack(torch.randn(n + 1, 2, d).half(), torch.ones(n + 1, 2, dtype=torch.bool))
        for m in ("text", "image")
    }
    model = M2SE(M2SEConfig(), n, d, max_len=6)
    inputs = torch.tensor([[1, 2, 3, 4, 0, 0], [5, 6, 7, 8, 9, 0]])
    targets = torch.tensor([[2, 3, 4, 5, 0, 0], [6, 7, 8, 9, 10, 0]])
    on = model.pretrain_loss(feats, inputs, targets, 0.07, 0.01)
    off = model.pretrain_loss(feats, inputs, targets, 0.07, 0.01, nip_image=False)
    assert {"nip_text", "nip_image", "cmcl"} == set(on.terms)
    assert {"nip_text", "cmcl"} == set(off.terms)
    with pytest.raises(ValueError, match="no loss term"):
        M2SE(M2SEConfig(modalities="image"), n, d, max_len=6).pretrain_loss(
            feats, inputs, targets, 0.07, 0.01, use_cmcl=False, nip_image=False
        )


def test_a_dataset_without_any_image_trains_a_text_model() -> None:
    wh = _shared()
    office = load_dataset(DataConfig(dataset=OFFICE_CUT), wh, "both")
    ml = load_dataset(DataConfig(dataset=ML_CUT), wh, "both")
    cfg = Config()
    off = without_empty_modality(cfg, office)
    assert off.model.modalities == "text" and model_name(off, "finetune").startswith("M2SE (text)")
    assert without_empty_modality(cfg, ml) == cfg
    assert model_name(cfg, "pretrain") == "M2SE (text+image)"


def test_run_ids_follow_the_configuration() -> None:
    a = Config.from_dict({"data": {"dataset": "x"}, "runtime": {"device": "cpu"}})
    b = Config.from_dict(
        {"data": {"dataset": "x"}, "runtime": {"device": "cpu", "threads": 1, "progress": False}}
    )
    c = Config.from_dict({"data": {"dataset": "x"}, "finetune": {"lr": 0.5}})
    bf16 = Config.from_dict({"data": {"dataset": "x"}, "runtime": {"device": "cpu", "amp": "bf16"}})
    # Precision changes the numbers: a bf16 run is never reused for an fp32 one.
    assert run_key("finetune", "x", 1, a, None) != run_key("finetune", "x", 1, bf16, None)
    assert run_key("finetune", "x", 1, a, None) == run_key("finetune", "x", 1, b, None)
    assert run_key("finetune", "x", 1, a, None) != run_key("finetune", "x", 1, c, None)
    assert run_key("finetune", "x", 1, a, None) != run_key("finetune", "x", 1, a, "parent")
    assert run_key("finetune", "x", 1, a, None) != run_key("finetune", "x", 2, a, None)
    # Fine-tuning settings cannot change a pre-training run: variants share it.
    assert run_key("pretrain", "x", 1, a, None) == run_key("pretrain", "x", 1, c, None)
    p = Config.from_dict({"data": {"dataset": "x"}, "pretrain": {"lr": 0.5}})
    assert run_key("pretrain", "x", 1, a, None) != run_key("pretrain", "x", 1, p, None)
    # ... and pre-training settings cannot change a fine-tuning that has no parent.
    assert run_key("finetune", "x", 1, a, None) == run_key("finetune", "x", 1, p, None)
    assert run_key("finetune", "x", 1, a, "parent") != run_key("finetune", "x", 1, p, "parent")
    # The lr decay is a setting like any other once it is on; off (a constant lr, patience 10:
    # the fine-tuning defaults before the twelfth session), it leaves the ids of the runs made
    # before it existed as they were (these two were computed then; a parentless fine-tuning's id
    # lost its pre-training section in the thirteenth session, so this one has a parent).
    old = Config.from_dict(
        {
            "data": {"dataset": "x"},
            "runtime": {"device": "cpu"},
            "finetune": {"lr_decay": 1.0, "decay_patience": 3, "patience": 10},
        }
    )
    assert run_key("finetune", "x", 1, a, None) != run_key("finetune", "x", 1, old, None)
    # So does min_delta: off (0), the ids are those of before it existed; on, a setting.
    md = Config.from_dict({"data": {"dataset": "x"}, "finetune": {"min_delta": 0.001}})
    assert run_key("finetune", "x", 1, a, None) != run_key("finetune", "x", 1, md, None)
    assert run_key("pretrain", "x", 1, a, None) == run_key("pretrain", "x", 1, md, None)
    parent = "x-pre-x-s1-5c4ce80537"
    assert run_key("finetune", "x", 1, old, parent) == "x-fin-x-s1-48d48e37f0"
    assert run_key("pretrain", "x", 1, a, None) == "x-pre-x-s1-5c4ce80537"


def test_plan_runs_every_row_once_before_the_further_seeds() -> None:
    cells = plan(["a", "b"], BUDGETS["cpu"])
    seeds = [s for _, _, s in cells]
    assert seeds == sorted(seeds)
    first = [v.group for _, v, s in cells if s == 2020]
    assert first == sorted(first, key=["main", "ablation", "cold-start", "cross-domain"].index)
    assert {v.group for _, v, s in cells if s != 2020} == {"main"}
    main = [(d, v.name, s) for d, v, s in cells if v.group == "main"]
    assert len(main) == 2 * 4 * 3  # 2 datasets x 4 main models x 3 seeds
    assert {s for d, v, s in cells if v.group != "main"} == {2020}
    assert [v.name for d, v, _ in cells if v.group == "cross-domain"] == [
        "MSM4SR pre-trained on b",
        "MSM4SR pre-trained on a",
    ]
    picked = plan(["a", "b"], BUDGETS["cpu"], rows=["MSM4SR", "no mixup"])
    assert {v.name for _, v, _ in picked} == {"MSM4SR", "no mixup"}
    assert [(d, s) for d, v, s in picked if v.name == "MSM4SR"] == [
        (d, s) for d, v, s in cells if v.name == "MSM4SR"
    ]
    with pytest.raises(ValueError, match=r"--row \['MSM4SR x'\] not in"):
        plan(["a", "b"], BUDGETS["cpu"], rows=["MSM4SR x"])


def test_report_cli_end_to_end_and_reuse(tmp_path: Path) -> None:
    wh = warehouse_copy(tmp_path / "wh")
    env = {**os.environ, "MSM4SR_WAREHOUSE": str(wh.root), "OMP_NUM_THREADS": "2"}
    cmd = [
        sys.executable, "-m", "flows.cli", "report", "--name", "t", "--out", str(tmp_path / "reports"),
        "--datasets", f"{ML_CUT},{OFFICE_CUT}", "--budget", "smoke", "--no-progress",
        "--set", "runtime.threads=2",
    ]  # fmt: skip
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert " epoch 1: loss " in first.stderr  # --no-progress: one line per epoch instead
    out = tmp_path / "reports" / "t"
    md = (out / "report.md").read_text()
    for needle in ("## Targets", f"## {ML_CUT}", f"## {OFFICE_CUT}", "SASRec (ID)", "no NIP-image",
                   "Cross-domain", "unseen", "budget 'smoke'"):  # fmt: skip
        assert needle in md, needle
    assert f"{OFFICE_CUT}: 'no mixup' skipped: the dataset has no image features" in md
    # the runs' checkpoints re-rank the test cases (reproducing their stored NDCG@10) for the
    # paired interval beside each target line
    for ds in (ML_CUT, OFFICE_CUT):
        line = next(x for x in md.splitlines() if f"{ds}, `all` targets" in x and "SASRec" in x)
        assert "; paired 95% interval of the NDCG@10 gain over test cases " in line, line
    for png in (
        f"ndcg10_{ML_CUT}.png",
        f"time_to_quality_{ML_CUT}.png",
        f"ndcg10_{OFFICE_CUT}.png",
    ):
        assert (out / png).stat().st_size > 1000
    # Every number in metrics.csv is the metrics row of its run, which has a finished runs row.
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert {r["model"] for r in rows} >= {"SASRec (ID)", "MSM4SR", "Popularity", "image only"}
    with store.connect(wh, create=False, read_only=True) as con:
        for r in rows[:: max(1, len(rows) // 40)]:
            v = con.execute(
                "SELECT m.value FROM metrics m JOIN runs USING (run_id) WHERE run_id = ? "
                "AND epoch = -1 AND split = ? AND subset = ? AND metric = ? AND status = 'finished'",
                [r["run_id"], r["split"], r["subset"], r["metric"]],
            ).fetchone()
            assert v is not None and float(r["value"]) == pytest.approx(v[0], rel=1e-5)
        models = dict(con.execute("SELECT run_id, model FROM runs").fetchall())
    sas = next(r["run_id"] for r in rows if r["model"] == "SASRec (ID)")
    assert models[sas] == "SASRec"
    # The learning curves the time-to-quality plot is drawn from, read in one query: the smoke
    # budget's one epoch of each run, each run its own; a run without rows has none.
    msm = next(r["run_id"] for r in rows if r["model"] == "MSM4SR")
    curves = valid_curves([sas, msm, "x-no-such-run"], wh)
    assert curves["x-no-such-run"] == [] and curves[sas] == valid_curve(sas, wh)
    for run in (sas, msm):
        curve = curves[run]
        assert [c["epoch"] for c in curve] == [1] and curve[0]["seconds"] > 0, curve
        with store.connect(wh, create=False, read_only=True) as con:
            (valid,) = con.execute(
                "SELECT value FROM metrics WHERE run_id = ? AND epoch = 1 AND split = 'valid' "
                "AND subset = 'all' AND metric = 'NDCG@10'",
                [run],
            ).fetchone()
        assert curve[0]["valid_ndcg10"] == valid
    assert curves[sas] != curves[msm]

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    n_cells = md.count("\n| " + ML_CUT) + md.count("\n| " + OFFICE_CUT)
    assert f"({n_cells} cells, {n_cells} reused)" in again.stdout.replace("\n", " ")


def test_report_rows_train_with_their_architectures_defaults_to_early_stop() -> None:
    from trainer.config import defaults
    from trainer.experiments import stage_configs, variants

    rows = {v.name: v for v in variants(None)}
    b = BUDGETS["cpu"]
    user = [{"finetune": {"patience": 7}}]  # the user's --set reaches every row
    imgs = {"encoder_version": "e", "tagger_version": "t"}
    _, sas = stage_configs(user, b, "office", rows["SASRec (ID)"], 1, imgs)
    pre, ours = stage_configs(user, b, "office", rows["MSM4SR"], 1, imgs)
    want_sas, want_m2se = defaults("sasrec"), defaults("m2se")
    assert sas.model == want_sas.model and sas.finetune.lr == want_sas.finetune.lr
    assert ours.model == want_m2se.model and pre is not None
    assert sas.finetune.max_epochs == want_sas.finetune.max_epochs  # no per-arch cap
    assert sas.finetune.patience == ours.finetune.patience == 7
    assert len(b.seeds_for("ml-1m", True)) == 1 and len(b.seeds_for("amazon-office", True)) == 3


def test_without_images_msm4sr_and_the_text_only_row_are_one_run() -> None:
    from trainer.experiments import run_key, stage_configs, variants

    rows = {v.name: v for v in variants(None)}
    b = BUDGETS["cpu"]

    def ids(name: str, versions: dict) -> tuple[str, str]:
        pre, ft = stage_configs([], b, "office", rows[name], 1, versions)
        assert pre is not None
        p = run_key("pretrain", "office", 1, pre, None)
        return p, run_key("finetune", "office", 1, ft, p)

    no_img = {"encoder_version": "e", "tagger_version": None}
    assert ids("MSM4SR", no_img) == ids("Text-only pre-trained", no_img)
    imgs = {"encoder_version": "e", "tagger_version": "t"}
    assert ids("MSM4SR", imgs) != ids("Text-only pre-trained", imgs)
