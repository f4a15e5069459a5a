"""The experiment matrix of the report: baselines, ablations, cold-start and cross-domain runs.

Every cell is an ordinary pre-training / fine-tuning run of trainer.loop (same split, batches,
early stopping on validation Recall@20 and full-ranking metrics), so every number of the report
is a `runs` row with its `metrics` rows. A run's id is derived from its resolved configuration
(dataset, feature versions, seed, every hyper-parameter, the pre-training run it starts from), so a
second `msm4sr report` reuses finished runs, resumes a killed one from its last checkpoint and
trains only what is missing; a changed budget gives new ids.

Budgets: "cpu" fits ML-1M + Amazon Office in about two hours on 2 cores (few epochs, 3 seeds for
the main rows only, the fine-tune lr raised to 1e-3 from the paper's grid); "full" is the paper's
schedule (300 epochs, patience 20, 3 seeds everywhere) for a GPU. Nothing is chosen on test.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from features import store
from features.store import WarehouseConfig
from trainer.config import Config, merge
from trainer.data import latest_version
from trainer.loop import RunResult, checkpoint_root, finetune, pretrain

log = logging.getLogger(__name__)

GROUPS = ("main", "ablation", "cold-start", "cross-domain")


@dataclass(frozen=True)
class Variant:
    """One row of the report: what differs from the default MSM4SR configuration."""

    name: str
    group: str
    # Config overrides of both stages ({"model": {...}, "data": {...}}).
    common: dict[str, Any] = field(default_factory=dict)
    # Pre-training overrides ({"pretrain": {...}}); None = no pre-training stage.
    pretrain: dict[str, Any] | None = field(default_factory=dict)
    # Fine-tuning overrides ({"finetune": {...}, "model": {...}}).
    finetune: dict[str, Any] = field(default_factory=dict)
    # Cross-domain: pre-train on this other dataset (with its MSM4SR configuration).
    pretrain_on: str | None = None
    # Needs image features (skipped, with a note, on a text-only dataset).
    needs_images: bool = False
    # Runs with the main seeds (all of the budget's seeds) or only the budget's first seed(s).
    main_seeds: bool = False


SASREC = {"model": {"arch": "sasrec", "hidden_dropout": 0.5, "attn_dropout": 0.5}}
NO_WD_LR3 = {"finetune": {"lr": 1e-3, "weight_decay": 0.0}}
INDUCTIVE = {"finetune": {"transductive": False}}
HOLDOUT = {"data": {"holdout_items": 0.1}}


def variants(other: str | None) -> list[Variant]:
    """The matrix for one dataset; `other` = the dataset of the cross-domain rows (or None)."""
    rows = [
        Variant(
            "SASRec (ID)", "main", pretrain=None, finetune=_deep(SASREC, NO_WD_LR3), main_seeds=True
        ),
        Variant(
            "Text-only pre-trained",
            "main",
            common={"model": {"modalities": "text"}},
            main_seeds=True,
        ),
        Variant("MSM4SR, no pre-training", "main", pretrain=None, main_seeds=True),
        Variant("MSM4SR", "main", main_seeds=True),
        Variant("no mixup", "ablation", common={"model": {"mixup": False}}, needs_images=True),
        Variant("no CMCL", "ablation", pretrain={"pretrain": {"cmcl": False}}, needs_images=True),
        Variant(
            "no NIP-image",
            "ablation",
            pretrain={"pretrain": {"nip_image": False}},
            needs_images=True,
        ),
        Variant("text only", "ablation", common={"model": {"modalities": "text"}}),
        Variant(
            "image only", "ablation", common={"model": {"modalities": "image"}}, needs_images=True
        ),
        Variant("inductive fine-tuning", "ablation", finetune=INDUCTIVE),
        Variant(
            "SASRec (ID), 10% items held out",
            "cold-start",
            common=HOLDOUT,
            pretrain=None,
            finetune=_deep(SASREC, NO_WD_LR3),
        ),
        Variant(
            "MSM4SR inductive, 10% items held out", "cold-start", common=HOLDOUT, finetune=INDUCTIVE
        ),
    ]
    if other:
        rows.append(Variant(f"MSM4SR pre-trained on {other}", "cross-domain", pretrain_on=other))
    return rows


@dataclass(frozen=True)
class Budget:
    """Epochs, seeds and batch sizes of a report; recorded in the report and in every run."""

    name: str
    # Seeds of the main rows; the other rows use the first `other_seeds` of them.
    seeds: tuple[int, ...]
    other_seeds: int
    # dataset -> (pre-training epochs, fine-tuning epochs, patience); "*" = any other dataset.
    epochs: dict[str, tuple[int, int, int]]
    # Fine-tuning lr / weight decay of M2SE (SASRec always uses lr 1e-3, no weight decay).
    finetune_lr: float
    # dataset -> batch size (windows) of both stages; missing = the trainer's default.
    batch: dict[str, int] = field(default_factory=dict)
    # Architectures fine-tuned to the epoch cap without early stopping (the best epoch is still
    # chosen by validation). SASRec's ID embeddings start from scratch: on Amazon Office its
    # validation stays at random level for 3-4 epochs, and a short patience stops it there
    # with its epoch-1 weights (seen with seed 2021 and patience 3).
    full_cap: tuple[str, ...] = ()

    def for_dataset(self, dataset: str) -> tuple[int, int, int]:
        return self.epochs.get(dataset, self.epochs["*"])

    def describe(self) -> str:
        parts = [
            f"{d}: pre-train {p} epochs, fine-tune <= {f} epochs (patience {pa})"
            for d, (p, f, pa) in self.epochs.items()
        ]
        return (
            f"budget {self.name!r}: seeds {list(self.seeds)} for the main rows, the first "
            f"{self.other_seeds} for ablation / cold-start / cross-domain rows; "
            + "; ".join(parts)
            + f"; M2SE fine-tune lr {self.finetune_lr:g}"
            + (f"; batch {self.batch}" if self.batch else "")
            + (
                f"; no early stopping within the cap for {list(self.full_cap)}"
                if self.full_cap
                else ""
            )
        )


BUDGETS: dict[str, Budget] = {
    # ~2 h on 2 cores for ML-1M + Amazon Office (see README): few epochs, lr 1e-3 (paper's grid).
    "cpu": Budget(
        "cpu",
        seeds=(2020, 2021, 2022),
        other_seeds=1,
        epochs={"ml-1m": (1, 3, 2), "*": (4, 15, 3)},
        finetune_lr=1e-3,
        batch={"amazon-office": 512},
        full_cap=("sasrec",),
    ),
    # One epoch per stage, one seed: checks that every cell runs (minutes), not a result.
    "smoke": Budget(
        "smoke", seeds=(2020,), other_seeds=1, epochs={"*": (1, 1, 1)}, finetune_lr=1e-3
    ),
    # The paper's schedule (PAPER.md 3-4): for a GPU.
    "full": Budget(
        "full",
        seeds=(2020, 2021, 2022),
        other_seeds=3,
        epochs={"*": (300, 300, 20)},
        finetune_lr=1e-4,
    ),
}


@dataclass
class Cell:
    """One (dataset, variant, seed) of the matrix and the runs that produced it."""

    dataset: str
    variant: Variant
    seed: int
    pretrain_run: str | None = None
    finetune_run: str | None = None
    reused: bool = False
    seconds: float = 0.0


def _deep(*ds: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in ds:
        for k, v in d.items():
            out[k] = {**out.get(k, {}), **v}
    return out


def _strip(cfg: Config) -> dict[str, Any]:
    """The config fields that change the numbers (runtime and checkpoint paths excluded)."""
    d = cfg.to_dict()
    d.pop("runtime")
    return d


def run_key(kind: str, dataset: str, seed: int, cfg: Config, parent: str | None) -> str:
    """Deterministic run id: same configuration + parent -> same id (reuse / resume)."""
    blob = json.dumps({"kind": kind, "cfg": _strip(cfg), "parent": parent}, sort_keys=True)
    h = hashlib.sha256(blob.encode()).hexdigest()[:10]
    return f"x-{kind[:3]}-{dataset}-s{seed}-{h}"


def feature_versions(dataset: str, wh: WarehouseConfig | None) -> dict[str, str | None]:
    """The latest encoder / tagger versions of `dataset`: pinned into every run's config."""
    with store.connect(wh, create=False, read_only=True) as con:
        snap = store.snapshot_id(con)
        enc = latest_version(con, "item_text_features", "encoder_version", "encoder", dataset, snap)
        tagger = None
        if enc is not None:
            tagger = latest_version(
                con,
                "item_image_features",
                "tagger_version",
                "tagger",
                dataset,
                snap,
                "AND encoder_version = ?",
                [enc],
            )
    return {"encoder_version": enc, "tagger_version": tagger}


def stage_configs(
    base: Config, budget: Budget, dataset: str, variant: Variant, seed: int, versions: dict
) -> tuple[Config | None, Config]:
    """(pre-training config or None, fine-tuning config) of one cell."""
    p_ep, f_ep, patience = budget.for_dataset(dataset)
    batch = budget.batch.get(dataset)
    common = _deep(
        {"data": {"dataset": dataset, **versions}},
        {
            "pretrain": {
                "max_epochs": p_ep,
                "patience": patience,
                "seed": seed,
                "batch_size": batch,
            },
            "finetune": {
                "max_epochs": f_ep,
                "patience": patience,
                "seed": seed,
                "batch_size": batch,
                "lr": budget.finetune_lr,
            },
        },
        variant.common,
    )
    ft = merge(base, _deep(common, variant.finetune))
    if ft.model.arch in budget.full_cap:
        ft = merge(ft, {"finetune": {"patience": f_ep}})
    pre = None if variant.pretrain is None else merge(base, _deep(common, variant.pretrain))
    return pre, ft


def _finished(run_id: str, wh: WarehouseConfig | None) -> bool:
    with store.connect(wh, create=False, read_only=True) as con:
        row = con.execute("SELECT status FROM runs WHERE run_id = ?", [run_id]).fetchone()
    return row is not None and row[0] == "finished"


def _run(
    kind: str,
    cfg: Config,
    run_id: str,
    wh: WarehouseConfig | None,
    from_run: str | None,
    fresh: bool,
) -> bool:
    """Train `run_id` unless finished (reuse); resume it from last.pt if a previous try died.
    Returns True when it was reused."""
    if not fresh and _finished(run_id, wh):
        log.info("reusing finished run %s", run_id)
        return True
    resume = (
        run_id if (checkpoint_root(cfg, wh) / run_id / "last.pt").is_file() and not fresh else None
    )
    fn: Callable[..., RunResult] = pretrain if kind == "pretrain" else finetune
    kw: dict[str, Any] = {"run_id": run_id, "resume": resume}
    if kind == "finetune":
        kw["from_run"] = from_run
    fn(cfg, wh, **kw)
    return False


def plan(
    datasets: list[str], budget: Budget, only: Iterable[str] | None = None
) -> list[tuple[str, Variant, int]]:
    """Every (dataset, variant, seed) of the matrix: the first seed of every row first, then the
    further seeds of the main rows (an interrupted matrix still has every row once)."""
    only = set(only) if only else None
    cells = []
    for ds in datasets:
        other = next((d for d in datasets if d != ds), None)
        for v in variants(other):
            if only and v.group not in only:
                continue
            for s in budget.seeds if v.main_seeds else budget.seeds[: budget.other_seeds]:
                cells.append((ds, v, s))
    cells.sort(key=lambda c: (c[2], GROUPS.index(c[1].group)))
    return cells


def run_matrix(
    datasets: list[str],
    budget: Budget,
    wh: WarehouseConfig | None = None,
    base: Config | None = None,
    only: Iterable[str] | None = None,
    fresh: bool = False,
    on_cell: Callable[[int, int, Cell], None] | None = None,
) -> tuple[list[Cell], list[str]]:
    """Train (or reuse) every cell; returns the cells and notes on what was skipped and why."""
    base = base or Config()
    versions = {ds: feature_versions(ds, wh) for ds in datasets}
    notes = []
    cells: list[Cell] = []
    todo = plan(datasets, budget, only)
    for i, (ds, v, seed) in enumerate(todo):
        if v.needs_images and versions[ds]["tagger_version"] is None:
            note = f"{ds}: '{v.name}' skipped: the dataset has no image features"
            if note not in notes:
                notes.append(note)
            continue
        t0 = time.perf_counter()
        cell = Cell(ds, v, seed)
        if v.pretrain_on:
            src = v.pretrain_on
            pre_cfg, _ = stage_configs(
                base,
                budget,
                src,
                Variant("MSM4SR", "main"),
                seed,
                versions[src],
            )
            _, ft_cfg = stage_configs(base, budget, ds, v, seed, versions[ds])
            ft_cfg = merge(ft_cfg, {"model": pre_cfg.to_dict()["model"]})
        else:
            pre_cfg, ft_cfg = stage_configs(base, budget, ds, v, seed, versions[ds])
            src = ds
        reused = True
        if pre_cfg is not None:
            cell.pretrain_run = run_key("pretrain", src, seed, pre_cfg, None)
            reused &= _run("pretrain", pre_cfg, cell.pretrain_run, wh, None, fresh)
        cell.finetune_run = run_key("finetune", ds, seed, ft_cfg, cell.pretrain_run)
        reused &= _run("finetune", ft_cfg, cell.finetune_run, wh, cell.pretrain_run, fresh)
        cell.reused, cell.seconds = reused, time.perf_counter() - t0
        cells.append(cell)
        if on_cell is not None:
            on_cell(i + 1, len(todo), cell)
    return cells, notes
