"""Shared fixtures: a fresh DuckLake warehouse per test, the real datasets beside the repo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from features.store import WarehouseConfig

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MSM4SR_SHARED_DATA", REPO.parent / "shared" / "datasets"))
ML1M = SHARED_DATA / "movielens-1m"
OFFICE = SHARED_DATA / "amazon-office"


@pytest.fixture
def wh(tmp_path: Path) -> WarehouseConfig:
    """A new, empty warehouse in tmp_path."""
    return WarehouseConfig(root=tmp_path / "warehouse", attach=None, data_path=None)


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path}")
    return path
