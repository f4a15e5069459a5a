"""Side-by-side peer bench: RecBole 1.2.1's SASRec, our SASRec and our MSM4SR on the same split.

For each dataset (default: amazon-office, then ml-1m), on this machine, one after another, with
the same number of threads:
1. the warehouse's dataset is exported as RecBole atomic files by
   `pipeline.sources.recbole.export_recbole` (exactly the interactions the trainer reads, in its
   order), so both sides split the same sequences leave-one-out;
2. RecBole's SASRec runs in its own throw-away venv (`bench/.recbole-venv`: RecBole 1.2.1
   `--no-deps`, its runtime deps with numpy<2, torch from the same wheel as the project; never a
   project dependency) with the protocol of ../shared/RECBOLE.md (CE over all items, every prefix
   a sample, dropout 0.5, lr 1e-3, early stop on valid NDCG@10 with patience 10, full ranking,
   history items kept, torch.compile). On ML-1M it is capped at `--recbole-ml1m-epochs` (2):
   an epoch takes ~21 min on 2 cores; the JSON and the printout say so;
3. our SASRec (`msm4sr finetune --set model.arch=sasrec`, nothing else) and our MSM4SR
   (`msm4sr train`, nothing else): the trainer's defaults, as the report's cells "SASRec (ID)"
   and "MSM4SR" of seed `--seed` (the same run ids: the report reuses these runs). On ML-1M our
   MSM4SR's pre-training is capped at 5 epochs (PRETRAIN_EPOCHS), as in the README's ML-1M
   report command (`--set pretrain.max_epochs=5`), whose cell it shares;

Prints and writes bench/results/peer.json and bench/results/peer.png: validation NDCG@10
against wall seconds (training + validation) for each system, the test metrics of each one's
best validation epoch, and the ratios "seconds to reach RecBole's best validation NDCG@10"
(ours / RecBole's time to its best epoch, and / its whole run) and "test NDCG@10 ours / RecBole",
with that gain's 95% interval from a paired bootstrap over the test users (ours: the mean per
case over every seed in peer.parts; RecBole's ranks are re-scored by its own evaluation code).

Resumable (the whole bench takes hours on 2 cores): each finished (dataset, system) is kept in
bench/results/peer.parts/ and reused, and our runs have ids derived from their configuration, so
a killed one resumes from its last checkpoint (`--fresh` redoes everything). A reused part keeps
the seconds measured when it ran; the JSON records when each part ran. peer.json keeps the
datasets that an invocation did not run (`--datasets ml-1m` leaves Office's entry as it was).

    .venv/bin/python bench/peer_recbole.py                       # both datasets, all systems
    .venv/bin/python bench/peer_recbole.py --datasets amazon-office --systems recbole sasrec

`--systems` chooses what runs; a system left out keeps its stored part (if it holds today's
settings) in peer.json and in the comparison, so re-running our parts keeps RecBole's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from features import store  # noqa: E402
from features.store import WarehouseConfig  # noqa: E402
from pipeline.sources.recbole import export_recbole  # noqa: E402
from trainer.config import Config  # noqa: E402
from trainer.experiments import (  # noqa: E402
    BUDGETS,
    feature_versions,
    run_key,
    stage_configs,
    train_or_reuse,
    variants,
)
from trainer.paired import REPRODUCE_TOL, bootstrap_gain, case_ndcg, ndcg_at_k  # noqa: E402
from trainer.runlog import valid_curve  # noqa: E402

RESULTS = REPO / "bench" / "results"
PARTS = RESULTS / "peer.parts"
SYSTEMS = ("recbole", "sasrec", "msm4sr")
LABELS = {"recbole": "RecBole 1.2.1 SASRec", "sasrec": "our SASRec", "msm4sr": "our MSM4SR"}
RECBOLE_DEPS = [
    "numpy<2",
    "pandas<3",
    "scipy",
    "tqdm",
    "colorlog==4.7.2",
    "colorama==0.4.4",
    "scikit-learn",
    "pyyaml",
    "tensorboard",
    "thop",
    "tabulate",
    "plotly",
    "texttable",
    "psutil",
]
# ../shared/RECBOLE.md: the protocol that matches ours.
RECBOLE_CONFIG = {
    "USER_ID_FIELD": "user_id",
    "ITEM_ID_FIELD": "item_id",
    "TIME_FIELD": "timestamp",
    "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
    "user_inter_num_interval": "[5,inf)",
    "MAX_ITEM_LIST_LENGTH": 50,
    "eval_args": {
        "split": {"LS": "valid_and_test"},
        "order": "TO",
        "mode": "full",
        "group_by": "user",
    },
    "metrics": ["Recall", "NDCG", "MRR"],
    "topk": [10, 20],
    "valid_metric": "NDCG@10",
    "n_layers": 2,
    "n_heads": 2,
    "hidden_size": 64,
    "inner_size": 256,
    "hidden_dropout_prob": 0.5,
    "attn_dropout_prob": 0.5,
    "hidden_act": "gelu",
    "layer_norm_eps": 1.0e-12,
    "initializer_range": 0.02,
    "loss_type": "CE",
    "train_neg_sample_args": None,
    "learning_rate": 0.001,
    "epochs": 200,
    "stopping_step": 10,
    "eval_step": 1,
    "reproducibility": True,
    "device": "cpu",
    "use_gpu": False,
    "show_progress": False,
    "save_dataset": False,
    "save_dataloaders": False,
}
# Our MSM4SR's pre-training epochs per dataset where capped: the README's ML-1M report command
# (`--set pretrain.max_epochs=5`), so the bench and that report share one run; elsewhere it runs
# to its early stop.
PRETRAIN_EPOCHS = {"ml-1m": 5}
BATCH = {"ml-1m": 2048}  # RECBOLE.md: 1024 on Office, 2048 on ML-1M


def log(msg: str) -> None:
    print(f"[peer {datetime.now(UTC):%H:%M:%S}] {msg}", flush=True)


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True)


# --------------------------------------------------------------------------- RecBole


def recbole_python(venv: Path) -> Path:
    """RecBole 1.2.1's own venv (created once; a stamp marks a complete install)."""
    py = venv / "bin" / "python"
    stamp = venv / ".msm4sr-recbole"
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    if stamp.is_file() and stamp.read_text() == torch_pin:
        return py
    log(f"installing RecBole 1.2.1 into {venv} (its own venv, {torch_pin})")
    run([sys.executable, "-m", "venv", "--clear", str(venv)])
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    run([*pip, torch_pin])
    run([*pip, "--no-deps", "recbole==1.2.1"])
    run([*pip, *RECBOLE_DEPS, torch_pin])
    stamp.write_text(torch_pin)
    return py


def run_recbole(
    dataset: str, atomic: Path, venv: Path, threads: int, seed: int, max_epochs: int | None
) -> dict:
    py = recbole_python(venv)
    params = {
        **RECBOLE_CONFIG,
        "data_path": str(atomic.parent),
        "dataset": atomic.name,
        "checkpoint_dir": str(atomic.parent / "saved"),
        "seed": seed,
        "train_batch_size": BATCH.get(dataset, 1024),
        "_threads": threads,
        "_compile": True,
    }
    if max_epochs:
        params["epochs"] = max_epochs
    cfg_path = atomic.parent / f"{atomic.name}.recbole.json"
    out = atomic.parent / f"{atomic.name}.recbole.out.json"
    cfg_path.write_text(json.dumps(params))
    log(f"{dataset}: RecBole SASRec (epochs <= {params['epochs']})")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(
        [str(py), str(REPO / "bench" / "recbole_runner.py"), str(cfg_path), str(out)],
        check=True,
        env=env,
        cwd=atomic.parent,
    )
    res = json.loads(out.read_text())
    res["epoch_cap"] = max_epochs
    res["test_ndcg10"] = res["test"].get("ndcg@10")
    res["test_recall10"] = res["test"].get("recall@10")
    return res


# --------------------------------------------------------------------------- ours


def our_configs(
    dataset: str, system: str, threads: int, seed: int, wh: WarehouseConfig | None
) -> tuple[Config | None, Config]:
    """(pre-training config or None, fine-tuning config) of our system: exactly the report's
    cells "SASRec (ID)" and "MSM4SR" (budget cpu), so both share their runs (same ids)."""
    name = {"sasrec": "SASRec (ID)", "msm4sr": "MSM4SR"}[system]
    variant = next(v for v in variants(None) if v.name == name)
    base: list[dict] = [{"runtime": {"progress": False, "device": "cpu", "threads": threads}}]
    if dataset in PRETRAIN_EPOCHS:
        base.append({"pretrain": {"max_epochs": PRETRAIN_EPOCHS[dataset]}})
    versions = feature_versions(dataset, wh)
    return stage_configs(base, BUDGETS["cpu"], dataset, variant, seed, versions)


def _curve(run_id: str, wh: WarehouseConfig | None) -> tuple[list[dict], dict[str, float]]:
    """(per-epoch elapsed seconds + valid NDCG@10, test metrics of the best epoch) of a run."""
    curve = [c for c in valid_curve(run_id, wh) if "seconds" in c]
    with store.connect(wh, create=False, read_only=True) as con:
        rows = store.query(
            con,
            "SELECT metric, value FROM metrics WHERE run_id = ? AND subset = 'all' "
            "AND split = 'test' AND epoch = -1",
            [run_id],
        ).to_pylist()
    return curve, {r["metric"]: r["value"] for r in rows}


def our_run_ids(
    dataset: str, seed: int, pre_cfg: Config | None, cfg: Config
) -> tuple[str | None, str]:
    """(pre-training run id or None, fine-tuning run id) of our system's configs."""
    pre_id = run_key("pretrain", dataset, seed, pre_cfg, None) if pre_cfg is not None else None
    return pre_id, run_key("finetune", dataset, seed, cfg, pre_id)


def stored_part(
    path: Path, dataset: str, system: str, seed: int, threads: int, wh: WarehouseConfig | None
) -> dict | None:
    """The part in `path` if it is still what `system` would run today, else None: our parts
    must hold the run ids of today's configuration (a changed default gives new ids, and an old
    part would compare yesterday's model); RecBole's part depends on nothing of ours."""
    if not path.is_file():
        return None
    part = json.loads(path.read_text())
    if system == "recbole":
        return part
    want = [
        r for r in our_run_ids(dataset, seed, *our_configs(dataset, system, threads, seed, wh)) if r
    ]
    if part.get("run_ids") != want:
        log(f"{path.name} holds runs {part.get('run_ids')}, today's settings give {want}: stale")
        return None
    return part


def run_ours(
    dataset: str, system: str, threads: int, seed: int, wh: WarehouseConfig | None, fresh: bool
) -> dict:
    pre_cfg, cfg = our_configs(dataset, system, threads, seed, wh)
    pre_id, ft_id = our_run_ids(dataset, seed, pre_cfg, cfg)
    offset, pre_epochs = 0.0, 0
    if pre_cfg is not None:
        log(f"{dataset}: our MSM4SR pre-training ({pre_id})")
        train_or_reuse("pretrain", pre_cfg, pre_id, wh, None, fresh)
        pre_curve, _ = _curve(pre_id, wh)
        offset = pre_curve[-1]["seconds"] if pre_curve else 0.0
        pre_epochs = len(pre_curve)
    log(f"{dataset}: {LABELS[system]} fine-tuning ({ft_id})")
    train_or_reuse("finetune", cfg, ft_id, wh, pre_id, fresh)
    curve, test = _curve(ft_id, wh)
    for c in curve:
        c["seconds"] += offset  # time-to-quality includes pre-training
    best = max(curve, key=lambda c: c["valid_ndcg10"])
    return {
        "curve": curve,
        "finished": True,
        "run_ids": [r for r in (pre_id, ft_id) if r],
        "pretrain_seconds": offset,
        "pretrain_epochs": pre_epochs,
        "train_seconds": curve[-1]["seconds"],
        "best_valid_ndcg10": best["valid_ndcg10"],
        "best_epoch": best["epoch"],
        "test": test,
        "test_ndcg10": test.get("NDCG@10"),
        "test_recall10": test.get("Recall@10"),
        "config": cfg.to_dict(),
    }


# --------------------------------------------------------------------------- comparison


def paired_test_gain(ds: str, system: str, rb: dict, wh: WarehouseConfig | None) -> dict:
    """Test NDCG@10 of our `system` (per case, the mean over every seed whose part in peer.parts
    holds today's settings; stale parts are left out) against RecBole's on the same users: paired
    bootstrap (trainer/paired.py)."""
    cases = rb.get("test_cases")
    if not cases:
        return {"note": "RecBole's part has no per-case ranks (it ran before they were kept)"}
    rb_ndcg = dict(zip(cases["user_ids"], ndcg_at_k(np.asarray(cases["ranks"])), strict=True))
    parts, ours = [], []
    for path in sorted(PARTS.glob(f"{ds}-{system}-s*.json")):
        part = stored_part(path, ds, system, int(path.stem.rsplit("-s", 1)[1]), 1, wh)
        if part is None:
            continue
        parts.append(path)
        got = case_ndcg(part["run_ids"][-1], wh, "test")
        if abs(got.ndcg.mean() - part["test_ndcg10"]) > REPRODUCE_TOL:  # not this checkpoint
            return {"note": f"{path.name}: its run's checkpoint does not reproduce the part's test"}
        ours.append(got)
    if not ours:
        return {"note": "no part of this system holds today's settings"}
    users = ours[0].user_ids
    if any(list(o.user_ids) != list(users) for o in ours) or set(users) != set(rb_ndcg):
        return {"note": "the systems' test users differ: no paired comparison"}
    ref = np.array([rb_ndcg[u] for u in users])
    mean = np.mean([o.ndcg for o in ours], axis=0)
    gain, low, high = bootstrap_gain(mean, ref)
    return {
        "seeds": [p.stem.rsplit("-s", 1)[1] for p in parts],
        "cases": len(users),
        "ours_ndcg10": float(mean.mean()),
        "recbole_ndcg10_from_ranks": float(ref.mean()),  # = its reported metric, up to ties
        "gain": gain,
        "interval95": [low, high],
    }


def first_reaching(curve: list[dict], level: float) -> float | None:
    return next((c["seconds"] for c in curve if c["valid_ndcg10"] >= level), None)


def compare(ds: str, parts: dict[str, dict], wh: WarehouseConfig | None) -> dict:
    rb = parts.get("recbole")
    if not rb:
        return {}
    level = rb["best_valid_ndcg10"]
    rb_to_best = next(c["seconds"] for c in rb["curve"] if c["valid_ndcg10"] >= level)
    out = {
        "recbole_best_valid_ndcg10": level,
        "recbole_seconds_to_best": rb_to_best,
        "recbole_seconds_total": rb["train_seconds"],
    }
    for s in ("sasrec", "msm4sr"):
        if s not in parts:
            continue
        t = first_reaching(parts[s]["curve"], level)
        out[s] = {
            "seconds_to_recbole_best_valid": t,
            "ratio_to_recbole_time_to_best": None if t is None else t / rb_to_best,
            "ratio_to_recbole_total_time": None if t is None else t / rb["train_seconds"],
            "test_ndcg10_ratio": (parts[s]["test_ndcg10"] or 0) / rb["test_ndcg10"],
            "test_ndcg10_paired": paired_test_gain(ds, s, rb, wh),
        }
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = list(results["datasets"])
    fig, axes = plt.subplots(1, len(ds), figsize=(6 * len(ds), 4), squeeze=False)
    for ax, d in zip(axes[0], ds, strict=True):
        for s, part in results["datasets"][d]["systems"].items():
            xs = [c["seconds"] for c in part["curve"]]
            ys = [c["valid_ndcg10"] for c in part["curve"]]
            label = LABELS[s] + (
                f" (capped at {part['epoch_cap']} epochs)" if part.get("epoch_cap") else ""
            )
            ax.plot(xs, ys, marker=".", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("wall seconds (training + validation), 2 CPU threads")
        ax.set_ylabel("validation NDCG@10")
        ax.set_title(d)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cpu_model() -> str:
    """The CPU's model name (Linux), else the architecture: hosts of one platform differ."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["amazon-office", "ml-1m"])
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=2020)
    ap.add_argument("--recbole-ml1m-epochs", type=int, default=2)
    ap.add_argument(
        "--recbole-cap", type=int, default=None, help="cap RecBole's epochs on every dataset"
    )
    ap.add_argument("--venv", type=Path, default=REPO / "bench" / ".recbole-venv")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / ".peer")
    ap.add_argument("--warehouse", type=Path, default=None)
    ap.add_argument("--fresh", action="store_true", help="redo every part (no reuse)")
    args = ap.parse_args()
    wh = WarehouseConfig(root=args.warehouse) if args.warehouse else None
    PARTS.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.platform()}, {cpu_model()}, {os.cpu_count()} cpus, {args.threads} threads"
    results: dict = {
        "machine": machine,  # this invocation's; each part records the machine it ran on
        "torch": torch.__version__,
        "seed": args.seed,
        "datasets": {},
    }
    for ds in args.datasets:
        atomic = export_recbole(ds, args.workdir / "atomic", wh)
        entry: dict = {"systems": {}}
        for s in SYSTEMS:
            part_path = PARTS / f"{ds}-{s}-s{args.seed}.json"
            selected = s in args.systems
            part = (
                None
                if args.fresh and selected
                else stored_part(part_path, ds, s, args.seed, args.threads, wh)
            )
            if not selected:  # not run, but its stored part keeps the comparison whole
                if part is None:
                    continue
                log(f"{ds}: {s} not in --systems: its stored {part_path.name}")
            elif part is not None:
                log(f"{ds}: reusing {part_path.name}")
            else:
                t0 = time.perf_counter()
                if s == "recbole":
                    cap = args.recbole_ml1m_epochs if ds == "ml-1m" else None
                    cap = args.recbole_cap or cap
                    part = run_recbole(ds, atomic, args.venv, args.threads, args.seed, cap)
                else:
                    part = run_ours(ds, s, args.threads, args.seed, wh, args.fresh)
                part["bench_seconds"] = time.perf_counter() - t0
                part["ran_at"] = datetime.now(UTC).isoformat(timespec="seconds")
                # Seconds compare across parts only on one machine: say which one this was.
                part["machine"] = machine
                part_path.write_text(json.dumps(part, indent=1))
            entry["systems"][s] = part
            log(
                f"{ds}: {LABELS[s]}: best valid NDCG@10 {part['best_valid_ndcg10']:.4f} at epoch "
                f"{part['best_epoch']}, {part['train_seconds']:.0f} s; test NDCG@10 "
                f"{part['test_ndcg10']:.4f}, Recall@10 {part['test_recall10']:.4f}"
                + (
                    f" (RecBole capped at {part['epoch_cap']} epochs)"
                    if part.get("epoch_cap")
                    else ""
                )
            )
        entry["comparison"] = compare(ds, entry["systems"], wh)
        results["datasets"][ds] = entry
        print(json.dumps({ds: entry["comparison"]}, indent=1), flush=True)
    out = RESULTS / "peer.json"
    if out.is_file():  # keep the datasets this invocation did not run (ordered as before)
        before = json.loads(out.read_text()).get("datasets", {})
        now = results["datasets"]
        results["datasets"] = {d: now.get(d, e) for d, e in before.items()} | now
    out.write_text(json.dumps(results, indent=1))
    plot(results, RESULTS / "peer.png")
    log(f"wrote {out} and {RESULTS / 'peer.png'}")


if __name__ == "__main__":
    main()
