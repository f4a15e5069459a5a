"""Top-k recommendations of a finished run: scored in batches of users after each user's whole
history, printed for one user or written to the `recommendations` table for many.

Every user's input is the last `max_len` items of their whole sequence (train, valid and test
items: the model recommends what comes next). Items the user already has are not ranked unless
`include_seen`. Writing replaces the run's rows of the users scored, in one transaction, so
rescoring every user (`msm4sr recommend --run R --all`) leaves exactly the new top-k of the run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from features import store
from features.store import WarehouseConfig, Write
from trainer.data import item_titles
from trainer.finished_runs import Loaded, load_run
from trainer.runlog import RunError


@dataclass
class Recommendation:
    item_id: str
    title: str | None
    score: float


@dataclass
class TopK:
    """Top-k items of a batch of users (dense indices of the run's SeqDataset)."""

    users: np.ndarray  # [U] user indices
    items: np.ndarray  # [U, k] item indices, best first; 0 where a user has fewer than k items
    scores: np.ndarray  # [U, k] float32; -inf where items is 0


@dataclass
class RecommendSummary:
    """What one `recommend_users` call wrote."""

    run_id: str
    dataset: str
    snapshot_id: int  # of the histories and features the run read
    n_users: int
    k: int
    n_rows: int  # rows of `recommendations` now held for these users
    seconds_load: float  # checkpoint + data
    seconds_score: float
    seconds_write: float
    warehouse_snapshot: int  # after the write

    @property
    def users_per_s(self) -> float:
        return self.n_users / self.seconds_score if self.seconds_score > 0 else 0.0


def user_index(ld: Loaded, users: list[str]) -> np.ndarray:
    """Dense indices of source user ids; a RunError names the unknown ones."""
    index = {u: i for i, u in enumerate(ld.data.user_ids)}
    missing = [u for u in users if str(u) not in index]
    if missing:
        raise RunError(
            f"users {missing[:5]} are not in dataset {ld.data.dataset!r} "
            f"(e.g. {ld.data.user_ids[:3]})"
        )
    return np.array([index[str(u)] for u in users], dtype=np.int64)


@torch.no_grad()
def top_k(
    ld: Loaded,
    users: np.ndarray,
    k: int,
    include_seen: bool = False,
    batch_size: int = 512,
    progress: bool = False,
) -> TopK:
    """Score all items for `users` in batches and keep each user's k best."""
    if k < 1:
        raise ValueError(f"k={k}: the number of items to recommend must be >= 1")
    data, model, dev = ld.data, ld.model, ld.device
    feats = {m: s.to(dev) for m, s in data.features.items()}
    tables = {m: t.float() for m, t in model.all_item_features(feats).items()}
    cands = model.candidates(tables).T  # [H', n_items + 1]
    kk = min(k, data.n_items)
    out_items = np.zeros((len(users), kk), dtype=np.int64)
    out_scores = np.full((len(users), kk), -np.inf, dtype=np.float32)
    starts, ends = data.offsets[users], data.offsets[users + 1]
    bar = tqdm(total=len(users), desc="recommend", unit="user", disable=not progress)
    for b0 in range(0, len(users), batch_size):
        s, e = starts[b0 : b0 + batch_size], ends[b0 : b0 + batch_size]
        n = len(s)
        lengths = np.minimum(e - s, data.max_len)
        # inputs [n, max_len]: the last `max_len` items of each sequence, left-aligned, 0-padded
        pos = np.arange(data.max_len)
        idx = (e - lengths)[:, None] + pos[None, :]
        valid = pos[None, :] < lengths[:, None]
        inputs = np.where(valid, data.items[np.where(valid, idx, 0)], 0)
        q = model.user_vectors(
            tables,
            torch.from_numpy(inputs).to(dev),
            torch.from_numpy(lengths).to(dev),
        )
        scores = (q @ cands).float()  # [n, n_items + 1]
        scores[:, 0] = float("-inf")  # padding
        if not include_seen:  # every item of the user's whole history
            rows = np.repeat(np.arange(n), e - s)
            cols = np.concatenate([data.items[a:z] for a, z in zip(s, e, strict=True)])
            scores[torch.from_numpy(rows).to(dev), torch.from_numpy(cols).to(dev)] = float("-inf")
        top = torch.topk(scores, kk, dim=1)
        out_scores[b0 : b0 + n] = top.values.cpu().numpy()
        out_items[b0 : b0 + n] = np.where(
            np.isfinite(out_scores[b0 : b0 + n]), top.indices.cpu().numpy(), 0
        )
        bar.update(n)
    bar.close()
    return TopK(users, out_items, out_scores)


def recommendation_rows(ld: Loaded, run_id: str, top: TopK) -> pl.DataFrame:
    """`top` as rows of the recommendations contract (a user's ranks 1.. over finite scores)."""
    n, kk = top.items.shape
    keep = np.isfinite(top.scores).ravel()
    item_ids = np.asarray(ld.data.item_ids, dtype=object)
    user_ids = np.asarray(ld.data.user_ids, dtype=object)
    body = pl.DataFrame(
        {
            "user_id": user_ids[np.repeat(top.users, kk)][keep].tolist(),
            "rank": np.tile(np.arange(1, kk + 1, dtype=np.int32), n)[keep],
            "item_id": item_ids[top.items.ravel()][keep].tolist(),
            "score": top.scores.ravel()[keep],
        },
        schema_overrides={"user_id": pl.String, "item_id": pl.String},
    )
    return body.select(
        pl.lit(run_id).alias("run_id"),
        pl.lit(ld.data.dataset).alias("dataset"),
        pl.all(),
        pl.lit(ld.data.snapshot, pl.Int64).alias("snapshot_id"),
    )


def recommend_users(
    run_id: str,
    users: list[str] | None = None,
    k: int = 50,
    wh: WarehouseConfig | None = None,
    include_seen: bool = False,
    batch_size: int = 512,
    progress: bool = False,
) -> RecommendSummary:
    """Top-k of `users` (None: every user of the run's dataset) by run `run_id`'s best model,
    written to `recommendations` in one transaction (the run's rows of these users replaced)."""
    t0 = time.perf_counter()
    ld = load_run(run_id, wh)
    idx = np.arange(ld.data.n_users, dtype=np.int64) if users is None else user_index(ld, users)
    if len(np.unique(idx)) != len(idx):
        raise RunError("a user is listed twice")
    t1 = time.perf_counter()
    top = top_k(ld, idx, k, include_seen, batch_size, progress)
    t2 = time.perf_counter()
    rows = recommendation_rows(ld, run_id, top)
    scored: dict[str, str | list[str]] = {"run_id": run_id}
    if users is not None:
        scored["user_id"] = [ld.data.user_ids[i] for i in idx]
    with store.connect(wh) as con:
        store.write(con, [Write("recommendations", rows, replace_where=scored)])
        snap = store.snapshot_id(con)
    t3 = time.perf_counter()
    return RecommendSummary(
        run_id=run_id,
        dataset=ld.data.dataset,
        snapshot_id=ld.data.snapshot,
        n_users=len(idx),
        k=k,
        n_rows=rows.height,
        seconds_load=round(t1 - t0, 3),
        seconds_score=round(t2 - t1, 3),
        seconds_write=round(t3 - t2, 3),
        warehouse_snapshot=snap,
    )


def recommend(
    run_id: str,
    user: str,
    k: int = 10,
    wh: WarehouseConfig | None = None,
    include_seen: bool = False,
) -> list[Recommendation]:
    """Top-k items for `user` after their whole history, scored by run `run_id`'s best model."""
    ld = load_run(run_id, wh)
    top = top_k(ld, user_index(ld, [str(user)]), k, include_seen)
    found = np.isfinite(top.scores[0])
    ids = [ld.data.item_ids[i] for i in top.items[0][found]]
    titles = item_titles(wh, ld.data.dataset, ld.data.snapshot, ids)
    return [
        Recommendation(i, titles.get(i), float(s))
        for i, s in zip(ids, top.scores[0][found].tolist(), strict=True)
    ]
