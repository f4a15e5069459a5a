"""Full-ranking evaluation: Recall / NDCG / MRR at k over ALL items (PAPER.md section 5).

Ranking and ties: items are ordered by score, descending, and equal scores by item index,
ascending (a stable sort). The rank of the target (0 = first) is therefore
    #{items with a higher score} + #{items with the same score and a smaller index}.
This is deterministic and reproducible by a brute-force stable sort; it neither favours nor
penalises a model systematically (a tie is won against higher indices, lost against lower ones).
Padding (index 0) is never ranked. With `exclude_history`, the user's earlier items are removed
(the target itself is always kept).

Memory: scores are computed `user_batch` x `item_chunk` at a time. When the catalogue spans more
than one chunk, a first pass reads each target's score from the same matrix product that scores
the other items (so an exact tie stays an exact tie), and a second pass counts.

Recall@k = [rank < k] (one target: Recall = Hit), NDCG@k = [rank < k] / log2(rank + 2),
MRR@k = [rank < k] / (rank + 1), each averaged over cases.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def rank_targets(
    queries: torch.Tensor,
    candidates: Callable[[int, int], torch.Tensor],
    n_items: int,
    targets: torch.Tensor,
    item_chunk: int = 65536,
    history: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """0-based rank of each target among items 1..n_items under score = query . candidate.

    Args:
        queries: [B, D] one row per case.
        candidates: f(start, end) -> [end - start, D] candidate vectors of items start..end-1
            (item indices, 1-based; called in chunks).
        n_items: number of real items (indices 1..n_items).
        targets: [B] target item of each case.
        history: optional per-case 1-d tensors of items to exclude (the target is kept).
    Returns:
        [B] int64 ranks.
    """
    B = queries.shape[0]
    dev = queries.device
    targets = targets.to(dev)
    chunks = [(s, min(s + item_chunk, n_items + 1)) for s in range(1, n_items + 1, item_chunk)]
    excl = None
    if history is not None:
        rows = torch.cat(
            [torch.full((len(h),), i, dtype=torch.long) for i, h in enumerate(history)]
        )
        cols = torch.cat([h.long().cpu() for h in history])
        keep = cols != targets.cpu()[rows]
        excl = (rows[keep].to(dev), cols[keep].to(dev))

    def scores(s: int, e: int) -> torch.Tensor:
        sc = queries @ candidates(s, e).T  # [B, e - s]
        if sc.dtype in (torch.float16, torch.bfloat16):
            sc = sc.float()
        if excl is not None:
            r, c = excl
            sel = (c >= s) & (c < e)
            sc[r[sel], c[sel] - s] = float("-inf")
        return sc

    # Pass 1 (only when there are several chunks): each target's score from its own chunk.
    t_score = torch.empty(
        B, device=dev, dtype=queries.dtype if queries.dtype == torch.float64 else torch.float32
    )
    if len(chunks) == 1:
        cached = scores(*chunks[0])
        t_score = cached.gather(1, (targets - chunks[0][0])[:, None]).squeeze(1)
    else:
        cached = None
        for s, e in chunks:
            inside = (targets >= s) & (targets < e)
            if inside.any():
                sc = scores(s, e)
                t_score[inside] = sc[inside].gather(1, (targets[inside] - s)[:, None]).squeeze(1)
    rank = torch.zeros(B, dtype=torch.long, device=dev)
    for s, e in chunks:
        sc = cached if cached is not None else scores(s, e)
        idx = torch.arange(s, e, device=dev)[None, :]
        ahead = (sc > t_score[:, None]) | ((sc == t_score[:, None]) & (idx < targets[:, None]))
        rank += ahead.sum(1)
    return rank


def metrics_from_ranks(
    ranks: np.ndarray | torch.Tensor, ks: tuple[int, ...] = (5, 10, 20, 50)
) -> dict[str, float]:
    """Recall / NDCG / MRR at each k, averaged over the cases of `ranks` (0-based)."""
    r = torch.as_tensor(ranks, dtype=torch.float64)
    out: dict[str, float] = {}
    if r.numel() == 0:
        return out
    for k in ks:
        hit = (r < k).double()
        out[f"Recall@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float((hit / torch.log2(r + 2)).mean())
        out[f"MRR@{k}"] = float((hit / (r + 1)).mean())
    return out


def popularity_ranks(
    counts: np.ndarray,
    targets: np.ndarray,
    item_chunk: int = 65536,
    history: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Ranks under the popularity reference: score = train interactions of the item."""
    n = len(counts) - 1
    cand = torch.as_tensor(counts, dtype=torch.float64)[:, None]  # [n + 1, 1]
    q = torch.ones(len(targets), 1, dtype=torch.float64)
    return rank_targets(
        q,
        lambda s, e: cand[s:e],
        n,
        torch.as_tensor(targets, dtype=torch.long),
        item_chunk,
        history,
    )
