"""The record of a run: its `runs` / `metrics` rows, the CSV beside its checkpoint, checkpoint
files (atomic writes, RNG state) and the result a finished stage returns.

Files: <checkpoint root>/<run_id>/{last.pt, best.pt, metrics.csv}.
"""

from __future__ import annotations

import csv
import os
import random
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from features import store
from features.contract import METRICS, RUNS
from features.store import REPO_ROOT, WarehouseConfig
from trainer import distributed as ddp  # DDP hooks (torchrun); identity on one process
from trainer.config import Config

Metrics = dict[str, dict[str, float]]  # subset -> metric -> value


class RunError(RuntimeError):
    """A run cannot start or continue; the message names the run or file."""


def git_commit() -> str:
    """HEAD of the repository (+ "-dirty" with uncommitted tracked changes), or "unknown"."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("-dirty" if dirty else "")) if head else "unknown"


def checkpoint_root(cfg: Config, wh: WarehouseConfig | None) -> Path:
    if cfg.runtime.checkpoint_dir:
        return Path(cfg.runtime.checkpoint_dir)
    return Path((wh or WarehouseConfig()).root) / "checkpoints"


def atomic_save(obj: Any, path: Path) -> None:
    if not ddp.is_main():  # DDP hook: rank 0 alone writes checkpoints
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


class RunLog:
    """The run's `runs` row, its `metrics` rows and the CSV beside the checkpoint."""

    CSV_FIELDS = ("run_id", "epoch", "split", "subset", "metric", "value")

    def __init__(
        self, wh: WarehouseConfig | None, row: dict[str, Any], csv_path: Path | None
    ) -> None:
        self.wh, self.row, self.csv_path = wh, row, csv_path
        self.history: list[dict[str, Any]] = []

    def write_run(self, **changes: Any) -> None:
        self.row.update(changes)
        if not ddp.is_main():  # DDP hook: rank 0 alone writes rows
            return
        with store.connect(self.wh) as con:
            store.upsert(con, RUNS.name, pa.Table.from_pylist([self.row], schema=RUNS.schema))

    def log(self, epoch: int, splits: dict[str, Metrics], **run_changes: Any) -> None:
        """Metrics of one epoch ({split: {subset: {metric: value}}}), in one warehouse connection;
        `run_changes` also updates the runs row (e.g. status) in the same connection."""
        rows = [
            {
                "run_id": self.row["run_id"],
                "epoch": epoch,
                "split": split,
                "subset": subset,
                "metric": k,
                "value": float(v),
            }
            for split, per in splits.items()
            for subset, ms in per.items()
            for k, v in ms.items()
        ]
        # A resumed epoch replaces what a killed attempt may have logged for it.
        keys = {(r["epoch"], r["split"], r["subset"], r["metric"]) for r in rows}
        self.history = [
            h
            for h in self.history
            if (h["epoch"], h["split"], h["subset"], h["metric"]) not in keys
        ]
        self.history.extend(rows)
        self.row.update(run_changes)
        if not ddp.is_main():  # DDP hook: rank 0 alone writes rows and the CSV
            return
        with store.connect(self.wh) as con:
            if rows:
                store.upsert(con, METRICS.name, pa.Table.from_pylist(rows, schema=METRICS.schema))
            if run_changes:
                store.upsert(con, RUNS.name, pa.Table.from_pylist([self.row], schema=RUNS.schema))
        self.write_csv()

    def write_csv(self) -> None:
        if self.csv_path is None:
            return
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.CSV_FIELDS)
            w.writeheader()
            w.writerows(self.history)
        os.replace(tmp, self.csv_path)


@dataclass
class RunResult:
    run_id: str
    kind: str
    checkpoint_dir: Path
    best_epoch: int
    best_valid: float
    epochs_run: int
    valid: Metrics = field(default_factory=dict)
    test: Metrics = field(default_factory=dict)
    popularity: dict[str, Metrics] = field(default_factory=dict)  # split -> subset -> metric
    model: str = ""  # the model's true name (trainer.trainer.model_name)
    seconds: float = 0.0  # wall seconds of training + validation (all epochs, resumes included)


def load_checkpoint(
    run_id: str, cfg: Config, wh: WarehouseConfig | None, name: str = "best.pt"
) -> dict[str, Any]:
    path = checkpoint_root(cfg, wh) / run_id / name
    if not path.is_file():
        raise RunError(f"run {run_id!r} has no checkpoint {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def valid_curves(
    run_ids: list[str], wh: WarehouseConfig | None
) -> dict[str, list[dict[str, float]]]:
    """Runs' learning curves read back from `metrics` in one query, epoch by epoch:
    {run_id: [{"epoch", "seconds", "valid_ndcg10"}, ...]}, seconds being training + validation
    since the run began (absent for an epoch without an elapsed_seconds row). A run without any
    validation row maps to []. What time-to-quality benches and plots are drawn from."""
    if not run_ids:
        return {}
    with store.connect(wh, create=False, read_only=True) as con:
        rows = store.query(
            con,
            "SELECT run_id, epoch, metric, value FROM metrics "
            "WHERE run_id IN (SELECT unnest(?::VARCHAR[])) AND subset = 'all' AND epoch > 0 "
            "AND ((split = 'train' AND metric = 'elapsed_seconds') OR "
            "(split = 'valid' AND metric = 'NDCG@10'))",
            [list(run_ids)],
        ).to_pylist()
    per: dict[str, dict[int, dict[str, float]]] = {r: {} for r in run_ids}
    for r in rows:
        key = "seconds" if r["metric"] == "elapsed_seconds" else "valid_ndcg10"
        per[r["run_id"]].setdefault(r["epoch"], {})[key] = r["value"]
    keys = ("seconds", "valid_ndcg10")  # one key order, whatever order the rows came in
    return {
        run: [
            {"epoch": e, **{k: ep[e][k] for k in keys if k in ep[e]}}
            for e in sorted(ep)
            if "valid_ndcg10" in ep[e]
        ]
        for run, ep in per.items()
    }


def valid_curve(run_id: str, wh: WarehouseConfig | None) -> list[dict[str, float]]:
    """One run's learning curve: `valid_curves` of one run."""
    return valid_curves([run_id], wh)[run_id]
