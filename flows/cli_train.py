"""Trainer commands: pretrain, finetune, evaluate, train, recommend.

Settings come from the defaults (PAPER.md), then a `--config` YAML (sections data, model,
pretrain, finetune, eval, runtime), then `--set section.key=value`, then the named flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import yaml
from rich.table import Table

from flows.cli_common import console, epoch_lines, fail

if TYPE_CHECKING:
    from trainer.config import Config
    from trainer.runlog import RunResult


Dataset = Annotated[str, typer.Option(help="dataset in the warehouse")]
MaxEpochs = Annotated[int | None, typer.Option(help="maximum epochs (PAPER.md: 300)")]
ConfigFile = Annotated[
    Path | None,
    typer.Option("--config", help="YAML with sections data/model/pretrain/finetune/eval/runtime"),
]
Sets = Annotated[
    list[str] | None, typer.Option("--set", help="override: section.key=value (repeatable)")
]
BatchSize = Annotated[
    int | None,
    typer.Option(
        help="targets per step (default: by the data and model, 256 on Office; 2048 on ML-1M; M2SE pre-training 8192 there)"
    ),
]
Lr = Annotated[
    float | None,
    typer.Option(
        help="Adam learning rate (default 1e-3; SASRec 2e-3; M2SE fine-tuning: by the batch, 4e-3 at 2048)"
    ),
]
Seed = Annotated[int | None, typer.Option(help="random seed (PAPER.md: 2020)")]
SampleMode = Annotated[
    str | None,
    typer.Option(
        help="windows (default: stride finetune.window_stride) | every_prefix (the paper's) | all_positions"
    ),
]
Device = Annotated[str | None, typer.Option(help="auto | cpu | cuda")]
Threads = Annotated[int | None, typer.Option(help="torch CPU threads (0: default)")]
Modalities = Annotated[str | None, typer.Option(help="both | text | image (ablations)")]
Resume = Annotated[
    str | None, typer.Option(help="continue this killed run from its last checkpoint")
]
Progress = Annotated[bool, typer.Option(help="progress bars on stderr")]


def build_config(
    stage: str,
    dataset: str,
    config: Path | None,
    sets: list[str] | None,
    max_epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    sample_mode: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    modalities: str | None = None,
    progress: bool = True,
    extra: dict | None = None,
) -> Config:
    """Defaults of the chosen model.arch <- YAML <- --set <- flags; `stage` is "pretrain",
    "finetune" or "both"."""
    from trainer.config import load_yaml, parse_override, resolve

    layers = [load_yaml(config)] if config is not None else []
    layers += [parse_override(item) for item in sets or []]
    stages = ("pretrain", "finetune") if stage == "both" else (stage,)
    train_flags = {
        k: v
        for k, v in dict(
            max_epochs=max_epochs, batch_size=batch_size, lr=lr, seed=seed, sample_mode=sample_mode
        ).items()
        if v is not None
    }
    over: dict = {s: dict(train_flags) for s in stages}
    over["data"] = {"dataset": dataset}
    over["runtime"] = {
        "progress": progress,
        **({"device": device} if device else {}),
        **({"threads": threads} if threads is not None else {}),
    }
    if modalities:
        over["model"] = {"modalities": modalities}
    for section, values in (extra or {}).items():
        over.setdefault(section, {}).update(values)
    return resolve([*layers, over])


def _run(fn):
    """Call fn(); print trainer errors without a traceback."""
    from features.store import WarehouseError
    from trainer.data import DataError
    from trainer.runlog import RunError

    try:
        return fn()
    except (DataError, RunError, WarehouseError, ValueError, OSError, yaml.YAMLError) as e:
        fail(" ".join(str(e).split()))  # one line, also for YAML's multi-line messages


def print_result(res: RunResult) -> None:
    from trainer.distributed import is_main

    if not is_main():  # under torchrun, rank 0 alone prints
        return
    trained = (
        f"the checkpoint of epoch {res.best_epoch}"
        if res.kind == "evaluate"
        else f"best epoch {res.best_epoch} of {res.epochs_run}"
    )
    console.print(
        f"[bold]{res.run_id}[/] ({res.kind}, {res.model}): {trained}"
        + (f", {res.seconds:.0f} s of training" if res.seconds else "")
        + f", checkpoint {res.checkpoint_dir}",
        soft_wrap=True,
    )
    keys = ["Recall@10", "NDCG@10", "MRR@10", "Recall@20", "NDCG@20", "Recall@50", "NDCG@50"]
    short = [k.replace("Recall", "R").replace("NDCG", "N").replace("MRR", "MRR") for k in keys]
    console.print("full ranking over all items (best epoch):")
    width = max(10, len(res.model))
    console.print(
        f"{'split':6} {'subset':6} {'model':{width}} {'cases':>6} "
        + " ".join(f"{k:>7}" for k in short),
        markup=False,
    )
    for split, per in (("valid", res.valid), ("test", res.test)):
        for subset, m in per.items():
            rows = [(res.model, m), ("popularity", res.popularity.get(split, {}).get(subset))]
            for name, vals in rows:
                if vals:
                    console.print(
                        f"{split:6} {subset:6} {name:{width}} {vals.get('n_cases', 0):6.0f} "
                        + " ".join(f"{vals.get(k, float('nan')):7.4f}" for k in keys),
                        markup=False,
                        soft_wrap=True,
                    )


def pretrain_cmd(
    dataset: Dataset = "ml-1m",
    max_epochs: MaxEpochs = None,
    config: ConfigFile = None,
    set_: Sets = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    seed: Seed = None,
    sample_mode: SampleMode = None,
    device: Device = None,
    threads: Threads = None,
    modalities: Modalities = None,
    no_mixup: Annotated[
        bool, typer.Option("--no-mixup", help="ablation: complementary mixup off")
    ] = False,
    no_cmcl: Annotated[bool, typer.Option("--no-cmcl", help="ablation: CMCL off")] = False,
    resume: Resume = None,
    progress: Progress = True,
) -> None:
    """Pre-train M2SE (NIP per modality + lambda * CMCL) on a dataset's cached features."""
    from trainer.stages import pretrain

    extra = {}
    if no_mixup:
        extra["model"] = {"mixup": False}
    if no_cmcl:
        extra["pretrain"] = {"cmcl": False}
    cfg = _run(
        lambda: build_config(
            "pretrain",
            dataset,
            config,
            set_,
            max_epochs,
            batch_size,
            lr,
            seed,
            sample_mode,
            device,
            threads,
            modalities,
            progress,
            extra,
        )
    )
    if not progress:
        epoch_lines()
    print_result(_run(lambda: pretrain(cfg, resume=resume)))


def finetune_cmd(
    from_: Annotated[
        str | None,
        typer.Option("--from", help="pre-training run to start from (none: from scratch)"),
    ] = None,
    dataset: Dataset = "ml-1m",
    max_epochs: MaxEpochs = None,
    config: ConfigFile = None,
    set_: Sets = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    seed: Seed = None,
    sample_mode: SampleMode = None,
    device: Device = None,
    threads: Threads = None,
    inductive: Annotated[
        bool, typer.Option("--inductive", help="no item-ID embedding (scores unseen items)")
    ] = False,
    resume: Resume = None,
    progress: Progress = True,
) -> None:
    """Fine-tune (transductive by default) with a softmax over all items; ends with the test evaluation."""
    from trainer.stages import finetune

    extra = {"finetune": {"transductive": False}} if inductive else {}
    cfg = _run(
        lambda: build_config(
            "finetune",
            dataset,
            config,
            set_,
            max_epochs,
            batch_size,
            lr,
            seed,
            sample_mode,
            device,
            threads,
            None,
            progress,
            extra,
        )
    )
    if not progress:
        epoch_lines()
    print_result(_run(lambda: finetune(cfg, from_run=from_, resume=resume)))


def evaluate_cmd(
    run: Annotated[str, typer.Argument(help="run id (pretrain or finetune)")],
    exclude_history: Annotated[
        bool, typer.Option(help="remove the user's earlier items from the ranking")
    ] = False,
    device: Device = None,
) -> None:
    """Full-ranking evaluation of a run's best checkpoint on valid and test, with a popularity row."""
    from trainer.config import Config, merge
    from trainer.finished_runs import evaluate_run

    cfg = _run(lambda: merge(Config(), {"runtime": {"device": device or "auto"}}))
    res = _run(lambda: evaluate_run(run, cfg=cfg, exclude_history=exclude_history))
    print_result(res)


def train_cmd(
    dataset: Dataset = "ml-1m",
    max_epochs: MaxEpochs = None,
    config: ConfigFile = None,
    set_: Sets = None,
    batch_size: BatchSize = None,
    seed: Seed = None,
    sample_mode: SampleMode = None,
    device: Device = None,
    threads: Threads = None,
    modalities: Modalities = None,
    inductive: Annotated[bool, typer.Option("--inductive", help="inductive fine-tuning")] = False,
    progress: Progress = True,
) -> None:
    """Pre-train, fine-tune from it and evaluate, in one command."""
    from trainer.stages import train

    cfg = _run(
        lambda: build_config(
            "both",
            dataset,
            config,
            set_,
            max_epochs,
            batch_size,
            None,
            seed,
            sample_mode,
            device,
            threads,
            modalities,
            progress,
        )
    )
    if not progress:
        epoch_lines()
    pre, ft = _run(lambda: train(cfg, inductive=inductive))
    print_result(pre)
    print_result(ft)


def recommend_cmd(
    run: Annotated[
        str, typer.Option("--run", help="run id whose best checkpoint scores the items")
    ],
    user: Annotated[
        list[str] | None,
        typer.Option("--user", help="user id as in the source data (repeatable)"),
    ] = None,
    all_users: Annotated[
        bool, typer.Option("--all", help="every user of the run's dataset")
    ] = False,
    k: Annotated[int, typer.Option("-k", help="number of items (>= 1)")] = 10,
    include_seen: Annotated[
        bool, typer.Option(help="also rank items the user already has")
    ] = False,
    write: Annotated[
        bool | None,
        typer.Option(
            help="write the `recommendations` table (default: with --all or several --user)"
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="users scored per batch")] = 512,
    progress: Progress = True,
) -> None:
    """Top-k items after each user's whole history: printed with titles for one user, written
    to the `recommendations` table (the run's rows of these users replaced) for many."""
    from trainer.recommend import recommend, recommend_users

    if k < 1:
        fail(f"-k {k}: the number of items to recommend must be >= 1")
    if batch_size < 1:
        fail(f"--batch-size {batch_size}: must be >= 1")
    if all_users == bool(user):
        fail("name the users: --user U (repeatable) or --all")
    users = None if all_users else list(user or [])
    if write is None:
        write = all_users or len(users or []) > 1
    if not write:
        for u in users or []:
            recs = _run(lambda u=u: recommend(run, u, k, include_seen=include_seen))
            t = Table(title=f"top {k} for user {u} ({run})")
            for c in ("rank", "item_id", "title", "score"):
                t.add_column(c)
            for i, r in enumerate(recs, 1):
                t.add_row(str(i), r.item_id, r.title or "", f"{r.score:.4f}")
            console.print(t)
        return
    s = _run(
        lambda: recommend_users(
            run, users, k, include_seen=include_seen, batch_size=batch_size, progress=progress
        )
    )
    console.print(
        f"recommendations of {s.run_id}: {s.n_users} users x top {s.k} = {s.n_rows} rows "
        f"(dataset {s.dataset}, snapshot {s.snapshot_id}); scored {s.users_per_s:.0f} users/s, "
        f"written in {s.seconds_write:.1f}s; warehouse snapshot {s.warehouse_snapshot}",
        soft_wrap=True,
    )
    console.print(
        f'query: msm4sr sql "select rank, item_id, title, score from recommended_items '
        f"where run_id = '{s.run_id}' and user_id = '...' order by rank\"",
        soft_wrap=True,
        markup=False,
    )


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain_cmd)
    app.command("finetune")(finetune_cmd)
    app.command("evaluate")(evaluate_cmd)
    app.command("train")(train_cmd)
    app.command("recommend")(recommend_cmd)
