"""Source adapters: raw dataset files -> RawSource (items, interactions, image references)."""

from __future__ import annotations

from pathlib import Path

from pipeline.sources.base import RawSource, SourceError

__all__ = ["RawSource", "SourceError", "read_source"]


def read_source(kind: str, path: Path | None = None, dataset: str | None = None) -> RawSource:
    """Read a built-in source (an entry of the repo's sources.yaml: movielens, amazon-office),
    optionally from another folder and/or into another dataset name."""
    from pipeline.sources.config import find_source, read_spec

    return read_spec(find_source(kind).with_overrides(path, dataset))
