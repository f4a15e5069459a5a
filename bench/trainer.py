"""Trainer bench: speed and memory of pre-training, fine-tuning and evaluation; learning checks.

Runs on a warehouse that holds the features of both stages (ingest -> tag -> embed), e.g.

    msm4sr ingest movielens /work/shared/datasets/movielens-1m
    msm4sr ingest amazon-office /work/shared/datasets/amazon-office
    msm4sr tag --dataset ml-1m
    msm4sr embed --dataset ml-1m && msm4sr embed --dataset amazon-office
    .venv/bin/python bench/trainer.py            # --warehouse DIR, --threads 2, --skip-quality

Sections (all in one process, numbers measured in the same run):
1. speed: per dataset, seconds per epoch and training samples/s (targets per second) of
   M2SE pre-training and fine-tuning with the trainer's defaults (sample mode, batch, lr),
   full-ranking evaluation seconds,
   data loading seconds; peak RSS of the process. Target: ML-1M fine-tune epoch < 60 s on
   2 cores, peak RSS < 4 GB.
2. learning (ML-1M): 2 epochs of pre-training then 3 of fine-tuning (lr 1e-3); valid and test
   NDCG@10 against the popularity reference.
3. sample modes (Amazon Office): fine-tuning from scratch with every_prefix (batch 1024 targets)
   and all_positions (batch 128 targets; `batch_size` counts targets in every mode since issue
   #14, so the two no longer take the same number of steps per epoch) for the same epochs; best
   valid and test NDCG@10 side by side. The default mode (windows) is compared on validation in
   bench/tune.py's results (docs/trainer.md), not here.
bench/results/trainer.json was last written on 2026-11-24, by the trainer before issue #14
(all-positions mode): re-run it before quoting it for today's defaults.
Writes bench/results/trainer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from features.store import WarehouseConfig  # noqa: E402
from trainer.config import Config, merge  # noqa: E402
from trainer.data import load_dataset  # noqa: E402
from trainer.stages import finetune, pretrain  # noqa: E402
from trainer.trainer import Trainer  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cfg_for(dataset: str, threads: int, **sections: dict) -> Config:
    base: dict = {
        "data": {"dataset": dataset},
        "runtime": {"progress": True, "device": "cpu", "threads": threads},
    }
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return merge(Config(), base)


def speed(dataset: str, wh: WarehouseConfig, threads: int, epochs: int) -> dict:
    cfg = cfg_for(dataset, threads)
    t0 = time.perf_counter()
    data = load_dataset(cfg.data, wh)
    load_s = time.perf_counter() - t0
    out: dict = {
        "n_users": data.n_users,
        "n_items": data.n_items,
        "n_interactions": int(len(data.items)),
        "load_seconds": round(load_s, 2),
        "rss_after_load_mb": round(peak_rss_mb(), 1),
    }
    for stage in ("pretrain", "finetune"):
        tr = Trainer(cfg, data, stage, wh)
        secs, rates = [], []
        for e in range(1, epochs + 1):
            st = tr.train_epoch(e)
            secs.append(st["epoch_seconds"])
            rates.append(st["samples_per_s"])
        t1 = time.perf_counter()
        tr.evaluate("valid")
        eval_s = time.perf_counter() - t1
        out[stage] = {
            "epoch_seconds": round(statistics.median(secs), 2),
            "samples_per_s": round(statistics.median(rates)),
            "targets_per_epoch": int(tr.samples.n_targets),
            "batch_size": tr.batch,
            "batches_per_epoch": -(-tr.samples.n_targets // tr.batch),
            "eval_valid_seconds": round(eval_s, 2),
        }
        print(f"[{dataset}] {stage}: {out[stage]}", flush=True)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return out


def learning(wh: WarehouseConfig, threads: int, pre_epochs: int, ft_epochs: int) -> dict:
    # Fine-tuning at lr 1e-3 (PAPER.md's grid: {1e-4, 1e-3}) so that a few epochs show learning.
    cfg = cfg_for(
        "ml-1m",
        threads,
        pretrain={"max_epochs": pre_epochs},
        finetune={"max_epochs": ft_epochs, "lr": 1e-3},
    )
    t0 = time.perf_counter()
    pre = pretrain(cfg, wh)
    ft = finetune(cfg, wh, from_run=pre.run_id)
    res = {
        "pretrain_run": pre.run_id,
        "finetune_run": ft.run_id,
        "pretrain_epochs": pre_epochs,
        "finetune_epochs": ft_epochs,
        "pretrain_valid_NDCG@10": pre.valid["all"]["NDCG@10"],
        "finetune_valid_NDCG@10": ft.valid["all"]["NDCG@10"],
        "finetune_test": {
            k: ft.test["all"][k] for k in ("Recall@10", "NDCG@10", "Recall@20", "NDCG@20", "MRR@10")
        },
        "finetune_test_cold_NDCG@10": ft.test.get("cold", {}).get("NDCG@10"),
        "popularity_valid_NDCG@10": ft.popularity["valid"]["all"]["NDCG@10"],
        "popularity_test": {
            k: ft.popularity["test"]["all"][k]
            for k in ("Recall@10", "NDCG@10", "Recall@20", "NDCG@20", "MRR@10")
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    res["valid_NDCG@10_over_popularity"] = round(
        res["finetune_valid_NDCG@10"] / max(res["popularity_valid_NDCG@10"], 1e-12), 2
    )
    print(f"[learning] {res}", flush=True)
    return res


def sample_modes(wh: WarehouseConfig, threads: int, epochs: int) -> dict:
    out = {}
    for mode, batch in (("all_positions", 128), ("every_prefix", 1024)):
        cfg = cfg_for(
            "amazon-office",
            threads,
            finetune={"max_epochs": epochs, "sample_mode": mode, "batch_size": batch, "lr": 1e-3},
        )
        t0 = time.perf_counter()
        ft = finetune(cfg, wh)
        out[mode] = {
            "batch_size": batch,
            "best_epoch": ft.best_epoch,
            "valid_NDCG@10": ft.valid["all"]["NDCG@10"],
            "test_NDCG@10": ft.test["all"]["NDCG@10"],
            "test_Recall@10": ft.test["all"]["Recall@10"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(f"[modes] {mode}: {out[mode]}", flush=True)
    a, e = out["all_positions"]["test_NDCG@10"], out["every_prefix"]["test_NDCG@10"]
    out["test_NDCG@10_ratio_all_positions_over_every_prefix"] = round(a / max(e, 1e-12), 3)
    out["popularity_test_NDCG@10"] = ft.popularity["test"]["all"]["NDCG@10"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--warehouse",
        type=Path,
        default=None,
        help="warehouse root (default: MSM4SR_WAREHOUSE or ./warehouse)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--epochs", type=int, default=2, help="timed epochs per stage (median reported)"
    )
    ap.add_argument("--datasets", nargs="+", default=["ml-1m", "amazon-office"])
    ap.add_argument("--skip-quality", action="store_true", help="only the speed section")
    ap.add_argument("--learn-epochs", type=int, nargs=2, default=(2, 3), metavar=("PRE", "FT"))
    ap.add_argument("--mode-epochs", type=int, default=10)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "trainer.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    wh = WarehouseConfig(root=args.warehouse) if args.warehouse else WarehouseConfig()
    res: dict = {
        "machine": {
            "cpu_threads": args.threads,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "mode": "all_positions",
        "speed": {},
    }
    for ds in args.datasets:
        res["speed"][ds] = speed(ds, wh, args.threads, args.epochs)
    if "ml-1m" in res["speed"]:
        ft = res["speed"]["ml-1m"]["finetune"]["epoch_seconds"]
        res["targets"] = {
            "ml1m_finetune_epoch_seconds": ft,
            "ml1m_finetune_epoch_under_60s": ft < 60,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_rss_under_4GB": peak_rss_mb() < 4096,
        }
    if not args.skip_quality:
        res["learning_ml1m"] = learning(wh, args.threads, *args.learn_epochs)
        res["sample_modes_office"] = sample_modes(wh, args.threads, args.mode_epochs)
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
