"""The `msm4sr` console script: one subcommand per user-facing job.

Each area registers its commands from its own module (flows/cli_*.py) so that the CLI stays a
thin layer over pipeline/, trainer/ and the Prefect flows.
"""

from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="msm4sr",
    help="MSM4SR: multimodal sequential recommendation on a DuckLake feature warehouse.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules that add their subcommands to `app` (each has `register(app)`).
COMMAND_MODULES = [
    "flows.cli_data",
    "flows.cli_embed",
    "flows.cli_train",
    "flows.cli_flows",
    "flows.cli_tag",
    "flows.cli_report",
    "flows.cli_sources",
]


@app.callback()
def _global(
    warehouse: Annotated[
        Path | None,
        typer.Option(help="warehouse folder (catalog.sqlite + data/); env MSM4SR_WAREHOUSE"),
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="raw data folder; env MSM4SR_DATA; default ./data")
    ] = None,
) -> None:
    if warehouse is not None:
        os.environ["MSM4SR_WAREHOUSE"] = str(warehouse.resolve())
    if data is not None:
        os.environ["MSM4SR_DATA"] = str(data.resolve())


@functools.cache
def build() -> typer.Typer:
    """`app` with every module's commands, registered once per process (a second registration
    would add every command again: the test suite invokes the CLI hundreds of times)."""
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)
    return app


def main() -> None:
    build()()


if __name__ == "__main__":
    main()
