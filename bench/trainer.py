"""Trainer bench: speed and memory of each training stage with today's defaults; a learning check.

Runs on a warehouse that holds the features of both stages, e.g.

    msm4sr features --source movielens && msm4sr features --source amazon-office
    .venv/bin/python bench/trainer.py            # --warehouse DIR, --threads 2, --epochs 2

For each dataset and each stage the report trains (M2SE pre-training, M2SE fine-tuning from
scratch, SASRec fine-tuning), with the architecture's own defaults (trainer/config.py: windows
sample mode, batch in targets by the dataset, lr by the batch), all in one process and measured
in the same run: seconds per epoch and targets per second (median of `--epochs` epochs), steps
per epoch, validation seconds (full ranking), peak RSS; then, as a learning check, validation
NDCG@10 after those epochs against the popularity reference (validation only: the test split
is never read here). Quality against time to the early stop is measured by bench/tune.py and
bench/peer_recbole.py; the sample modes are compared in docs/trainer.md.
Targets: ML-1M fine-tuning epoch < 60 s on 2 cores (SASRec), peak RSS < 4 GB.
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
from trainer.config import Config, resolve  # noqa: E402
from trainer.data import load_dataset  # noqa: E402
from trainer.evaluation import eval_cases, popularity_metrics  # noqa: E402
from trainer.trainer import Trainer  # noqa: E402

# (name, architecture, stage) of each measured stage.
STAGES = (
    ("M2SE pre-training", "m2se", "pretrain"),
    ("M2SE fine-tuning", "m2se", "finetune"),
    ("SASRec fine-tuning", "sasrec", "finetune"),
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cfg_for(dataset: str, arch: str, threads: int) -> Config:
    """The defaults of `arch` (as plain `msm4sr finetune --set model.arch=...`), on CPU."""
    return resolve(
        [
            {
                "data": {"dataset": dataset},
                "model": {"arch": arch},
                "runtime": {"progress": False, "device": "cpu", "threads": threads},
            }
        ]
    )


def measure(dataset: str, wh: WarehouseConfig, threads: int, epochs: int) -> dict:
    cfg = cfg_for(dataset, "m2se", threads)
    t0 = time.perf_counter()
    data = load_dataset(cfg.data, wh)
    out: dict = {
        "n_users": data.n_users,
        "n_items": data.n_items,
        "n_interactions": int(len(data.items)),
        "load_seconds": round(time.perf_counter() - t0, 2),
        "rss_after_load_mb": round(peak_rss_mb(), 1),
    }
    pop = popularity_metrics(data, eval_cases(data, "valid"), cfg, data.train_counts())
    out["popularity_valid_NDCG@10"] = round(pop["all"]["NDCG@10"], 4)
    for name, arch, stage in STAGES:
        tr = Trainer(cfg_for(dataset, arch, threads), data, stage, wh)
        secs, rates, steps = [], [], []
        for e in range(1, epochs + 1):
            st = tr.train_epoch(e)
            secs.append(st["epoch_seconds"])
            rates.append(st["samples_per_s"])
            steps.append(-(-tr.samples.n_targets // tr.batch))
        t1 = time.perf_counter()
        valid = tr.evaluate("valid")
        row = {
            "epoch_seconds": round(statistics.median(secs), 2),
            "targets_per_s": round(statistics.median(rates)),
            "targets_per_epoch": int(tr.samples.n_targets),
            "batch_targets": tr.batch,
            "lr": tr.tcfg.lr,
            "steps_per_epoch": steps[-1],
            "valid_seconds": round(time.perf_counter() - t1, 2),
            f"valid_NDCG@10_after_{epochs}_epochs": round(valid["all"]["NDCG@10"], 4),
            "over_popularity": round(
                valid["all"]["NDCG@10"] / max(pop["all"]["NDCG@10"], 1e-12), 2
            ),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        out[name] = row
        print(f"[{dataset}] {name}: {row}", flush=True)
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
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per stage (median)")
    ap.add_argument("--datasets", nargs="+", default=["ml-1m", "amazon-office"])
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
        "ran_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "defaults": "each architecture's own (trainer/config.py ARCH_DEFAULTS), windows mode",
        "datasets": {},
    }
    for ds in args.datasets:
        res["datasets"][ds] = measure(ds, wh, args.threads, args.epochs)
    if "ml-1m" in res["datasets"]:
        ft = res["datasets"]["ml-1m"]["SASRec fine-tuning"]["epoch_seconds"]
        res["targets"] = {
            "ml1m_sasrec_epoch_seconds": ft,
            "ml1m_sasrec_epoch_under_60s": ft < 60,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_rss_under_4GB": peak_rss_mb() < 4096,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
