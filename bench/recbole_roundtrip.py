"""bench/recbole_roundtrip: MovieLens-1M exported as RecBole atomic files and read back.

Ingests ML-1M into a warehouse (default: a temporary one; `--warehouse DIR` reuses one that
already holds the dataset), `export_recbole`s it, ingests the export under another dataset name,
and checks identical counts and per-user sequences; also checks that ordering the exported rows
by timestamp (what RecBole's `order: TO` does) gives every user's `seq` order. Prints and writes
bench/results/recbole_roundtrip.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import polars as pl  # noqa: E402

from features import store  # noqa: E402
from features.store import WarehouseConfig  # noqa: E402
from pipeline.ingest import ingest  # noqa: E402
from pipeline.sources.movielens import read_movielens  # noqa: E402
from pipeline.sources.recbole import export_recbole, read_recbole  # noqa: E402

ML = REPO.parent / "shared" / "datasets" / "movielens-1m"


def sequences(wh: WarehouseConfig, dataset: str) -> dict[str, list[str]]:
    with store.connect(wh, create=False, read_only=True) as con:
        rows = con.execute(
            "SELECT user_id, list(item_id ORDER BY seq) FROM interactions WHERE dataset = ? "
            "GROUP BY user_id",
            [dataset],
        ).fetchall()
    return dict(rows)


def run(wh: WarehouseConfig, out: Path, dataset: str) -> dict:
    res: dict = {}
    t = time.perf_counter()
    with store.connect(wh) as con:
        have = con.execute(
            "SELECT count(*) FROM interactions WHERE dataset = ?", [dataset]
        ).fetchone()[0]
    if not have:
        ingest(read_movielens(ML, dataset), wh, progress=False)
        res["ingest_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    folder = export_recbole(dataset, out, wh, name="ml1m_export")
    res["export_s"] = round(time.perf_counter() - t, 2)
    inter = pl.read_csv(
        folder / "ml1m_export.inter",
        separator="\t",
        schema_overrides={"user_id:token": pl.String, "item_id:token": pl.String},
    )
    inter.columns = ["user_id", "item_id", "timestamp"]
    with store.connect(wh, create=False, read_only=True) as con:
        raw_ties = con.execute(
            "SELECT count(*) FROM (SELECT user_id, ts FROM interactions WHERE dataset = ? "
            "GROUP BY ALL HAVING count(*) > 1)",
            [dataset],
        ).fetchone()[0]
    original = sequences(wh, dataset)
    by_time = inter.sort("timestamp", maintain_order=False)
    recbole_order = dict(
        by_time.group_by("user_id", maintain_order=True).agg("item_id").iter_rows()
    )
    t = time.perf_counter()
    back = ingest(read_recbole(folder, dataset=f"{dataset}-recbole"), wh, progress=False)
    res["ingest_export_s"] = round(time.perf_counter() - t, 2)
    again = sequences(wh, f"{dataset}-recbole")
    res |= {
        "users": len(original),
        "interactions": sum(len(s) for s in original.values()),
        "exported_rows": inter.height,
        "users_back": back.n_users,
        "interactions_back": back.n_interactions,
        "same_user_second_groups_in_source": raw_ties,
        "timestamps_strictly_increasing_per_user": bool(
            inter.group_by("user_id")
            .agg(pl.col("timestamp").n_unique() == pl.len())["timestamp"]
            .all()
        ),
        "timestamp_order_equals_seq_order": recbole_order == original,
        "sequences_identical_after_round_trip": again == original,
        "dropped_on_read_back": [r for r in back.report if r["action"] == "dropped"],
    }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--warehouse", type=Path, help="warehouse folder (default: a temporary one)")
    ap.add_argument("--dataset", default="ml-1m")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.warehouse or Path(tmp) / "wh"
        wh = WarehouseConfig(root=root, attach=None, data_path=None)
        res = run(wh, Path(tmp) / "recbole", args.dataset)
    print(json.dumps(res, indent=2))
    out = REPO / "bench" / "results" / "recbole_roundtrip.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"written {out}")
    ok = (
        res["sequences_identical_after_round_trip"]
        and res["timestamp_order_equals_seq_order"]
        and res["interactions_back"] == res["interactions"]
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
