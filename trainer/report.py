"""`msm4sr report`: the experiment matrix's numbers as reports/<name>/{report.md, metrics.csv, *.png}.

Every number is read back from the warehouse (`metrics` rows at epoch -1, the best epoch's final
evaluation) by run id; metrics.csv keeps the run id on every row, and report.md ends with the
table of run ids, so each cell is traceable to its `runs` row.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from features import store
from features.store import WarehouseConfig
from trainer.experiments import Budget, Cell
from trainer.paired import PairedRows
from trainer.runlog import RunError, git_commit, valid_curves

METRICS = ("NDCG@10", "NDCG@20", "Recall@10", "Recall@20")
POPULARITY = "Popularity"
# A cold / unseen subset with fewer test cases is shown but not judged (too noisy).
MIN_CASES = 100
# The report's claims (issues #6, #14): relative gains of MSM4SR on test, mean over seeds,
# judged on the field's metric (issue #14's "Done when"); Recall@10 is shown beside it.
JUDGED_METRIC = "NDCG@10"
TARGETS = (
    ("MSM4SR", "SASRec (ID)", "all", 0.15),
    ("MSM4SR", "Text-only pre-trained", "all", 0.05),
    ("MSM4SR", "SASRec (ID)", "cold", 0.20),
    ("MSM4SR inductive, 10% items held out", "SASRec (ID), 10% items held out", "unseen", 0.20),
)


@dataclass
class Row:
    dataset: str
    group: str
    model: str
    seed: int | None
    run_id: str
    split: str
    subset: str
    metric: str
    value: float


def collect(cells: list[Cell], wh: WarehouseConfig | None) -> list[Row]:
    """Final (epoch -1) valid / test metrics of every cell, plus the popularity reference.

    One run may stand for several rows (e.g. "Text-only pre-trained" and the ablation "text
    only" are the same configuration, trained once)."""
    runs: dict[str, list[tuple[str, str, str, int | None]]] = defaultdict(list)
    for c in cells:
        assert c.finetune_run is not None
        runs[c.finetune_run].append((c.dataset, c.variant.group, c.variant.name, c.seed))
        if c.variant.name in ("MSM4SR", "SASRec (ID), 10% items held out") and c.seed == min(
            x.seed for x in cells if x.dataset == c.dataset
        ):
            # Popularity depends on the split only: one reference per setting.
            name = POPULARITY if c.variant.group == "main" else f"{POPULARITY}, 10% items held out"
            runs[f"{c.finetune_run}-popularity"].append((c.dataset, c.variant.group, name, None))
    if not runs:
        return []
    with store.connect(wh, create=False, read_only=True) as con:
        got = store.query(
            con,
            "SELECT run_id, split, subset, metric, value FROM metrics "
            "WHERE epoch = -1 AND run_id IN (SELECT unnest(?::VARCHAR[])) ORDER BY ALL",
            [list(runs)],
        ).to_pylist()
    missing = set(runs) - {r["run_id"] for r in got}
    if missing:
        raise RuntimeError(f"no final metrics for run(s) {sorted(missing)}: did they finish?")
    # Pre-training time counts in a fine-tuned row's training time.
    pre_of = {c.finetune_run: c.pretrain_run for c in cells if c.pretrain_run}
    if pre_of:
        with store.connect(wh, create=False, read_only=True) as con:
            pre = store.query(
                con,
                "SELECT run_id, value FROM metrics WHERE epoch = -1 AND split = 'train' "
                "AND metric = 'train_seconds' AND run_id IN (SELECT unnest(?::VARCHAR[]))",
                [sorted(set(pre_of.values()))],
            ).to_pylist()
        pre_secs = {r["run_id"]: r["value"] for r in pre}
        got += [
            {
                "run_id": ft,
                "split": "train",
                "subset": "all",
                "metric": "pretrain_seconds",
                "value": pre_secs.get(p, 0.0),
            }
            for ft, p in pre_of.items()
            if ft in runs
        ]
    order = {c.variant.name: i for i, c in reversed(list(enumerate(cells)))}  # first appearance
    rows = [Row(*label, **r) for r in got for label in runs[r["run_id"]]]
    return sorted(rows, key=lambda r: order.get(r.model, -1))  # the matrix's row order


def _agg(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    mean = sum(values) / n
    sd = statistics.stdev(values) if n > 1 else 0.0
    return mean, sd, n


def summarise(rows: list[Row]) -> dict[tuple[str, str, str, str, str], tuple[float, float, int]]:
    """(dataset, model, split, subset, metric) -> (mean, std, n seeds)."""
    acc: dict[tuple[str, str, str, str, str], list[float]] = defaultdict(list)
    for r in rows:
        acc[(r.dataset, r.model, r.split, r.subset, r.metric)].append(r.value)
    return {k: _agg(v) for k, v in acc.items()}


def _fmt(cell: tuple[float, float, int] | None) -> str:
    if cell is None:
        return "–"
    mean, sd, n = cell
    return f"{mean:.4f} ± {sd:.4f}" if n > 1 else f"{mean:.4f}"


def _models(rows: list[Row], dataset: str, groups: Iterable[str]) -> list[str]:
    """Model names of `dataset` in `groups`, popularity first, then in the matrix's order."""
    seen: list[str] = []
    for r in sorted(rows, key=lambda r: not r.model.startswith(POPULARITY)):
        if r.dataset == dataset and r.group in groups and r.model not in seen:
            seen.append(r.model)
    return seen


def train_seconds(summary: dict, dataset: str, model: str) -> float | None:
    """Mean training seconds of a row's runs (pre-training included), None for popularity."""
    ft = summary.get((dataset, model, "train", "all", "train_seconds"))
    if ft is None:
        return None
    pre = summary.get((dataset, model, "train", "all", "pretrain_seconds"))
    return ft[0] + (pre[0] if pre else 0.0)


def _table(
    summary: dict, dataset: str, models: list[str], subset: str, extra_n: bool = False
) -> list[str]:
    head = ["model", *METRICS, "seeds", "best epoch", "train s"] + (["cases"] if extra_n else [])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        vals = [summary.get((dataset, m, "test", subset, k)) for k in METRICS]
        if all(v is None for v in vals):
            continue
        n = next(v[2] for v in vals if v is not None)
        best = summary.get((dataset, m, "train", "all", "best_epoch"))
        secs = train_seconds(summary, dataset, m)
        row = [
            m,
            *(_fmt(v) for v in vals),
            str(n),
            f"{best[0]:.0f}" if best else "–",
            f"{secs:.0f}" if secs is not None else "–",
        ]
        if extra_n:
            c = summary.get((dataset, m, "test", subset, "n_cases"))
            row.append(str(int(c[0])) if c else "0")
        out.append("| " + " | ".join(row) + " |")
    return out


def converged(summary: dict, dataset: str, model: str) -> bool:
    """A row's runs were trained to early stop: validation stopped improving before their last
    epoch (a run whose last epoch is its best was cut while still learning)."""
    best = summary.get((dataset, model, "train", "all", "best_epoch"))
    last = summary.get((dataset, model, "train", "all", "epochs"))
    return best is not None and last is not None and last[0] > best[0]


def runs_of(rows: list[Row]) -> dict[tuple[str, str], frozenset[str]]:
    """(dataset, model) -> the run ids behind that row."""
    acc: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in rows:
        acc[(r.dataset, r.model)].add(r.run_id)
    return {k: frozenset(v) for k, v in acc.items()}


def paired_intervals(
    rows: list[Row], datasets: list[str], wh: WarehouseConfig | None
) -> dict[tuple[str, str, str, str], str]:
    """(dataset, ours, ref, subset) -> the target's paired bootstrap interval, in words
    (trainer/paired.py), or why there is none; for every target whose two rows are there."""
    stored: dict[tuple[str, str], dict[str, dict[str, float]]] = defaultdict(dict)
    for r in rows:
        if r.split == "test" and r.metric == JUDGED_METRIC:
            stored[(r.dataset, r.model)].setdefault(r.run_id, {})[r.subset] = r.value
    paired = PairedRows(wh)
    out = {}
    for ds in datasets:
        for ours, ref, subset, _ in TARGETS:
            a, b = stored.get((ds, ours)), stored.get((ds, ref))
            if not a or not b or set(a) == set(b):
                continue
            if not all(subset in v for v in [*a.values(), *b.values()]):
                continue  # a subset with no cases
            if not any(v[subset] for v in [*a.values(), *b.values()]):
                out[(ds, ours, ref, subset)] = "no paired interval: both rows score 0"
                continue
            try:
                gain, low, high = paired.gain(a, b, subset)
            except RunError as e:
                text = f"no paired interval: {e}"
            else:
                text = (
                    f"paired 95% interval of the {JUDGED_METRIC} gain over test cases "
                    f"{low:+.1%} to {high:+.1%}"
                    if math.isfinite(gain)
                    else "no paired interval: the reference scores 0 on every case"
                )
            out[(ds, ours, ref, subset)] = text
    return out


def targets(
    summary: dict,
    datasets: list[str],
    runs: dict[tuple[str, str], frozenset[str]] | None = None,
    intervals: dict[tuple[str, str, str, str], str] | None = None,
) -> list[str]:
    """One line per claim and dataset: reached or not on JUDGED_METRIC, with the relative gains
    of NDCG@10 and Recall@10 (and, given `intervals`, the paired bootstrap interval of the
    gain). Two rows that are the same runs (MSM4SR and Text-only on a dataset without images)
    are not compared."""
    runs, intervals = runs or {}, intervals or {}
    lines = []
    for ds in datasets:
        for ours, ref, subset, need in TARGETS:
            gains = []
            for k in ("NDCG@10", "Recall@10"):
                a = summary.get((ds, ours, "test", subset, k))
                b = summary.get((ds, ref, "test", subset, k))
                if a is None or b is None:
                    continue
                if b[0] > 0:
                    gains.append((k, (a[0] - b[0]) / b[0], f"{a[0]:.4f} vs {b[0]:.4f}"))
                else:  # the reference scores 0: any hit is an infinite relative gain, none none
                    gains.append((k, math.inf if a[0] > 0 else math.nan, f"{a[0]:.4f} vs 0"))
            if not gains:
                lines.append(f"- {ds}, {subset}: {ours} vs {ref}: not measured")
                continue
            n = summary.get((ds, ours, "test", subset, "n_cases"))
            cases = f", {int(n[0])} test cases" if n else ""
            ok = all(g >= need for k, g, _ in gains if k == JUDGED_METRIC)
            detail = ", ".join(
                f"{k} {t} ({'no gain: both 0' if math.isnan(g) else format(g, '+.1%')})"
                for k, g, t in gains
            )
            untrained = [m for m in (ours, ref) if not converged(summary, ds, m)]
            mine, theirs = runs.get((ds, ours)), runs.get((ds, ref))
            if mine and mine == theirs:
                verdict = "not judged: the same runs (a dataset without images trains a text model)"
            elif JUDGED_METRIC not in {k for k, _, _ in gains}:
                verdict = f"not judged: no {JUDGED_METRIC}"
            elif untrained:
                verdict = f"not judged: {', '.join(untrained)} not trained to early stop"
            elif subset != "all" and (not n or n[0] < MIN_CASES):
                verdict = f"not judged: fewer than {MIN_CASES} test cases"
            else:
                verdict = f"**{'reached' if ok else 'NOT reached'}**"
            interval = intervals.get((ds, ours, ref, subset))
            lines.append(
                f"- {ds}, `{subset}` targets{cases}: {ours} vs {ref} (need >= {need:+.0%}): "
                f"{detail}: {verdict}" + (f"; {interval}" if interval else "")
            )
    return lines


def _plots(
    rows: list[Row],
    summary: dict,
    datasets: list[str],
    cells: list[Cell],
    out: Path,
    wh: WarehouseConfig | None,
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for ds in datasets:
        models = [
            m
            for m in _models(rows, ds, ("main", "ablation"))
            if summary.get((ds, m, "test", "all", "NDCG@10"))
        ]
        if not models:
            continue
        # Bar chart of test NDCG@10 (mean +- std over seeds).
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(models) + 1.2))
        vals = [summary[(ds, m, "test", "all", "NDCG@10")] for m in models]
        ax.barh(models, [v[0] for v in vals], xerr=[v[1] for v in vals], color="#4477aa")
        ax.invert_yaxis()
        ax.set_xlabel("test NDCG@10 (full ranking)")
        ax.set_title(f"{ds}: NDCG@10 per model")
        fig.tight_layout()
        name = f"ndcg10_{ds}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
        # Cold-start vs all.
        cold = [m for m in models if summary.get((ds, m, "test", "cold", "NDCG@10"))]
        if cold:
            fig, ax = plt.subplots(figsize=(8, 0.5 * len(cold) + 1.2))
            y = range(len(cold))
            ax.barh(
                [i - 0.2 for i in y],
                [summary[(ds, m, "test", "all", "NDCG@10")][0] for m in cold],
                0.4,
                label="all test cases",
            )
            ax.barh(
                [i + 0.2 for i in y],
                [summary[(ds, m, "test", "cold", "NDCG@10")][0] for m in cold],
                0.4,
                label="cold targets (<= 5 train interactions)",
            )
            ax.set_yticks(list(y), cold)
            ax.invert_yaxis()
            ax.set_xlabel("test NDCG@10")
            ax.set_title(f"{ds}: cold-start vs all")
            ax.legend(loc="best", fontsize=8)
            fig.tight_layout()
            name = f"cold_{ds}.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            files.append(name)
        # Time to quality: validation NDCG@10 against training seconds (pre-training included),
        # first seed of each main / ablation model.
        first: dict[str, Cell] = {}
        for c in cells:
            if c.dataset == ds and c.variant.name in models and c.variant.name not in first:
                first[c.variant.name] = c
        curves = valid_curves(
            [r for c in first.values() for r in (c.pretrain_run, c.finetune_run) if r], wh
        )
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for m, c in first.items():
            if not c.finetune_run:
                continue
            pre = curves[c.pretrain_run] if c.pretrain_run else []
            offset = pre[-1].get("seconds", 0.0) if pre else 0.0  # pre-training's time
            pts = [
                (offset + p["seconds"], p["valid_ndcg10"])
                for p in curves[c.finetune_run]
                if "seconds" in p
            ]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=m)
        ax.set_xscale("log")
        ax.set_xlabel("training seconds (pre-training + fine-tuning, validation included)")
        ax.set_ylabel("validation NDCG@10")
        ax.set_title(
            f"{ds}: time to quality (seed {min(c.seed for c in cells if c.dataset == ds)})"
        )
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"time_to_quality_{ds}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def _training_minutes(ids: list[str], wh: WarehouseConfig | None) -> float:
    """Sum of the runs' `train_seconds` (training + validation, as each row's `train s`; a run
    resumed in a later sitting does not count the time between its sittings)."""
    with store.connect(wh, create=False, read_only=True) as con:
        secs = con.execute(
            "SELECT coalesce(sum(value), 0) FROM metrics WHERE epoch = -1 AND split = 'train' "
            "AND subset = 'all' AND metric = 'train_seconds' "
            "AND run_id IN (SELECT unnest(?::VARCHAR[]))",
            [ids],
        ).fetchone()
    return float(secs[0]) / 60


def machine() -> str:
    return (
        f"{platform.platform()}, {os.cpu_count()} CPU threads, Python {platform.python_version()}"
    )


def write_report(
    name: str,
    datasets: list[str],
    cells: list[Cell],
    notes: list[str],
    budget: Budget,
    command: str,
    seconds: float,
    wh: WarehouseConfig | None = None,
    root: Path = Path("reports"),
) -> Path:
    """Write reports/<name>/{report.md, metrics.csv, *.png}; returns the report.md path."""
    commit = git_commit()  # before writing: re-writing a committed report is not a dirty tree
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(cells, wh)
    summary = summarise(rows)
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["dataset", "group", "model", "seed", "run_id", "split", "subset", "metric", "value"]
        )
        for r in rows:
            w.writerow(
                [
                    r.dataset,
                    r.group,
                    r.model,
                    r.seed,
                    r.run_id,
                    r.split,
                    r.subset,
                    r.metric,
                    f"{r.value:.6g}",
                ]
            )
    plots = _plots(rows, summary, datasets, cells, out, wh)
    run_ids = sorted({r for c in cells for r in (c.pretrain_run, c.finetune_run) if r})
    train_min = _training_minutes(run_ids, wh)

    md = [
        f"# Experiment report `{name}`",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine()}",
        f"- Finished: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, git {commit}, "
        f"wall time of this invocation {seconds / 60:.1f} min (reused runs cost nothing); "
        f"training time of all {len(run_ids)} "
        f"runs behind it {train_min:.0f} min (sum of their `train_seconds`)",
        f"- {budget.describe()}",
        "- Metrics: full ranking over all items, leave-one-out test split, best epoch by validation "
        "NDCG@10 (nothing is chosen on test); mean ± std over seeds. `best epoch` (of fine-tuning) "
        "and `train s` (training + validation seconds, pre-training included) are means over seeds.",
        f"- Targets are judged on test {JUDGED_METRIC} (Recall@10 shown beside it), only "
        f"between rows trained to early stop, never between two rows that are the same runs, "
        f"and on cold / unseen subsets only with >= {MIN_CASES} test cases (smaller ones are shown, not judged). "
        "Beside each: the gain's 95% interval from a paired bootstrap over the test cases (2,000 "
        "resamples of the users; each row's per-case NDCG@10 is its seeds' mean, re-ranked from "
        "the runs' best checkpoints): the seeds share one test item per user, so the ± over seeds "
        "does not say how much a gain depends on which items were held out.",
        "- Cold: test cases whose target has <= 5 training interactions. Held-out setting: 10% of "
        "the items are removed from every training sequence; `unseen` = test cases whose target "
        "is one of them, scored inductively (SASRec cannot score an unseen item).",
    ]
    md += [f"- Note: {n}" for n in notes]
    md += ["", "## Targets", ""]
    md += targets(summary, datasets, runs_of(rows), paired_intervals(rows, datasets, wh))
    for ds in datasets:
        md += ["", f"## {ds}", "", "### Main rows and ablations (test, all cases)", ""]
        md += _table(summary, ds, _models(rows, ds, ("main", "ablation")), "all")
        md += ["", "### Cold-start targets (test, <= 5 training interactions)", ""]
        md += _table(summary, ds, _models(rows, ds, ("main", "ablation")), "cold", extra_n=True)
        held = _models(rows, ds, ("cold-start",))
        if held:
            md += ["", "### 10% of items held out from training (test)", "", "All cases:", ""]
            md += _table(summary, ds, held, "all")
            md += ["", "Cases whose target is a held-out item (`unseen`):", ""]
            md += _table(summary, ds, held, "unseen", extra_n=True)
        cross = _models(rows, ds, ("cross-domain",))
        if cross:
            md += ["", "### Cross-domain (test, all cases)", ""]
            md += _table(summary, ds, [*cross, "MSM4SR, no pre-training", "MSM4SR"], "all")
        md += [""] + [f"![{p}]({p})" for p in plots if p.endswith(f"_{ds}.png")]
    md += [
        "",
        "## Runs",
        "",
        "| dataset | model | seed | fine-tune run | pre-train run |",
        "|---|---|---|---|---|",
    ]
    for c in cells:
        md.append(
            f"| {c.dataset} | {c.variant.name} | {c.seed} | `{c.finetune_run}` | `{c.pretrain_run or '–'}` |"
        )
    md += [
        "",
        "Query any number back: `msm4sr sql \"SELECT * FROM metrics WHERE run_id = '<run>' AND epoch = -1\"`.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
