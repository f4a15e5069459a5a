"""The experiment matrix of the report: baselines, ablations, cold-start and cross-domain runs.

Every cell is an ordinary pre-training / fine-tuning run of trainer.stages (same split, batches,
early stopping on validation NDCG@10 and full-ranking metrics), so every number of the report
is a `runs` row with its `metrics` rows. A run's id is derived from its resolved configuration
(dataset, feature versions, seed, every hyper-parameter, the pre-training run it starts from), so a
second `msm4sr report` reuses finished runs, resumes a killed one from its last checkpoint and
trains only what is missing; a changed budget gives new ids.

Every run uses its architecture's defaults (trainer/config.py) and trains to its own early stop;
budgets choose seeds only: "cpu" (3 seeds for Office's main rows, 1 for ML-1M's, 1 for the other
rows), "full" (3 seeds everywhere, for a GPU), "smoke" (1 epoch per stage: plumbing only).
Nothing is chosen on test.
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
from trainer.config import Config, merge, resolve
from trainer.data import latest_version
from trainer.runlog import RunResult, checkpoint_root
from trainer.runtime import numeric_settings
from trainer.stages import finetune, pretrain

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


SASREC = {"model": {"arch": "sasrec"}}  # with SASRec's own defaults (trainer/config.py)
INDUCTIVE = {"finetune": {"transductive": False}}
HOLDOUT = {"data": {"holdout_items": 0.1}}


def variants(other: str | None) -> list[Variant]:
    """The matrix for one dataset; `other` = the dataset of the cross-domain rows (or None)."""
    rows = [
        Variant("SASRec (ID)", "main", pretrain=None, finetune=SASREC, main_seeds=True),
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
            finetune=SASREC,
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
    """Seeds and epoch limits of a report; recorded in the report and in every run.

    Every run trains with the trainer's defaults of its architecture (trainer/config.py) to its
    own early stop; a budget only says how many seeds and, for "smoke", caps the epochs."""

    name: str
    # Seeds of the main rows; the other rows use the first `other_seeds` of them.
    seeds: tuple[int, ...]
    other_seeds: int
    # dataset -> number of seeds of its main rows (default: all of `seeds`).
    main_seeds: dict[str, int] = field(default_factory=dict)
    # Overrides of both training stages (e.g. {"max_epochs": 1}); empty = the defaults.
    stages: dict[str, Any] = field(default_factory=dict)

    def seeds_for(self, dataset: str, main: bool) -> tuple[int, ...]:
        if not main:
            return self.seeds[: self.other_seeds]
        return self.seeds[: self.main_seeds.get(dataset, len(self.seeds))]

    def describe(self) -> str:
        per = ", ".join(f"{d}: {n}" for d, n in self.main_seeds.items())
        return (
            f"budget {self.name!r}: seeds {list(self.seeds)} for the main rows"
            + (f" (fewer on {per})" if per else "")
            + f", the first {self.other_seeds} for ablation / cold-start / cross-domain rows; "
            + (
                f"both stages with {self.stages}"
                if self.stages
                else "every run trained to its early stop with its architecture's defaults"
            )
        )


BUDGETS: dict[str, Budget] = {
    # 2 cores: Office with 3 seeds for the main rows, ML-1M with 1 (its runs take ~10x longer).
    "cpu": Budget("cpu", seeds=(2020, 2021, 2022), other_seeds=1, main_seeds={"ml-1m": 1}),
    # One epoch per stage, one seed: checks that every cell runs (minutes), not a result.
    "smoke": Budget(
        "smoke", seeds=(2020,), other_seeds=1, stages={"max_epochs": 1, "batch_size": 4096}
    ),
    # 3 seeds everywhere: for a GPU.
    "full": Budget("full", seeds=(2020, 2021, 2022), other_seeds=3),
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
    """The config fields that change the numbers: all but the runtime section, whose device type
    and precision are kept (a CPU run and a bf16 GPU run are different runs)."""
    d = cfg.to_dict()
    rt = d.pop("runtime")
    d["numerics"] = numeric_settings(rt["device"], rt["amp"])
    for stage in ("pretrain", "finetune"):
        if d[stage]["lr_decay"] == 1.0:  # constant lr: ids as before the lr decay existed
            del d[stage]["lr_decay"], d[stage]["decay_patience"]
        if d[stage]["min_delta"] == 0.0:  # any better score resets the patience: ids as before
            del d[stage]["min_delta"]
    return d


def run_key(kind: str, dataset: str, seed: int, cfg: Config, parent: str | None) -> str:
    """Deterministic run id: same configuration + parent -> same id (reuse / resume). An id
    leaves out the section that cannot change its run: a pre-training's the fine-tuning section
    (runs that differ only in fine-tuning share their pre-training), a fine-tuning without a
    parent (SASRec, "no pre-training") the pre-training section (a report that caps pre-training
    reuses them). A fine-tuning with a parent keeps it: the parent's id already follows it."""
    d = _strip(cfg)
    if kind == "pretrain":
        d.pop("finetune")
    elif parent is None:
        d.pop("pretrain")
    blob = json.dumps({"kind": kind, "cfg": d, "parent": parent}, sort_keys=True)
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
    base: list[dict[str, Any]],
    budget: Budget,
    dataset: str,
    variant: Variant,
    seed: int,
    versions: dict,
) -> tuple[Config | None, Config]:
    """(pre-training config or None, fine-tuning config) of one cell: the defaults of the
    cell's architecture <- the user's base layers <- the budget <- the variant.

    On a dataset without image features every cell says `modalities: text` (what its run
    trains, `without_empty_modality`), so "MSM4SR" and "Text-only pre-trained" are one run there,
    trained once."""
    stage = {**budget.stages, "seed": seed}
    text_only = {"model": {"modalities": "text"}} if versions.get("tagger_version") is None else {}
    common = _deep(
        {"data": {"dataset": dataset, **versions}},
        {"pretrain": dict(stage), "finetune": dict(stage)},
        text_only,
        variant.common,
    )
    ft = resolve([*base, _deep(common, variant.finetune)])
    pre = None if variant.pretrain is None else resolve([*base, _deep(common, variant.pretrain)])
    return pre, ft


def _finished(run_id: str, wh: WarehouseConfig | None) -> bool:
    with store.connect(wh, create=False, read_only=True) as con:
        row = con.execute("SELECT status FROM runs WHERE run_id = ?", [run_id]).fetchone()
    return row is not None and row[0] == "finished"


def train_or_reuse(
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
    datasets: list[str],
    budget: Budget,
    only: Iterable[str] | None = None,
    rows: Iterable[str] | None = None,
) -> list[tuple[str, Variant, int]]:
    """Every (dataset, variant, seed) of the matrix (of the groups `only` and rows `rows`, when
    given): the first seed of every row first, then the further seeds of the main rows (an
    interrupted matrix still has every row once)."""
    only = set(only) if only else None
    names = set(rows) if rows else None
    cells = []
    known: set[str] = set()
    for ds in datasets:
        other = next((d for d in datasets if d != ds), None)
        for v in variants(other):
            known.add(v.name)
            if (only and v.group not in only) or (names and v.name not in names):
                continue
            for s in budget.seeds_for(ds, v.main_seeds):
                cells.append((ds, v, s))
    if names and names - known:
        raise ValueError(f"--row {sorted(names - known)} not in {sorted(known)}")
    cells.sort(key=lambda c: (c[2], GROUPS.index(c[1].group)))
    return cells


def run_matrix(
    datasets: list[str],
    budget: Budget,
    wh: WarehouseConfig | None = None,
    base: list[dict[str, Any]] | None = None,
    only: Iterable[str] | None = None,
    rows: Iterable[str] | None = None,
    fresh: bool = False,
    on_cell: Callable[[int, int, Cell], None] | None = None,
) -> tuple[list[Cell], list[str]]:
    """Train (or reuse) every cell; returns the cells and notes on what was skipped and why."""
    base = base or []
    versions = {ds: feature_versions(ds, wh) for ds in datasets}
    notes = []
    cells: list[Cell] = []
    todo = plan(datasets, budget, only, rows)
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
            reused &= train_or_reuse("pretrain", pre_cfg, cell.pretrain_run, wh, None, fresh)
        cell.finetune_run = run_key("finetune", ds, seed, ft_cfg, cell.pretrain_run)
        reused &= train_or_reuse(
            "finetune", ft_cfg, cell.finetune_run, wh, cell.pretrain_run, fresh
        )
        cell.reused, cell.seconds = reused, time.perf_counter() - t0
        cells.append(cell)
        if on_cell is not None:
            on_cell(i + 1, len(todo), cell)
    return cells, notes
