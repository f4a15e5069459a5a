"""Top-k recommendations of a finished run for a user."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from features.store import WarehouseConfig
from trainer.data import (
    item_titles,
)
from trainer.finished_runs import load_run
from trainer.runlog import RunError


@dataclass
class Recommendation:
    item_id: str
    title: str | None
    score: float


@torch.no_grad()
def recommend(
    run_id: str,
    user: str,
    k: int = 10,
    wh: WarehouseConfig | None = None,
    include_seen: bool = False,
) -> list[Recommendation]:
    """Top-k items for `user` after their whole history, scored by run `run_id`'s best model."""
    ld = load_run(run_id, wh)
    data = ld.data
    try:
        u = data.user_ids.index(str(user))
    except ValueError:
        raise RunError(
            f"user {user!r} is not in dataset {data.dataset!r} (e.g. {data.user_ids[:3]})"
        ) from None
    seq = data.user_items(u)
    inp = seq[-data.max_len :]
    inputs = torch.zeros(1, data.max_len, dtype=torch.long)
    inputs[0, : len(inp)] = torch.from_numpy(inp)
    feats = {m: s.to(ld.device) for m, s in data.features.items()}
    tables = {m: t.float() for m, t in ld.model.all_item_features(feats).items()}
    q = ld.model.user_vectors(
        tables, inputs.to(ld.device), torch.tensor([len(inp)], device=ld.device)
    )
    scores = (q @ ld.model.candidates(tables).T)[0].float().cpu()  # [n_items + 1]
    scores[0] = float("-inf")
    if not include_seen:
        scores[torch.from_numpy(seq)] = float("-inf")
    top = torch.topk(scores, min(k, int(torch.isfinite(scores).sum())))
    ids = [data.item_ids[i] for i in top.indices.tolist()]
    titles = item_titles(wh, data.dataset, data.snapshot, ids)
    return [
        Recommendation(i, titles.get(i), float(s))
        for i, s in zip(ids, top.values.tolist(), strict=True)
    ]
