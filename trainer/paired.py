"""Paired comparison of two report rows on the same test cases: a bootstrap over the cases.

A row's seeds share one validation and one test item per user, so its "mean ± std over seeds"
measures training noise only, not how much a gain depends on which items the users happen to
have last. Here each run's best checkpoint ranks the test cases again (checked against the
metric the run stored), a row's per-case NDCG@10 is the mean over its runs, and the relative
gain mean(ours) / mean(ref) - 1 is recomputed on `n_boot` resamples of the cases drawn with
replacement; the 2.5th and 97.5th percentiles are its 95% interval. Both rows are resampled
together (the same cases), so what two models share (hard users, easy items) cancels out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features.store import WarehouseConfig
from trainer.data import eval_cases
from trainer.evaluation import rank_cases, subset_masks
from trainer.finished_runs import load_run
from trainer.runlog import RunError

K = 10
# |recomputed - stored| NDCG@10 above this: the checkpoint is not the run that was evaluated.
REPRODUCE_TOL = 1e-4


@dataclass(frozen=True)
class CaseNdcg:
    """Per-case NDCG@K of one run on a split, with the cases' identity and subset masks."""

    users: np.ndarray  # user indices of the run's data
    user_ids: np.ndarray  # the same users' source ids (strings): match cases across systems
    targets: np.ndarray
    masks: dict[str, np.ndarray]  # "all", "cold", "unseen"
    ndcg: np.ndarray


def ndcg_at_k(ranks: np.ndarray) -> np.ndarray:
    """Per-case NDCG@K of 0-based ranks of the one relevant item (what metrics_from_ranks means)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks < K, 1.0 / np.log2(ranks + 2.0), 0.0)


def case_ndcg(run_id: str, wh: WarehouseConfig | None, split: str = "test") -> CaseNdcg:
    """Rank `split`'s cases with run `run_id`'s best checkpoint (RunError when it is missing)."""
    ld = load_run(run_id, wh)
    feats = {m: s.to(ld.device) for m, s in ld.data.features.items()}
    cases = eval_cases(ld.data, split)
    ranks = rank_cases(ld.model, feats, ld.data, cases, ld.cfg, ld.device).astype(np.float64)
    masks = {"all": np.ones(len(cases), dtype=bool)}
    masks |= subset_masks(cases, ld.data.train_counts(), ld.cfg)
    ndcg = ndcg_at_k(ranks)
    user_ids = np.asarray(ld.data.user_ids, dtype=object)[cases.users]
    return CaseNdcg(cases.users, user_ids, cases.targets, masks, ndcg)


def bootstrap_gain(
    ours: np.ndarray, ref: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(gain, low, high): mean(ours) / mean(ref) - 1 over paired cases and its 95% percentile
    interval over `n_boot` resamples of the cases (inf where a resample's reference is 0)."""
    if ours.shape != ref.shape or ours.ndim != 1 or len(ours) == 0:
        raise ValueError(f"paired cases needed, got shapes {ours.shape} and {ref.shape}")
    rng = np.random.default_rng(seed)
    n = len(ours)
    gains = np.empty(n_boot)
    for s in range(0, n_boot, 256):  # resamples in blocks: [block, n] indices at a time
        idx = rng.integers(0, n, size=(min(256, n_boot - s), n))
        a, b = ours[idx].mean(1), ref[idx].mean(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            gains[s : s + len(idx)] = np.where(b > 0, a / b - 1, np.where(a > 0, np.inf, 0.0))
    b = ref.mean()
    point = ours.mean() / b - 1 if b > 0 else (np.inf if ours.mean() > 0 else 0.0)
    # Order statistics, no interpolation: a resample whose reference is 0 gains inf.
    low = np.percentile(gains, 2.5, method="lower")
    high = np.percentile(gains, 97.5, method="higher")
    return float(point), float(low), float(high)


class PairedRows:
    """Per-case NDCG@K of report rows (the mean over each row's runs), computed once a run."""

    def __init__(self, wh: WarehouseConfig | None) -> None:
        self.wh = wh
        self._runs: dict[str, CaseNdcg] = {}

    def _run(self, run_id: str, stored: dict[str, float]) -> CaseNdcg:
        if run_id not in self._runs:
            got = case_ndcg(run_id, self.wh)
            for subset, value in stored.items():
                mine = got.ndcg[got.masks[subset]]
                recomputed = float(mine.mean()) if len(mine) else 0.0
                if abs(recomputed - value) > REPRODUCE_TOL:
                    raise RunError(
                        f"run {run_id!r}'s checkpoint gives test NDCG@{K} {recomputed:.4f} on "
                        f"{subset!r}, its stored metric is {value:.4f}"
                    )
            self._runs[run_id] = got
        return self._runs[run_id]

    def gain(
        self,
        ours: dict[str, dict[str, float]],
        ref: dict[str, dict[str, float]],
        subset: str,
    ) -> tuple[float, float, float]:
        """The paired bootstrap gain of row `ours` over row `ref` on `subset`; each row is
        {run id: {subset: its stored test NDCG@K}}. Raises RunError when a checkpoint is
        missing, does not reproduce its stored metric, or the rows' test cases differ."""
        a = [self._run(r, s) for r, s in sorted(ours.items())]
        b = [self._run(r, s) for r, s in sorted(ref.items())]
        first = a[0]
        for x in a[1:] + b:
            if not (
                np.array_equal(x.users, first.users) and np.array_equal(x.targets, first.targets)
            ):
                raise RunError("the two rows' runs were tested on different cases")
        mask = first.masks[subset]
        mean_a = np.mean([x.ndcg[mask] for x in a], axis=0)
        mean_b = np.mean([x.ndcg[mask] for x in b], axis=0)
        return bootstrap_gain(mean_a, mean_b)
