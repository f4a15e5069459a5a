"""What every source adapter returns, and the report of what it dropped or repaired."""

from __future__ import annotations

import gzip
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from features.runlog import Report, ReportRow  # noqa: F401  (re-exported for the adapters)

# Column sets of the frames a source hands to preprocessing (before the contract's extras).
ITEM_COLUMNS = {
    "item_id": pl.String,
    "title": pl.String,
    "text": pl.String,
    "categories": pl.String,
}
INTERACTION_COLUMNS = {
    "user_id": pl.String,
    "item_id": pl.String,
    "ts": pl.Int64,
    "rating": pl.Float32,
    "row": pl.Int64,  # source row number: breaks timestamp ties deterministically
}
IMAGE_COLUMNS = {"item_id": pl.String, "image_idx": pl.Int32, "uri": pl.String}

# Timestamps past 2100-01-01 (or before 1970) are out of range: a unit or a byte gone wrong.
MAX_TS = 4_102_444_800
# Report checks that drop rows of the interactions input / of the items input: what an adapter
# read = what lands + the sum of these (tests/test_hostile_inputs.py holds every adapter to it).
INTERACTION_DROPS = frozenset(
    {
        "unparseable_rating_line",
        "rating_line_with_control_bytes",
        "rating_with_negative_id",
        "ragged_interactions_line",
        "unparseable_interaction",
        "interaction_id_with_control_chars",
        "unparseable_timestamp",
        "unparseable_rating",
        "rating_out_of_range",
        "timestamp_out_of_range",
        "unparseable_review_line",
        "review_without_user_item_or_time",
        "interaction_with_unknown_item",
        "duplicate_interaction",
    }
)
ITEM_DROPS = frozenset(
    {
        "unparseable_movie_line",
        "non_numeric_movie_id",
        "movie_with_negative_id",
        "ragged_items_line",
        "item_id_with_control_chars",
        "unparseable_meta_line",
        "meta_without_item_id",
        "item_without_id",
        "duplicate_item_id",
    }
)
# C0 / C1 control characters except tab, newline and carriage return (a regex class).
CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"
_CONTROL = re.compile(CONTROL_CHARS)


def dropped(report: Report, checks: frozenset[str], prefix: str = "") -> int:
    """Rows the report says were dropped under `checks` (or any check starting with prefix)."""
    return sum(
        r.n
        for r in report.rows
        if r.action == "dropped"
        and (r.check_name in checks or (prefix and r.check_name.startswith(prefix)))
    )


def dropped_interactions(report: Report) -> int:
    return dropped(report, INTERACTION_DROPS, prefix="user_below_")


def dropped_items(report: Report) -> int:
    return dropped(report, ITEM_DROPS)


def has_control_bytes(line: str) -> bool:
    """Control characters other than tab / newline / carriage return (see CONTROL_CHARS)."""
    return _CONTROL.search(line) is not None


def printable(value: object) -> str:
    """`value` as text with control characters escaped (for report examples)."""
    text = str(value)
    return (
        text
        if text.isprintable()
        else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    )


def is_blank(line: str) -> bool:
    """A line of nothing but spaces, tabs and carriage returns (skipped, not a row)."""
    return not line.strip(" \t\r")


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
    # Rows the adapter read (blank lines not counted): each lands or is a dropped report row.
    n_read_interactions: int = 0
    n_read_items: int = 0

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
    """A file's bytes, gunzipped when the name ends in .gz; unreadable: SourceError."""
    try:
        raw = Path(path).read_bytes()
        return gzip.decompress(raw) if str(path).lower().endswith(".gz") else raw
    except (OSError, EOFError, zlib.error) as e:
        raise SourceError(f"cannot read {path}: {e}") from None


def decode_text(raw: bytes, encoding: str, report: Report, what: str) -> str:
    """Text of `raw`; bytes invalid in `encoding` are replaced (U+FFFD), lines counted."""
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError:
        pass
    text = raw.decode(encoding, errors="replace")
    bad = [ln for ln in text.split("\n") if "\ufffd" in ln]
    check = f"invalid_{encoding.replace('-', '')}_bytes"
    report.add(check, "repaired", len(bad), f"{what}: {bad[0] if bad else ''}")
    return text


def split_lines(text: str) -> list[str]:
    """Lines split at \\n only (a stray \\x1e or \\x0c stays inside its line), \\r stripped."""
    lines = [ln.removesuffix("\r") for ln in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def decode_lines(raw: bytes, encoding: str, report: Report, what: str) -> list[str]:
    """Split text bytes into lines. Bytes invalid in `encoding` are replaced (U+FFFD), counted."""
    return split_lines(decode_text(raw, encoding, report, what))
