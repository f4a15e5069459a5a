"""Standard formats and configured sources: `ingest recbole|seqrec|source`, `export recbole`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from features.store import WarehouseConfig, WarehouseError
from flows.cli_common import console, fail
from flows.cli_data import AllowDeletes, MinUser, ingest_app, run_ingest
from pipeline.sources.base import SourceError
from pipeline.sources.config import find_source, read_spec
from pipeline.sources.recbole import export_recbole, read_recbole
from pipeline.sources.seqrec import read_seqrec

export_app = typer.Typer(
    help="Write a warehouse dataset in a standard format.", no_args_is_help=True
)

Progress = Annotated[bool, typer.Option(help="progress bars on stderr")]
FileName = Annotated[
    str | None, typer.Option("--name", help="file stem <name> (default: the folder's name)")
]
SourceFile = Annotated[
    Path | None,
    typer.Option(help="sources YAML (one source, or `sources:` NAME: ...); default: the built-ins"),
]


def ingest_recbole(
    folder: Annotated[Path, typer.Argument(help="folder with <name>.inter (+ <name>.item)")],
    dataset: Annotated[str | None, typer.Option(help="dataset name (default: <name>)")] = None,
    name: FileName = None,
    min_user: MinUser = 5,
    progress: Progress = True,
    allow_deletes: AllowDeletes = False,
) -> None:
    """RecBole atomic files: <name>.inter (user_id:token, item_id:token, timestamp:float, ...)."""
    run_ingest(lambda: read_recbole(folder, dataset, name), min_user, progress, allow_deletes)


def ingest_seqrec(
    folder: Annotated[Path, typer.Argument(help="folder with <name>.train/.valid/.test.inter")],
    dataset: Annotated[str | None, typer.Option(help="dataset name (default: <name>)")] = None,
    name: FileName = None,
    min_user: MinUser = 5,
    progress: Progress = True,
    allow_deletes: AllowDeletes = False,
) -> None:
    """Processed sequences (UniSRec / VQ-Rec layout): .train/.valid/.test.inter, .text, index maps."""
    run_ingest(lambda: read_seqrec(folder, dataset, name), min_user, progress, allow_deletes)


def ingest_configured(
    source: Annotated[
        str | None, typer.Argument(help="source name (default: the file's only source)")
    ] = None,
    source_file: SourceFile = None,
    progress: Progress = True,
    allow_deletes: AllowDeletes = False,
) -> None:
    """A source described in a sources YAML (`msm4sr ingest source shop --source-file x.yaml`)."""
    if source is None and source_file is None:
        fail("name a built-in source (movielens, amazon-office) or pass --source-file")
    try:
        spec = find_source(source, source_file)
    except SourceError as e:
        fail(str(e))
    run_ingest(lambda: read_spec(spec), spec.min_interactions, progress, allow_deletes)


def export_recbole_cmd(
    folder: Annotated[
        Path, typer.Argument(help="RecBole data_path: writes FOLDER/<name>/<name>.inter")
    ],
    dataset: Annotated[str, typer.Option(help="dataset in the warehouse")],
    name: Annotated[
        str | None, typer.Option(help="RecBole dataset name (default: --dataset)")
    ] = None,
    snapshot: Annotated[
        int | None, typer.Option(help="warehouse snapshot (default: latest)")
    ] = None,
) -> None:
    """The preprocessed dataset as RecBole atomic files (exactly the trainer's interactions)."""
    try:
        out = export_recbole(dataset, folder, WarehouseConfig(), snapshot, name)
    except (WarehouseError, ValueError, OSError) as e:
        fail(str(e))
    with open(out / f"{out.name}.inter", "rb") as f:
        rows = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b"")) - 1
    console.print(
        f"wrote {out}/{out.name}.inter ({rows} interactions) and {out.name}.item; "
        f"RecBole: data_path={out.parent}, dataset={out.name}"
    )


def register(app: typer.Typer) -> None:
    ingest_app.command("recbole")(ingest_recbole)
    ingest_app.command("seqrec")(ingest_seqrec)
    ingest_app.command("source")(ingest_configured)
    export_app.command("recbole")(export_recbole_cmd)
    app.add_typer(export_app, name="export")
