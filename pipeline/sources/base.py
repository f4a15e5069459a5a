"""What every source adapter returns, and the report of what it dropped or repaired."""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from features.runlog import Report, ReportRow  # noqa: F401  (re-exported for the adapters)

# Column sets of the frames a source hands to preprocessing (before the contract's extras).
ITEM_COLUMNS = {"item_id": pl.String, "title": pl.String, "text": pl.String, "categories": pl.String}
INTERACTION_COLUMNS = {
    "user_id": pl.String,
    "item_id": pl.String,
    "ts": pl.Int64,
    "rating": pl.Float32,
    "row": pl.Int64,  # source row number: breaks timestamp ties deterministically
}
IMAGE_COLUMNS = {"item_id": pl.String, "image_idx": pl.Int32, "uri": pl.String}


class SourceError(ValueError):
    """The input is not what the adapter reads (wrong layout, missing file)."""


@dataclass
class RawSource:
    """A dataset as read from its files, not yet preprocessed."""

    dataset: str
    items: pl.DataFrame  # ITEM_COLUMNS
    interactions: pl.DataFrame  # INTERACTION_COLUMNS
    images: pl.DataFrame  # IMAGE_COLUMNS: uri is a local path, file:// or http(s):// URL
    report: Report = field(default_factory=Report)
    origin: str = ""  # where it was read from, for the run log

    def __post_init__(self) -> None:
        self.items = _conform(self.items, ITEM_COLUMNS, "items")
        self.interactions = _conform(self.interactions, INTERACTION_COLUMNS, "interactions")
        self.images = _conform(self.images, IMAGE_COLUMNS, "images")


def _conform(df: pl.DataFrame, columns: dict[str, pl.DataType], what: str) -> pl.DataFrame:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SourceError(f"{what} frame lacks columns {missing}; has {df.columns}")
    return df.select([pl.col(c).cast(t) for c, t in columns.items()])


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise SourceError(f"{what} not found: {path}")
    return path


def read_bytes(path: Path) -> bytes:
    """A file's bytes, gunzipped when the name ends in .gz."""
    raw = Path(path).read_bytes()
    return gzip.decompress(raw) if str(path).lower().endswith(".gz") else raw


def decode_lines(raw: bytes, encoding: str, report: Report, what: str) -> list[str]:
    """Split text bytes into lines. Bytes invalid in `encoding` are replaced (U+FFFD), counted."""
    try:
        text = raw.decode(encoding)
        return text.splitlines()
    except UnicodeDecodeError:
        pass
    lines: list[str] = []
    bad: list[str] = []
    for b in raw.split(b"\n"):
        b = b.rstrip(b"\r")
        try:
            lines.append(b.decode(encoding))
        except UnicodeDecodeError:
            s = b.decode(encoding, errors="replace")
            bad.append(s)
            lines.append(s)
    if lines and lines[-1] == "":
        lines.pop()
    report.add(f"invalid_{encoding.replace('-', '')}_bytes", "repaired", len(bad), f"{what}: {bad[0] if bad else ''}")
    return lines
