"""Where raw data is looked for: --data / MSM4SR_DATA, else data/ at the repo root."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """The raw data folder (set by `msm4sr --data`, MSM4SR_DATA, or the repo's data/)."""
    return Path(os.environ.get("MSM4SR_DATA", REPO_ROOT / "data"))


def image_cache_dir() -> Path:
    """Content-addressed cache of downloaded images (inside the warehouse folder)."""
    root = Path(os.environ.get("MSM4SR_WAREHOUSE", REPO_ROOT / "warehouse"))
    return root / "cache" / "images"
