"""bench/ingest: seconds to ingest MovieLens-1M with posters into a fresh warehouse (median of 3),
and the re-ingest of unchanged files. Prints and writes bench/results/ingest.json."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from features.store import WarehouseConfig  # noqa: E402
from pipeline.ingest import ingest  # noqa: E402
from pipeline.sources.movielens import read_movielens  # noqa: E402

ML = (
    Path(sys.argv[1]) if len(sys.argv) > 1 else REPO.parent / "shared" / "datasets" / "movielens-1m"
)


def main() -> None:
    full, rerun = [], []
    for _ in range(3):
        with tempfile.TemporaryDirectory() as d:
            wh = WarehouseConfig(root=Path(d), attach=None, data_path=None)
            t = time.perf_counter()
            s = ingest(read_movielens(ML), wh, progress=False)
            full.append(time.perf_counter() - t)
            t = time.perf_counter()
            ingest(read_movielens(ML), wh, progress=False)
            rerun.append(time.perf_counter() - t)
    res = {
        "dataset": str(ML),
        "items": s.n_items,
        "interactions": s.n_interactions,
        "images": s.images_by_status,
        "ingest_s_median": round(statistics.median(full), 2),
        "ingest_s_all": [round(x, 2) for x in full],
        "reingest_unchanged_s_median": round(statistics.median(rerun), 2),
    }
    print(json.dumps(res, indent=2))
    out = REPO / "bench" / "results" / "ingest.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
