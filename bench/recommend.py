"""bench/recommend: `recommend --all` on a trained run: users scored per second, seconds to write
the `recommendations` table, peak memory; checks 6,040 x k rows on ML-1M and that the README's
query returns titles. Prints and writes bench/results/recommend.json.

Needs a warehouse with a finished run, e.g. (a short SASRec, about 1 epoch):
    MSM4SR_WAREHOUSE=/tmp/wh msm4sr ingest movielens
    MSM4SR_WAREHOUSE=/tmp/wh msm4sr finetune --dataset ml-1m --set model.arch=sasrec --max-epochs 1
    python bench/recommend.py --warehouse /tmp/wh
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from features import store  # noqa: E402
from features.store import WarehouseConfig  # noqa: E402
from trainer.recommend import recommend_users  # noqa: E402

README_QUERY = (
    "SELECT rank, item_id, title, score FROM recommended_items "
    "WHERE run_id = ? AND user_id = ? ORDER BY rank"
)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def latest_run(wh: WarehouseConfig, dataset: str) -> str:
    with store.connect(wh, create=False, read_only=True) as con:
        row = con.execute(
            "SELECT run_id FROM runs WHERE dataset = ? AND kind = 'finetune' AND status = 'finished' "
            "ORDER BY finished_at DESC LIMIT 1",
            [dataset],
        ).fetchone()
    if row is None:
        sys.exit(
            f"no finished finetune run of {dataset!r} in {wh.root}: train one first (see --help)"
        )
    return row[0]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--warehouse", type=Path, required=True)
    ap.add_argument("--dataset", default="ml-1m")
    ap.add_argument("--run", help="run id (default: the latest finished finetune run)")
    ap.add_argument("-k", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=512)
    args = ap.parse_args()
    wh = WarehouseConfig(root=args.warehouse, attach=None, data_path=None)
    run = args.run or latest_run(wh, args.dataset)
    rss_start = peak_rss_gb()
    t = time.perf_counter()
    s = recommend_users(run, None, args.k, wh, batch_size=args.batch_size)
    total = time.perf_counter() - t
    with store.connect(wh, create=False, read_only=True) as con:
        n_rows, n_users = con.execute(
            "SELECT count(*), count(DISTINCT user_id) FROM recommendations WHERE run_id = ?", [run]
        ).fetchone()
        user = con.execute(
            "SELECT min(user_id) FROM recommendations WHERE run_id = ?", [run]
        ).fetchone()[0]
        shown = con.execute(README_QUERY, [run, user]).fetchall()
        model = con.execute("SELECT model FROM runs WHERE run_id = ?", [run]).fetchone()[0]
    res = {
        "run_id": run,
        "model": model,
        "dataset": s.dataset,
        "k": args.k,
        "batch_size": args.batch_size,
        "users": s.n_users,
        "rows_written": s.n_rows,
        "rows_in_table": n_rows,
        "users_in_table": n_users,
        "rows_equal_users_times_k": n_rows == s.n_users * args.k,
        "seconds_load_run": s.seconds_load,
        "seconds_score": s.seconds_score,
        "users_per_s_scoring": round(s.users_per_s, 1),
        "seconds_write": s.seconds_write,
        "seconds_total": round(total, 2),
        "users_per_s_end_to_end": round(s.n_users / total, 1),
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "rss_gb_before": round(rss_start, 2),
        "readme_query_user": user,
        "readme_query_top3": shown[:3],
        "readme_query_all_titled": bool(shown) and all(r[2] for r in shown),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(res, indent=2, default=str))
    out = REPO / "bench" / "results" / "recommend.json"
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
