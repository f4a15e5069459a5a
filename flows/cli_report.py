"""`msm4sr report`: run (or reuse) the experiment matrix and write reports/<name>/."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from flows.cli_common import console, epoch_lines, fail


def register(app: typer.Typer) -> None:
    app.command()(report)


def report(
    name: Annotated[str, typer.Option(help="report folder name: reports/<name>/")] = "latest",
    datasets: Annotated[
        str, typer.Option(help="comma-separated datasets (the first two also cross-domain)")
    ] = "ml-1m,amazon-office",
    budget: Annotated[
        str,
        typer.Option(
            help="cpu (2 cores: Office rows take minutes, ML-1M M2SE rows hours; resumable) | full (paper, GPU)"
        ),
    ] = "cpu",
    seeds: Annotated[
        int | None, typer.Option(help="seeds of the main rows (default: the budget's 3)")
    ] = None,
    only: Annotated[
        str | None,
        typer.Option(help="comma-separated groups: main,ablation,cold-start,cross-domain"),
    ] = None,
    rows: Annotated[
        list[str] | None,
        typer.Option(
            "--row", help='only this row (repeatable), e.g. --row MSM4SR --row "SASRec (ID)"'
        ),
    ] = None,
    fresh: Annotated[
        bool, typer.Option(help="retrain every cell instead of reusing finished runs")
    ] = False,
    out: Annotated[Path, typer.Option(help="reports root folder")] = Path("reports"),
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML base config (sections as for train)")
    ] = None,
    sets: Annotated[
        list[str] | None, typer.Option("--set", help="base config override section.key=value")
    ] = None,
    progress: Annotated[bool, typer.Option(help="epoch progress bars on stderr")] = True,
) -> None:
    """Baselines, ablations, cold-start and cross-domain runs -> report.md, metrics.csv, plots."""
    from dataclasses import replace

    from trainer.config import load_yaml, parse_override, resolve
    from trainer.experiments import BUDGETS, GROUPS, run_matrix
    from trainer.report import write_report

    if budget not in BUDGETS:
        fail(f"--budget {budget!r} is not one of {sorted(BUDGETS)}")
    b = BUDGETS[budget]
    if seeds is not None:
        if seeds < 1:
            fail(f"--seeds {seeds} must be >= 1")
        b = replace(
            b,
            seeds=tuple(b.seeds[0] + i for i in range(seeds)),
            other_seeds=min(b.other_seeds, seeds),
        )
    groups = [g.strip() for g in only.split(",")] if only else None
    bad = [g for g in groups or [] if g not in GROUPS]
    if bad:
        fail(f"--only {bad} not in {list(GROUPS)}")
    ds = [d.strip() for d in datasets.split(",") if d.strip()]
    if not ds:
        fail("--datasets is empty")
    try:
        base = [load_yaml(config)] if config is not None else []
        base += [parse_override(item) for item in sets or []]
        resolve([*base])  # a bad value fails here, before any run
    except (ValueError, OSError) as e:
        fail(e)
    base.append({"runtime": {"progress": progress}})
    if not progress:
        epoch_lines()

    def on_cell(i: int, n: int, c) -> None:  # noqa: ANN001
        how = "reused" if c.reused else f"trained in {c.seconds / 60:.1f} min"
        console.print(
            f"[{i}/{n}] {c.dataset} · {c.variant.name} · seed {c.seed}: {how} ({c.finetune_run})"
        )

    console.print(b.describe())
    t0 = time.perf_counter()
    try:
        cells, notes = run_matrix(
            ds, b, base=base, only=groups, rows=rows, fresh=fresh, on_cell=on_cell
        )
    except (ValueError, RuntimeError) as e:
        fail(e)
    command = "msm4sr " + shlex.join(sys.argv[1:])
    path = write_report(name, ds, cells, notes, b, command, time.perf_counter() - t0, root=out)
    console.print(f"report: {path} ({len(cells)} cells, {sum(c.reused for c in cells)} reused)")
    console.print(path.read_text().split("## Runs")[0])
