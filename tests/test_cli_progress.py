"""Every long-running command takes --progress/--no-progress the same way, and the flag decides
whether a bar is drawn."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from flows.cli import build
from tests.test_sources import ml_fixture

LONG_RUNNING = [
    ("ingest", "movielens"),
    ("ingest", "amazon"),
    ("ingest", "amazon-office"),
    ("ingest", "generic"),
    ("ingest", "recbole"),
    ("ingest", "seqrec"),
    ("ingest", "source"),
    ("tag",),
    ("embed",),
    ("features",),
    ("pretrain",),
    ("finetune",),
    ("train",),
    ("report",),
    ("demo",),
    ("recommend",),
]


@functools.cache
def root() -> Any:
    return typer.main.get_command(build())


def command(path: tuple[str, ...]) -> Any:
    """The click command of `msm4sr PATH...` (typer ships its own click)."""
    cmd = root()
    for name in path:
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    return cmd


@pytest.mark.parametrize("path", LONG_RUNNING, ids=" ".join)
def test_long_running_command_has_the_progress_switch(path: tuple[str, ...]) -> None:
    opts = {p.name: p for p in command(path).params if hasattr(p, "secondary_opts")}
    assert "progress" in opts, f"msm4sr {' '.join(path)} lacks --progress/--no-progress"
    p = opts["progress"]
    assert (p.opts, p.secondary_opts, p.default) == (["--progress"], ["--no-progress"], True)


def test_the_switch_decides_whether_a_bar_is_drawn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MSM4SR_WAREHOUSE", str(tmp_path / "wh"))
    src = ml_fixture(tmp_path / "ml")
    runner = CliRunner()
    app = build()
    quiet = runner.invoke(app, ["ingest", "movielens", str(src), "--dataset", "a", "--no-progress"])
    assert quiet.exit_code == 0, quiet.output
    loud = runner.invoke(app, ["ingest", "movielens", str(src), "--dataset", "b", "--progress"])
    assert loud.exit_code == 0, loud.output
    assert "images: 100%" in loud.output and "images:" not in quiet.output


def test_without_bars_training_prints_a_line_per_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.trainer_fixtures import OFFICE_CUT, warehouse_copy

    wh = warehouse_copy(tmp_path / "wh")
    monkeypatch.setenv("MSM4SR_WAREHOUSE", str(wh.root))
    args = ["finetune", "--dataset", OFFICE_CUT, "--set", "model.arch=sasrec", "--max-epochs", "2"]
    res = CliRunner().invoke(build(), [*args, "--no-progress"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if " epoch " in ln and "valid NDCG@10" in ln]
    assert [ln.split(" epoch ")[1].split(":")[0] for ln in lines] == ["1", "2"], res.output
