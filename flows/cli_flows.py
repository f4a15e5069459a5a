"""Flow commands: features, demo, serve, server start|stop|status."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from flows.cli_common import console, err, fail, print_rows

server_app = typer.Typer(help="A local Prefect server (scheduler + UI) for `msm4sr serve`.", no_args_is_help=True)

# The demo's documented short training budget (the full budget: --full or explicit epochs).
DEMO_PRETRAIN_EPOCHS = 3
DEMO_FINETUNE_EPOCHS = 6


def _load_yaml(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    if not path.is_file():
        fail(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        fail(f"{path}: a config file holds a mapping of sections, got {type(data).__name__}")
    return data


def features(
    source: Annotated[str, typer.Option(help="movielens | amazon-office")] = "movielens",
    path: Annotated[Path | None, typer.Option(help="source folder (default: under the data root)")] = None,
    dataset: Annotated[str | None, typer.Option(help="dataset name (default per source)")] = None,
    tag: Annotated[bool, typer.Option(help="run stage 1 (image tagging)")] = True,
    embed: Annotated[bool, typer.Option(help="run stage 2 (BERT embedding)")] = True,
) -> None:
    """Run the features flow (ingest -> tag -> embed) with Prefect; print the run summary."""
    from flows.features import features_flow

    summary = features_flow(source=source, path=str(path) if path else None, dataset=dataset, tag=tag, embed=embed)
    console.print_json(json.dumps(summary, default=str))


def print_metrics(evaluate_run: str, ks: tuple[int, ...] = (10, 20)) -> None:
    """The test metrics of an evaluation run and its popularity reference, as a table."""
    from features import store
    from features.store import WarehouseConfig

    with store.connect(WarehouseConfig(), create=False, read_only=True) as con:
        rows = con.execute(
            """
            SELECT r.model, m.subset, m.metric, m.value
            FROM metrics m JOIN runs r ON r.run_id = m.run_id
            WHERE (m.run_id = ? OR r.parent_run_id = ?) AND m.split = 'test' AND m.epoch = -1
            ORDER BY r.model, m.subset, m.metric
            """,
            [evaluate_run, evaluate_run],
        ).fetchall()
    wanted = [f"{m}@{k}" for k in ks for m in ("Recall", "NDCG", "MRR")]
    table: dict[tuple[str, str], dict[str, float]] = {}
    for model, subset, metric, value in rows:
        if metric in wanted:
            table.setdefault((model, subset), {})[metric] = value
    print_rows(
        ["model", "test cases", *wanted],
        [(m, s, *[f"{v.get(w, float('nan')):.4f}" for w in wanted]) for (m, s), v in sorted(table.items())],
        title=f"test metrics (full ranking over all items), run {evaluate_run}",
    )


def demo(
    full: Annotated[bool, typer.Option(help="full training budget (PAPER.md: up to 300 epochs, patience 20)")] = False,
    pretrain_epochs: Annotated[int | None, typer.Option(help="override the pre-training epochs")] = None,
    finetune_epochs: Annotated[int | None, typer.Option(help="override the fine-tuning epochs")] = None,
    user: Annotated[str, typer.Option(help="user to recommend for at the end")] = "1",
) -> None:
    """The main job: features + training on MovieLens-1M with posters, then metrics and recommendations."""
    from flows.features import features_flow
    from flows.train import train_flow
    from pipeline.paths import data_root
    from trainer.loop import recommend

    ml = data_root() / "movielens-1m"
    if not (ml / "ratings.dat").is_file():
        fail(
            f"MovieLens-1M not found at {ml}. Put ratings.dat, movies.dat and posters/<MovieID>.jpg "
            f"there (GroupLens ml-1m; posters optional), or pass --data DIR with a movielens-1m/ folder."
        )
    console.rule("[bold]1/3 features flow: ingest -> tag -> embed")
    fs = features_flow(source="movielens")
    console.print(
        f"features: {fs['ingest']['n_items']} items, {fs['ingest']['n_interactions']} interactions, "
        f"{fs['tag']['n_tagged']} posters tagged now ({fs['tag']['n_images']} in all), "
        f"{fs['embed']['n_encoded']} strings encoded now; snapshot {fs['snapshot_id']}; {fs['seconds']}s"
    )
    console.rule("[bold]2/3 train flow: pretrain -> finetune -> evaluate")
    pe = pretrain_epochs if pretrain_epochs is not None else (None if full else DEMO_PRETRAIN_EPOCHS)
    fe = finetune_epochs if finetune_epochs is not None else (None if full else DEMO_FINETUNE_EPOCHS)
    res = train_flow(dataset=fs["dataset"], pretrain_epochs=pe, finetune_epochs=fe)
    console.rule("[bold]3/3 results")
    print_metrics(res["evaluate_run"])
    recs = recommend(res["finetune_run"], user, 10)
    print_rows(["rank", "item", "title", "score"], [(i + 1, r.item_id, r.title, f"{r.score:.3f}") for i, r in enumerate(recs)], title=f"top 10 for user {user}")
    console.print(
        f"runs: pretrain {res['pretrain_run']}, finetune {res['finetune_run']}, evaluate {res['evaluate_run']}\n"
        f"query them: msm4sr sql \"select * from metrics where run_id = '{res['evaluate_run']}'\""
    )


def serve(
    config: Annotated[Path | None, typer.Option(help="YAML with a `schedules:` section (keys as these options, _ for -)")] = None,
    features_cron: Annotated[str, typer.Option(help="cron of the features flow")] = "0 * * * *",
    train_cron: Annotated[str, typer.Option(help="cron of the train flow")] = "0 3 * * *",
    source: Annotated[str, typer.Option(help="source of the features flow")] = "movielens",
    path: Annotated[str | None, typer.Option(help="source folder (default: under the data root)")] = None,
    dataset: Annotated[str, typer.Option(help="dataset of both flows")] = "ml-1m",
    tag: Annotated[bool, typer.Option(help="the features flow runs stage 1")] = True,
    embed: Annotated[bool, typer.Option(help="the features flow runs stage 2")] = True,
) -> None:
    """Register both flows as scheduled deployments and run them (needs `msm4sr server start`)."""
    from prefect import serve as prefect_serve

    from flows import server
    from flows.features import features_flow
    from flows.train import train_flow

    sched = _load_yaml(config).get("schedules", {})
    features_cron = sched.get("features_cron", features_cron)
    train_cron = sched.get("train_cron", train_cron)
    unknown = set(sched) - {"features_cron", "train_cron", "source", "path", "dataset", "tag", "embed"}
    if unknown:
        fail(f"unknown keys in schedules: {sorted(unknown)}")
    source = sched.get("source", source)
    path = sched.get("path", path)
    dataset = sched.get("dataset", dataset)
    tag = sched.get("tag", tag)
    embed = sched.get("embed", embed)
    if not os.environ.get("PREFECT_API_URL"):
        info = server.running()
        if info is None:
            fail("schedules need a Prefect server: run `msm4sr server start` first (or set PREFECT_API_URL)")
        os.environ["PREFECT_API_URL"] = info.url
    err.print(f"serving on {os.environ['PREFECT_API_URL']}: features '{features_cron}', train '{train_cron}' (Ctrl-C stops)")
    prefect_serve(
        features_flow.to_deployment(
            name="features",
            cron=features_cron,
            parameters={"source": source, "path": path, "dataset": dataset, "tag": tag, "embed": embed},
        ),
        train_flow.to_deployment(name="train", cron=train_cron, parameters={"dataset": dataset}),
    )


@server_app.command("start")
def server_start(
    port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 4200,
) -> None:
    """Start a Prefect server in the background (scheduler + UI)."""
    from flows import server

    info = server.start(port=port)
    console.print(f"Prefect server running (pid {info.pid}), UI {info.url.removesuffix('/api')}, log {info.log}")
    console.print(f"export PREFECT_API_URL={info.url}")


@server_app.command("stop")
def server_stop() -> None:
    """Stop the Prefect server started by `msm4sr server start`."""
    from flows import server

    console.print("stopped" if server.stop() else "no server of ours was running")


@server_app.command("status")
def server_status() -> None:
    """Is our Prefect server running?"""
    from flows import server

    info = server.running()
    console.print(f"running: pid {info.pid}, {info.url}" if info else "not running")


def register(app: typer.Typer) -> None:
    app.command("features")(features)
    app.command("demo")(demo)
    app.command("serve")(serve)
    app.add_typer(server_app, name="server")
