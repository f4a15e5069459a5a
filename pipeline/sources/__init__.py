"""Source adapters: raw dataset files -> RawSource (items, interactions, image references)."""

from __future__ import annotations

from pathlib import Path

from pipeline.paths import data_root
from pipeline.sources.base import RawSource, SourceError

# kind -> (default folder under the data root, default dataset name)
KINDS = {
    "movielens": ("movielens-1m", "ml-1m"),
    "amazon-office": ("amazon-office", "amazon-office"),
}


def read_source(kind: str, path: Path | None = None, dataset: str | None = None) -> RawSource:
    """Read a dataset folder of a known kind (the flows' way to name a source)."""
    if kind not in KINDS:
        raise SourceError(f"{kind=} is not a known source; known: {sorted(KINDS)}")
    folder, name = KINDS[kind]
    path = Path(path) if path else data_root() / folder
    dataset = dataset or name
    if kind == "movielens":
        from pipeline.sources.movielens import read_movielens

        if not (path / "ratings.dat").is_file():
            raise SourceError(
                f"MovieLens not found at {path}: put ratings.dat, movies.dat (and optionally "
                f"posters/<MovieID>.jpg) there, pass the folder, or set --data / MSM4SR_DATA"
            )
        return read_movielens(path, dataset)
    from pipeline.sources.generic import OFFICE, read_generic

    if not (path / "interactions.csv").is_file():
        raise SourceError(f"Amazon Office not found at {path}: put interactions.csv and items.tsv there")
    return read_generic(path / "interactions.csv", path / "items.tsv", dataset, OFFICE)
