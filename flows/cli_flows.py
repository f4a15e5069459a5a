"""Flow commands: features, demo, serve, deploy, server start|stop|status."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml

from flows.cli_common import console, epoch_lines, err, fail, print_rows
from flows.cli_data import AllowDeletes
from pipeline.ingest import REFUSALS

if TYPE_CHECKING:
    from pipeline.sources.config import SourceSpec

server_app = typer.Typer(
    help="A local Prefect server (scheduler + UI) for `msm4sr serve`.", no_args_is_help=True
)

# The demo's training budget, in seconds of training + validation per stage (an epoch starts
# only if it should end within it; the best epoch is still chosen by validation): the whole demo
# stays within ~15 min on 2 cores (14 min 42 s on a fresh warehouse, README). --full trains to
# early stopping.
DEMO_PRETRAIN_SECONDS = 120
DEMO_FINETUNE_SECONDS = 630

# Options of the scheduled flows that `serve` and `deploy` share.
FlowsDataset = Annotated[
    str | None, typer.Option(help="dataset of both flows (default: the source's)")
]
FlowsTag = Annotated[bool, typer.Option(help="the features flow runs stage 1")]
FlowsEmbed = Annotated[bool, typer.Option(help="the features flow runs stage 2")]
FlowsTaskRunner = Annotated[
    str | None,
    typer.Option(
        help="features stages: local | dask (default: env MSM4SR_TASK_RUNNER where a run starts)"
    ),
]
FlowsWorkers = Annotated[
    int | None, typer.Option(help="local Dask cluster workers of each features run")
]
FlowsDaskAddress = Annotated[
    str | None, typer.Option(help="existing Dask scheduler for the features stages")
]


def _load_yaml(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    if not path.is_file():
        fail(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        fail(f"{path}: a config file holds a mapping of sections, got {type(data).__name__}")
    return data


SourceName = Annotated[
    str | None,
    typer.Option(help="a built-in source (movielens | amazon-office) or an entry of --source-file"),
]
SourceFile = Annotated[
    Path | None,
    typer.Option(
        help="sources YAML: one source, or `sources:` NAME: ... (pipeline/sources/config.py)"
    ),
]


def _check_source(
    source: str | None, source_file: Path | None, path: str | None, dataset: str | None
) -> SourceSpec:
    """The configured source, read now so that a bad file fails before Prefect starts."""
    from pipeline.sources.base import SourceError
    from pipeline.sources.config import configured_source

    try:
        return configured_source(source, source_file, path, dataset)
    except SourceError as e:
        fail(e)


def features(
    source: SourceName = None,
    source_file: SourceFile = None,
    path: Annotated[
        Path | None, typer.Option(help="source folder instead of the configured one")
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="dataset name instead of the configured one")
    ] = None,
    tag: Annotated[bool, typer.Option(help="run stage 1 (image tagging)")] = True,
    embed: Annotated[bool, typer.Option(help="run stage 2 (BERT embedding)")] = True,
    task_runner: Annotated[
        str | None, typer.Option(help="local (one process) | dask; env MSM4SR_TASK_RUNNER")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="local Dask cluster workers (implies dask); env MSM4SR_WORKERS"),
    ] = None,
    dask_address: Annotated[
        str | None,
        typer.Option(help="existing Dask scheduler tcp://HOST:8786; env MSM4SR_DASK_ADDRESS"),
    ] = None,
    shards: Annotated[
        int | None, typer.Option(help="shards per stage (default: one per Dask worker thread)")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="torch/ONNX Runtime threads per Dask worker")
    ] = None,
    progress: Annotated[bool, typer.Option(help="progress bars on stderr (local stages)")] = True,
    allow_deletes: AllowDeletes = False,
) -> None:
    """Run the features flow (ingest -> tag -> embed) with Prefect; print the run summary."""
    _check_source(source, source_file, str(path) if path else None, dataset)
    from flows.features import ClusterConfig, features_flow

    if workers is not None and task_runner is None:
        task_runner = "dask"
    cluster = dict(
        task_runner=task_runner,
        workers=workers,
        dask_address=dask_address,
        shards=shards,
        threads=threads,
    )
    try:  # a bad value fails here, before Prefect starts
        ClusterConfig(**{k.replace("dask_", ""): v for k, v in cluster.items() if v is not None})
    except ValueError as e:
        fail(e)
    try:  # a refused ingest (bad source, a delete it may not do) is one line, not a traceback
        summary = features_flow(
            source=source,
            source_file=str(source_file.resolve()) if source_file else None,
            path=str(path) if path else None,
            dataset=dataset,
            tag=tag,
            embed=embed,
            progress=progress,
            allow_deletes=allow_deletes,
            **cluster,
        )
    except REFUSALS as e:
        fail(e)
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
        [
            (m, s, *[f"{v.get(w, float('nan')):.4f}" for w in wanted])
            for (m, s), v in sorted(table.items())
        ],
        title=f"test metrics (full ranking over all items), run {evaluate_run}",
    )


def demo(
    full: Annotated[
        bool, typer.Option(help="train both stages to early stopping (no time budget)")
    ] = False,
    pretrain_epochs: Annotated[
        int | None, typer.Option(help="override the pre-training epochs")
    ] = None,
    finetune_epochs: Annotated[
        int | None, typer.Option(help="override the fine-tuning epochs")
    ] = None,
    user: Annotated[str, typer.Option(help="user to recommend for at the end")] = "1",
    progress: Annotated[bool, typer.Option(help="progress bars on stderr")] = True,
) -> None:
    """The main job: features + training on MovieLens-1M with posters, then metrics and recommendations."""
    from flows.features import features_flow
    from flows.train import train_flow
    from pipeline.paths import data_root
    from trainer.recommend import recommend

    ml = data_root() / "movielens-1m"
    if not (ml / "ratings.dat").is_file():
        fail(
            f"MovieLens-1M not found at {ml}. Put ratings.dat, movies.dat and posters/<MovieID>.jpg "
            f"there (GroupLens ml-1m; posters optional), or pass --data DIR with a movielens-1m/ folder."
        )
    console.rule("[bold]1/3 features flow: ingest -> tag -> embed")
    fs = features_flow(source="movielens", progress=progress)
    console.print(
        f"features: {fs['ingest']['n_items']} items, {fs['ingest']['n_interactions']} interactions, "
        f"{fs['tag']['n_tagged']} posters tagged now ({fs['tag']['n_images']} in all), "
        f"{fs['embed']['n_encoded']} strings encoded now; snapshot {fs['snapshot_id']}; {fs['seconds']}s"
    )
    console.rule("[bold]2/3 train flow: pretrain -> finetune -> evaluate")
    if not progress:
        epoch_lines()
    budget = (
        {}
        if full
        else {
            "pretrain": {"max_seconds": DEMO_PRETRAIN_SECONDS},
            "finetune": {"max_seconds": DEMO_FINETUNE_SECONDS},
        }
    )
    res = train_flow(
        dataset=fs["dataset"],
        config={"runtime": {"progress": progress}, **budget},
        pretrain_epochs=pretrain_epochs,
        finetune_epochs=finetune_epochs,
    )
    console.rule("[bold]3/3 results")
    print_metrics(res["evaluate_run"])
    recs = recommend(res["finetune_run"], user, 10)
    print_rows(
        ["rank", "item", "title", "score"],
        [(i + 1, r.item_id, r.title, f"{r.score:.3f}") for i, r in enumerate(recs)],
        title=f"top 10 for user {user}",
    )
    console.print(
        f"runs: pretrain {res['pretrain_run']}, finetune {res['finetune_run']}, evaluate {res['evaluate_run']}\n"
        f"query them: msm4sr sql \"select * from metrics where run_id = '{res['evaluate_run']}'\""
    )


def serve(
    config: Annotated[
        Path | None,
        typer.Option(help="YAML with a `schedules:` section (keys as these options, _ for -)"),
    ] = None,
    features_cron: Annotated[str, typer.Option(help="cron of the features flow")] = "0 * * * *",
    train_cron: Annotated[str, typer.Option(help="cron of the train flow")] = "0 3 * * *",
    source: SourceName = None,
    source_file: SourceFile = None,
    path: Annotated[
        str | None, typer.Option(help="source folder instead of the configured one")
    ] = None,
    dataset: FlowsDataset = None,
    tag: FlowsTag = True,
    embed: FlowsEmbed = True,
    task_runner: FlowsTaskRunner = None,
    workers: FlowsWorkers = None,
    dask_address: FlowsDaskAddress = None,
    recommend_k: Annotated[
        int | None,
        typer.Option(help="the train flow writes every user's top-k to `recommendations`"),
    ] = None,
) -> None:
    """Register both flows as scheduled deployments and run them (needs `msm4sr server start`)."""
    from prefect import serve as prefect_serve

    from flows import server
    from flows.features import features_flow
    from flows.train import train_flow

    sched = _load_yaml(config).get("schedules", {})
    features_cron = sched.get("features_cron", features_cron)
    train_cron = sched.get("train_cron", train_cron)
    cluster_keys = {"task_runner", "workers", "dask_address"}
    unknown = set(sched) - {
        "features_cron",
        "train_cron",
        "source",
        "source_file",
        "path",
        "dataset",
        "tag",
        "embed",
        "recommend_k",
        *cluster_keys,
    }
    if unknown:
        fail(f"unknown keys in schedules: {sorted(unknown)}")
    source = sched.get("source", source)
    source_file = Path(sched["source_file"]) if sched.get("source_file") else source_file
    recommend_k = sched.get("recommend_k", recommend_k)
    if recommend_k is not None and (not isinstance(recommend_k, int) or recommend_k < 1):
        fail(f"recommend_k={recommend_k!r} must be an integer >= 1")
    path = sched.get("path", path)
    dataset = sched.get("dataset", dataset)
    tag = sched.get("tag", tag)
    embed = sched.get("embed", embed)
    given = {"task_runner": task_runner, "workers": workers, "dask_address": dask_address}
    cluster = {k: sched.get(k, v) for k, v in given.items() if sched.get(k, v) is not None}
    # The file is checked now and read again by every run: edits apply to the next run.
    spec = _check_source(source, source_file, path, dataset)
    src_file = str(source_file.resolve()) if source_file else None
    if not os.environ.get("PREFECT_API_URL"):
        info = server.running()
        if info is None:
            fail(
                "schedules need a Prefect server: run `msm4sr server start` first (or set PREFECT_API_URL)"
            )
        os.environ["PREFECT_API_URL"] = info.url
    err.print(
        f"serving on {os.environ['PREFECT_API_URL']}: features '{features_cron}', train '{train_cron}' (Ctrl-C stops)"
    )
    from prefect.deployments.runner import EntrypointType

    module = EntrypointType.MODULE_PATH  # not flows/features.py: see `deploy`
    prefect_serve(
        features_flow.to_deployment(
            name="features",
            entrypoint_type=module,
            cron=features_cron,
            parameters={
                "source": source,
                "source_file": src_file,
                "path": path,
                "dataset": dataset,
                "tag": tag,
                "embed": embed,
                **cluster,
            },
        ),
        train_flow.to_deployment(
            name="train",
            entrypoint_type=module,
            cron=train_cron,
            parameters={"dataset": spec.dataset, "recommend_k": recommend_k},
        ),
    )


def deploy(
    pool: Annotated[
        str, typer.Option(help="Prefect work pool (`prefect work-pool create NAME --type process`)")
    ] = "msm4sr",
    source: Annotated[
        str | None,
        typer.Option(
            help="code every worker can read: a folder or a git URL (default: this checkout)"
        ),
    ] = None,
    features_cron: Annotated[
        str | None, typer.Option(help="cron of the features flow (none: run on demand)")
    ] = "0 * * * *",
    train_cron: Annotated[
        str | None, typer.Option(help="cron of the train flow (none: run on demand)")
    ] = "0 3 * * *",
    source_kind: Annotated[
        str | None,
        typer.Option(
            "--source-kind",
            help="features source: a built-in (movielens | amazon-office) or an entry of --source-file",
        ),
    ] = None,
    source_file: Annotated[
        str | None, typer.Option(help="sources YAML as the workers see it (read by every run)")
    ] = None,
    path: Annotated[
        str | None, typer.Option(help="source data folder as the workers see it")
    ] = None,
    dataset: FlowsDataset = None,
    tag: FlowsTag = True,
    embed: FlowsEmbed = True,
    task_runner: FlowsTaskRunner = None,
    workers: FlowsWorkers = None,
    dask_address: FlowsDaskAddress = None,
) -> None:
    """Deploy the features and train flows to a work pool; `prefect worker start --pool POOL` runs them."""
    from prefect import Flow

    from flows import server

    if not os.environ.get("PREFECT_API_URL"):
        info = server.running()
        if info is None:
            fail(
                "a work pool lives on a Prefect server: run `msm4sr server start` (or set PREFECT_API_URL)"
            )
        os.environ["PREFECT_API_URL"] = info.url
    src = source or str(Path(__file__).resolve().parents[1])
    if source_file and not Path(source_file).is_file():  # only the workers can read it
        if dataset is None:
            fail(f"{source_file} is not readable here: pass --dataset for the train flow")
        train_dataset = dataset
    else:
        file = Path(source_file).resolve() if source_file else None
        train_dataset = _check_source(source_kind, file, path, dataset).dataset
        source_file = str(file) if file else None
    given = {"task_runner": task_runner, "workers": workers, "dask_address": dask_address}
    params = {
        "source": source_kind,
        "source_file": source_file,
        "path": path,
        "dataset": dataset,
        "tag": tag,
        "embed": embed,
    }
    params |= {k: v for k, v in given.items() if v is not None}
    for name, entry, cron, p in (
        # Module entrypoints: a file entrypoint puts flows/ first on sys.path, where features.py
        # would shadow the features package in every process the run starts (Dask workers).
        ("features", "flows.features.features_flow", features_cron, params),
        ("train", "flows.train.train_flow", train_cron, {"dataset": train_dataset}),
    ):
        flow_obj = Flow.from_source(source=src, entrypoint=entry)
        dep_id = flow_obj.deploy(
            name=name, work_pool_name=pool, cron=cron or None, parameters=p, print_next_steps=False
        )
        console.print(
            f"deployed {flow_obj.name}/{name} ({dep_id}) to pool {pool!r}, cron {cron or 'none'}"
        )
    console.print(
        f"start a worker: prefect worker start --pool {pool}   (PREFECT_API_URL={os.environ['PREFECT_API_URL']})"
    )


@server_app.command("start")
def server_start(
    port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 4200,
) -> None:
    """Start a Prefect server in the background (scheduler + UI)."""
    from flows import server

    info = server.start(port=port)
    console.print(
        f"Prefect server running (pid {info.pid}), UI {info.url.removesuffix('/api')}, log {info.log}"
    )
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
    app.command("deploy")(deploy)
    app.add_typer(server_app, name="server")
