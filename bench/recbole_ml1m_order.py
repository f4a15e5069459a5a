"""Why RecBole's ML-1M numbers depend on the file it reads: float32 timestamps reorder sequences.

RecBole 1.2.1 stores a `float` field as a float32 tensor before it sorts interactions by time
(`Interaction.sort`, a stable argsort). ML-1M's Unix timestamps (~9.7e8 s) are then rounded to
multiples of 64 s, so the ratings a user gave within ~64 s of each other keep the order of the
file instead of their time order. `ratings.dat` is not in time order within a user, so RecBole
reading ML-1M in the file's own order trains and evaluates on another split than the true time
order (which is the warehouse's, and the order bench/peer_recbole.py's export writes: its
timestamps are strictly increasing per user, so the rounding keeps their order).

This bench measures, on `ratings.dat`:
1. the share of users whose test (last) and validation (second to last) target differ between
   the true time order (ties: file order, as pipeline/preprocess.py) and RecBole's float32 order;
2. how predictable each split is to a model-free reference: a first-order Markov chain (next-item
   transition counts of the training prefixes, popularity as tie-break), full-ranking NDCG@10 with
   history items kept, on validation and test;
3. with `--recbole`, RecBole's SASRec on the file-order atomic file (bench/peer_recbole.py's
   protocol and runner, ML-1M batch 2048, seed 2020, capped at `--epochs` epochs): its validation
   curve and test metrics, to set beside peer.json's RecBole run on the warehouse's order.
   A finished RecBole run in `--workdir` is reused.

    .venv/bin/python bench/recbole_ml1m_order.py                 # 1 and 2: seconds
    .venv/bin/python bench/recbole_ml1m_order.py --recbole       # + RecBole, ~50 min on 2 cores

Writes bench/results/recbole-ml1m-order.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "bench"))  # after REPO: bench/trainer.py must not shadow trainer/

from pipeline.sources.recbole import INTER_HEADER  # noqa: E402
from trainer.paired import ndcg_at_k  # noqa: E402

RATINGS = REPO.parent / "shared" / "datasets" / "movielens-1m" / "ratings.dat"


def read_ratings(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, item, timestamp) of every line of ML-1M's `ratings.dat`, in file order."""
    rows = [line.split("::") for line in path.read_text().splitlines() if line]
    users = np.array([int(r[0]) for r in rows])
    items = np.array([int(r[1]) for r in rows])
    ts = np.array([int(r[3]) for r in rows])
    return users, items, ts


def recbole_order(users: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Row order after RecBole's sorts: by time, then by user (both stable)."""
    idx = np.argsort(key, kind="stable")
    return idx[np.argsort(users[idx], kind="stable")]


def sequences(users: np.ndarray, items: np.ndarray, order: np.ndarray) -> list[np.ndarray]:
    uu, ii = users[order], items[order]
    cuts = np.nonzero(np.diff(uu))[0] + 1
    return np.split(ii, cuts)


def markov_ndcg10(seqs: list[np.ndarray], n_items: int) -> dict[str, float]:
    """NDCG@10 of a first-order Markov chain fit on the training prefixes (all but the last two
    items), ranking all items, history kept; popularity breaks ties."""
    trans: dict[int, np.ndarray] = {}
    pop = np.zeros(n_items)
    for s in seqs:
        train = s[:-2]
        np.add.at(pop, train, 1)
        for a, b in zip(train[:-1], train[1:], strict=True):
            row = trans.setdefault(int(a), np.zeros(n_items))
            row[b] += 1
    out = {}
    for split, back in (("valid", 2), ("test", 1)):
        ranks = []
        for s in seqs:
            target, prev = s[-back], s[-back - 1]
            scores = trans.get(int(prev), np.zeros(n_items)) + pop / (pop.max() + 1)
            scores[0] = -np.inf
            ranks.append(int((scores > scores[target]).sum()))
        out[split] = round(float(ndcg_at_k(np.array(ranks)).mean()), 4)
    return out


def write_atomic(users: np.ndarray, items: np.ndarray, ts: np.ndarray, folder: Path) -> Path:
    """`ratings.dat` as a RecBole atomic file, in the file's own row order."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{folder.name}.inter"
    lines = [INTER_HEADER]
    lines += [f"{u}\t{i}\t{t}" for u, i, t in zip(users, items, ts, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratings", type=Path, default=RATINGS)
    ap.add_argument("--recbole", action="store_true", help="also run RecBole on the file order")
    ap.add_argument("--epochs", type=int, default=2, help="RecBole's epoch cap")
    ap.add_argument("--seed", type=int, default=2020)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--venv", type=Path, default=REPO / "bench" / ".recbole-venv")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / ".recbole-order")
    ap.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "recbole-ml1m-order.json"
    )
    args = ap.parse_args()
    users, items, ts = read_ratings(args.ratings)
    true_order = recbole_order(users, ts.astype(np.float64))  # exact seconds, file order on ties
    f32_order = recbole_order(users, ts.astype(np.float32))  # what RecBole's FloatTensor sorts
    a, b = sequences(users, items, true_order), sequences(users, items, f32_order)
    n_items = int(items.max()) + 1
    res: dict = {
        "ratings": str(args.ratings),
        "users": len(a),
        "interactions": int(len(users)),
        "distinct_seconds": int(len(np.unique(ts))),
        "distinct_float32_timestamps": int(len(np.unique(ts.astype(np.float32)))),
        "test_target_differs": round(
            float(np.mean([x[-1] != y[-1] for x, y in zip(a, b, strict=True)])), 4
        ),
        "valid_target_differs": round(
            float(np.mean([x[-2] != y[-2] for x, y in zip(a, b, strict=True)])), 4
        ),
        "markov1_ndcg10": {
            "true_time_order": markov_ndcg10(a, n_items),
            "recbole_float32_file_order": markov_ndcg10(b, n_items),
        },
    }
    print(json.dumps(res, indent=1), flush=True)
    if args.recbole:
        from peer_recbole import run_recbole

        atomic = args.workdir / "ml-1m-file-order"
        done = args.workdir / f"{atomic.name}.recbole.out.json"
        if done.is_file() and json.loads(done.read_text()).get("finished"):
            rb = json.loads(done.read_text())
            rb["test_ndcg10"] = rb["test"].get("ndcg@10")
            print(f"reusing the finished RecBole run in {done}")
        else:
            write_atomic(users, items, ts, atomic)
            rb = run_recbole("ml-1m", atomic, args.venv, args.threads, args.seed, args.epochs)
        res["recbole_sasrec_file_order"] = {
            "epoch_cap": args.epochs,
            "seed": args.seed,
            "curve": rb["curve"],
            "best_valid_ndcg10": rb["best_valid_ndcg10"],
            "test": rb["test"],
            "train_seconds": rb["train_seconds"],
        }
        print(json.dumps(res["recbole_sasrec_file_order"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
