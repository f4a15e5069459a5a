"""Full-ranking metrics against a brute-force stable sort, with ties, chunks and exclusions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.evaluate import metrics_from_ranks, popularity_ranks, rank_targets


def brute_rank(scores: np.ndarray, target: int, excluded: set[int] = frozenset()) -> int:
    """Sort items 1..n by (score desc, index asc), the documented tie rule; position of target."""
    items = [i for i in range(1, len(scores)) if i == target or i not in excluded]
    order = sorted(items, key=lambda i: (-scores[i], i))
    return order.index(target)


def brute_metrics(ranks: list[int], ks: tuple[int, ...]) -> dict[str, float]:
    out = {}
    for k in ks:
        out[f"Recall@{k}"] = float(np.mean([r < k for r in ranks]))
        out[f"NDCG@{k}"] = float(np.mean([1 / math.log2(r + 2) if r < k else 0.0 for r in ranks]))
        out[f"MRR@{k}"] = float(np.mean([1 / (r + 1) if r < k else 0.0 for r in ranks]))
    return out


@pytest.mark.parametrize("item_chunk", [1000, 7, 1])  # one chunk, several chunks (two passes)
def test_ranks_match_brute_force_with_ties(item_chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    n, B, D = 40, 25, 3
    # Small integer vectors: many exact score ties.
    q = torch.randint(-2, 3, (B, D), generator=g).float()
    cand = torch.randint(-2, 3, (n + 1, D), generator=g).float()
    targets = torch.randint(1, n + 1, (B,), generator=g)
    ranks = rank_targets(q, lambda s, e: cand[s:e], n, targets, item_chunk)
    scores = (q @ cand.T).numpy()
    want = [brute_rank(scores[b], int(targets[b])) for b in range(B)]
    assert ranks.tolist() == want
    n_ties = sum(int((scores[b][1:] == scores[b][int(targets[b])]).sum()) - 1 for b in range(B))
    assert n_ties > 0  # the case really has ties
    ks = (5, 10, 20, 50)
    got = metrics_from_ranks(ranks, ks)
    for k, v in brute_metrics(want, ks).items():
        assert got[k] == pytest.approx(v, abs=1e-12)


def test_exclude_history_removes_items_but_keeps_target() -> None:
    g = torch.Generator().manual_seed(1)
    n, B = 30, 6
    q = torch.randn(B, 4, generator=g)
    cand = torch.randn(n + 1, 4, generator=g)
    targets = torch.randint(1, n + 1, (B,), generator=g)
    history = [torch.randint(1, n + 1, (5,), generator=g) for _ in range(B)]
    history[0] = torch.cat([history[0], targets[:1]])  # the target itself is never excluded
    ranks = rank_targets(q, lambda s, e: cand[s:e], n, targets, 8, history)
    scores = (q @ cand.T).numpy()
    want = [brute_rank(scores[b], int(targets[b]), set(history[b].tolist())) for b in range(B)]
    assert ranks.tolist() == want
    plain = rank_targets(q, lambda s, e: cand[s:e], n, targets, 8)
    assert (ranks <= plain).all() and (ranks < plain).any()


def test_metrics_by_hand() -> None:
    # ranks 0, 3, 60: Recall@5 = 2/3, NDCG@5 = (1 + 1/log2(5)) / 3, MRR@5 = (1 + 1/4) / 3.
    m = metrics_from_ranks(np.array([0, 3, 60]), (5, 50))
    assert m["Recall@5"] == pytest.approx(2 / 3)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(5)) / 3)
    assert m["MRR@5"] == pytest.approx((1 + 0.25) / 3)
    assert m["Recall@50"] == pytest.approx(2 / 3)


def test_popularity_ranks_with_ties_by_index() -> None:
    counts = np.array([0, 5, 9, 5, 1, 9])  # items 2 and 5 tie at the top, 1 and 3 next
    ranks = popularity_ranks(counts, np.array([5, 2, 3, 1, 4]), item_chunk=2)
    assert ranks.tolist() == [1, 0, 3, 2, 4]
