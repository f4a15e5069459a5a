"""Early-stopping patience read off finished runs: best validation score and epochs at patience P.

A run's lr schedule (constant, or x`lr_decay` after every `decay_patience` epochs without a better
validation score) does not depend on the early-stopping patience, so a run logged with patience
10 holds, epoch for epoch, the run that patience P < 10 would have trained up to its stop: cut
its validation curve at the first epoch ending P epochs in a row without a better score. This
bench does that for groups of finished fine-tuning runs (validation NDCG@10 from the `metrics`
table, nothing else trained, test never read) and prints, per group and patience, the best
validation NDCG@10 of each run, their mean, and the epochs each run would have trained.
`--min-delta D ...` reads off the trainer's `min_delta` (0 by default): an epoch resets the patience
only if it beats the last epoch that did by more than D (relative), so a curve that creeps up by
tiny gains after its lr halvings stops sooner; it never stops later, so it too is read off the
curve. `--trained LOGGED SHORTER` checks the reading against a run actually trained with a
smaller patience or a min_delta (else the same config): its curve must be the logged one cut at
the predicted stop.

    .venv/bin/python bench/stop_rule.py --warehouse W --group "SASRec constant" RUN RUN ... \
        --group "SASRec x0.5 after 2" RUN RUN ...

Writes bench/results/stop-rule.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from features import store  # noqa: E402
from features.store import WarehouseConfig  # noqa: E402
from trainer.runlog import valid_curves  # noqa: E402


def stop(
    curve: list[tuple[int, float]], patience: int, min_delta: float = 0.0
) -> tuple[float, int, int]:
    """(best score, its epoch, the epoch training stops at) under `patience`: stop after
    `patience` epochs in a row that do not beat, by more than `min_delta` (relative), the score of
    the last epoch that did. The best score and its epoch are the best of all epochs up to the
    stop (what the checkpoint keeps). With min_delta 0 this is the trainer's rule; with more it
    stops no later (every epoch it counts as better is better than the best so far), so it is
    still exactly the shorter run of a logged curve."""
    best, best_epoch, ref, bad = float("-inf"), 0, float("-inf"), 0
    for epoch, score in curve:
        if score > best:
            best, best_epoch = score, epoch
        if score > ref * (1 + min_delta):  # ref starts at -inf: the first epoch counts
            ref, bad = score, 0
        else:
            bad += 1
            if bad >= patience:
                return best, best_epoch, epoch
    return best, best_epoch, curve[-1][0]


def curves_of(
    run_ids: list[str], wh: WarehouseConfig
) -> dict[str, tuple[list[tuple[int, float]], int]]:
    """{run: (validation NDCG@10 per epoch, the patience the run was trained with)}, read in two
    queries whatever the number of runs."""
    with store.connect(wh, create=False, read_only=True) as con:
        rows = con.execute(
            "SELECT run_id, config FROM runs WHERE run_id IN (SELECT unnest(?::VARCHAR[]))",
            [run_ids],
        ).fetchall()
    stopping = {r: _stopping(json.loads(c)["finetune"]) for r, c in rows}
    missing = [r for r in run_ids if r not in stopping]
    if missing:
        raise SystemExit(f"no run {missing[0]!r} in this warehouse")
    curves = valid_curves(run_ids, wh)
    return {
        r: ([(int(c["epoch"]), c["valid_ndcg10"]) for c in curves[r]], *stopping[r])
        for r in run_ids
    }


def _stopping(finetune: dict) -> tuple[int, float]:
    """(patience, min_delta) a run was trained with (min_delta 0 before it existed)."""
    return int(finetune["patience"]), float(finetune.get("min_delta", 0.0))


def check_trained(
    logged: tuple[list[tuple[int, float]], int, float],
    shorter: tuple[list[tuple[int, float]], int, float],
) -> dict:
    """Does a run trained with (patience, min_delta) hold the logged curve cut where `stop` says?"""
    curve, patience, min_delta = shorter
    best, best_epoch, stop_epoch = stop(logged[0], patience, min_delta)
    want = [(e, v) for e, v in logged[0] if e <= stop_epoch]
    return {
        "patience": patience,
        "min_delta": min_delta,
        "predicted": {"best": round(best, 4), "best_epoch": best_epoch, "epochs": stop_epoch},
        "trained_epochs": len(curve),
        "curve_is_the_cut_logged_curve": curve == want,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--warehouse", type=Path, default=None)
    ap.add_argument(
        "--group",
        nargs="+",
        action="append",
        required=True,
        metavar=("NAME", "RUN"),
        help="a group's name, then its fine-tuning run ids",
    )
    ap.add_argument("--patience", type=int, nargs="+", default=[10, 5, 3])
    ap.add_argument(
        "--min-delta",
        type=float,
        nargs="+",
        default=[0.0],
        help="relative gains an epoch must exceed to reset the patience (0: any gain)",
    )
    ap.add_argument(
        "--trained",
        nargs=2,
        action="append",
        default=[],
        metavar=("LOGGED", "SHORTER"),
        help="a logged run and one trained with a smaller patience or a min_delta (checked)",
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "stop-rule.json")
    args = ap.parse_args()
    wh = WarehouseConfig(root=args.warehouse) if args.warehouse else WarehouseConfig()
    if any(d < 0 for d in args.min_delta):
        raise SystemExit("--min-delta must be >= 0")
    res: dict = {"patience": args.patience, "min_delta": args.min_delta, "groups": {}}
    wanted = [r for _, *runs in args.group for r in runs] + [
        r for pair in args.trained for r in pair
    ]
    every = curves_of(list(dict.fromkeys(wanted)), wh)
    for name, *runs in args.group:
        curves = {r: every[r] for r in runs}
        group: dict = {"runs": runs}
        for p in args.patience:
            too_long = [r for r, (_, trained, _) in curves.items() if p > trained]
            if too_long:
                raise SystemExit(f"{too_long} trained with a patience below {p}")
            for d in args.min_delta:
                stops = [stop(c, p, d) for c, _, _ in curves.values()]
                best = [round(s[0], 4) for s in stops]
                key = f"patience_{p}" + (f"_min_delta_{d:g}" if d else "")
                g = group[key] = {
                    "best_valid_ndcg10": best,
                    "mean": round(sum(best) / len(best), 4),
                    "best_epoch": [s[1] for s in stops],
                    "epochs_trained": [s[2] for s in stops],
                    "epochs_total": sum(s[2] for s in stops),
                }
                print(
                    f"{name:28s} patience {p:2d} min_delta {d:<6g}: best valid NDCG@10 {best} "
                    f"mean {g['mean']:.4f}, epochs {g['epochs_trained']} "
                    f"(total {g['epochs_total']})"
                )
        res["groups"][name] = group
    if args.trained:
        res["trained"] = {}
    for logged, shorter in args.trained:
        chk = res["trained"][shorter] = {
            "logged": logged,
            **check_trained(every[logged], every[shorter]),
        }
        print(
            f"{shorter} (patience {chk['patience']}, min_delta {chk['min_delta']:g}): "
            f"{chk['trained_epochs']} epochs, predicted from {logged} {chk['predicted']}; "
            f"its curve is the logged one cut there: {chk['curve_is_the_cut_logged_curve']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
