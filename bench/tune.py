"""Validation-only comparison of trainer settings: how the defaults in trainer/config.py were
chosen (docs/trainer.md quotes the results).

Each variant is a list of `section.key=value` overrides on the defaults of its architecture; it
is fine-tuned (or, with `--stage train`, pre-trained then fine-tuned) to its early stop with a
run id derived from its configuration, so a rerun reuses finished variants and resumes a killed
one. Only validation numbers are read and printed: best validation NDCG@10, its epoch, the wall
seconds (training + validation) to reach it and to the end, and the validation curve. The test
split is not looked at here.

    .venv/bin/python bench/tune.py --dataset amazon-office --name office-sasrec-batch \\
        --variant "model.arch=sasrec finetune.batch_size=256" \\
        --variant "model.arch=sasrec finetune.batch_size=1024"

Writes bench/results/tune-<name>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from features.store import WarehouseConfig  # noqa: E402
from trainer import runlog  # noqa: E402
from trainer.config import parse_override, resolve  # noqa: E402
from trainer.experiments import run_key, train_or_reuse  # noqa: E402


def valid_curve(run_id: str, wh: WarehouseConfig | None) -> list[dict]:
    return [{k: round(v, 5) for k, v in c.items()} for c in runlog.valid_curve(run_id, wh)]


def run_variant(
    dataset: str, sets: list[str], stage: str, threads: int, wh: WarehouseConfig | None
) -> dict:
    layers = [
        {
            "data": {"dataset": dataset},
            "runtime": {"progress": False, "device": "cpu", "threads": threads},
        },
        *(parse_override(s) for s in sets),
    ]
    cfg = resolve(layers)
    seed = cfg.finetune.seed
    pre_id, offset = None, 0.0
    if stage == "train":
        pre_id = run_key("pretrain", dataset, seed, cfg, None)
        train_or_reuse("pretrain", cfg, pre_id, wh, None, False)
        pre = valid_curve(pre_id, wh)
        offset = pre[-1]["seconds"] if pre else 0.0
    ft_id = run_key("finetune", dataset, seed, cfg, pre_id)
    train_or_reuse("finetune", cfg, ft_id, wh, pre_id, False)
    curve = valid_curve(ft_id, wh)
    for c in curve:
        c["seconds"] = round(c["seconds"] + offset, 1)
    best = max(curve, key=lambda c: c["valid_ndcg10"])
    return {
        "sets": sets,
        "run_ids": [r for r in (pre_id, ft_id) if r],
        "pretrain_seconds": round(offset, 1),
        "best_valid_ndcg10": best["valid_ndcg10"],
        "best_epoch": best["epoch"],
        "seconds_to_best": best["seconds"],
        "seconds_total": curve[-1]["seconds"],
        "epochs": len(curve),
        "curve": curve,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--name", required=True, help="results go to bench/results/tune-NAME.json")
    ap.add_argument("--variant", action="append", required=True, help="space-separated --set's")
    ap.add_argument("--stage", choices=("finetune", "train"), default="finetune")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warehouse", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # epoch lines
    wh = WarehouseConfig(root=args.warehouse) if args.warehouse else None
    out = REPO / "bench" / "results" / f"tune-{args.name}.json"
    results = []
    for v in args.variant:
        r = run_variant(args.dataset, v.split(), args.stage, args.threads, wh)
        results.append(r)
        print(
            f"{v:60} best valid NDCG@10 {r['best_valid_ndcg10']:.4f} @ epoch {r['best_epoch']} "
            f"({r['seconds_to_best']:.0f} s; {r['epochs']} epochs, {r['seconds_total']:.0f} s)",
            flush=True,
        )
        out.write_text(json.dumps({"dataset": args.dataset, "variants": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
