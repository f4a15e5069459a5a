"""MovieLens in the GroupLens layout: ratings.dat, movies.dat (latin-1), optional posters/<id>.jpg."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from pipeline.sources.base import RawSource, Report, SourceError, decode_lines, require_file

POSTER_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def read_movielens(path: Path, dataset: str = "ml-1m") -> RawSource:
    """Read a MovieLens folder (ml-1m layout: `::`-separated .dat files).

    Lines that do not parse (wrong field count, non-numeric ids, ratings or timestamps) are
    dropped and counted in the report, with the first one as the example.
    """
    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"{path=} is not a folder holding ratings.dat and movies.dat")
    report = Report()
    ratings = _read_ratings(require_file(path / "ratings.dat", "MovieLens ratings"), report)
    movies = _read_movies(require_file(path / "movies.dat", "MovieLens movies"), report)
    images = _posters(path / "posters", set(movies["item_id"].to_list()), report)
    return RawSource(dataset, movies, ratings, images, report, origin=str(path.resolve()))


def _split_dat(lines: list[str], n_fields: int) -> tuple[pl.DataFrame, list[str]]:
    """Split `a::b::c` lines into string columns f0..f{n-1}; return the bad lines apart."""
    good: list[list[str]] = [[] for _ in range(n_fields)]
    bad: list[str] = []
    for line in lines:
        if not line.strip():
            continue
        parts = line.split("::")
        if len(parts) != n_fields:
            bad.append(line)
            continue
        for i, p in enumerate(parts):
            good[i].append(p.strip())
    return pl.DataFrame({f"f{i}": col for i, col in enumerate(good)}, schema={f"f{i}": pl.String for i in range(n_fields)}), bad


def _read_ratings(file: Path, report: Report) -> pl.DataFrame:
    # ratings are ASCII; one polars pass splits 1M lines in well under a second.
    raw = pl.read_csv(
        file, has_header=False, separator="\x1f", quote_char=None, new_columns=["line"],
        schema_overrides={"line": pl.String}, encoding="utf8-lossy",
    ).with_row_index("row")
    parts = raw.with_columns(pl.col("line").str.split("::").alias("p"))
    parsed = parts.select(
        "row",
        "line",
        pl.col("p").list.len().alias("n"),
        pl.col("p").list.get(0, null_on_oob=True).str.strip_chars().cast(pl.Int64, strict=False).alias("user"),
        pl.col("p").list.get(1, null_on_oob=True).str.strip_chars().cast(pl.Int64, strict=False).alias("item"),
        pl.col("p").list.get(2, null_on_oob=True).str.strip_chars().cast(pl.Float32, strict=False).alias("rating"),
        pl.col("p").list.get(3, null_on_oob=True).str.strip_chars().cast(pl.Int64, strict=False).alias("ts"),
    )
    ok = (pl.col("n") == 4) & pl.all_horizontal(pl.col("user", "item", "rating", "ts").is_not_null())
    bad = parsed.filter(~ok & (pl.col("line").str.strip_chars() != ""))
    if bad.height:
        report.add("unparseable_rating_line", "dropped", bad.height, f"line {bad['row'][0] + 1}: {bad['line'][0]!r}")
    good = parsed.filter(ok)
    return good.select(
        pl.col("user").cast(pl.String).alias("user_id"),
        pl.col("item").cast(pl.String).alias("item_id"),
        "ts",
        "rating",
        pl.col("row").cast(pl.Int64),
    )


def _read_movies(file: Path, report: Report) -> pl.DataFrame:
    lines = decode_lines(file.read_bytes(), "latin-1", report, "movies.dat")
    df, bad = _split_dat(lines, 3)
    report.add("unparseable_movie_line", "dropped", len(bad), bad[0] if bad else "")
    df = df.rename({"f0": "item_id", "f1": "title", "f2": "genres"})
    non_numeric = df.filter(pl.col("item_id").cast(pl.Int64, strict=False).is_null())
    report.add("non_numeric_movie_id", "dropped", non_numeric.height, non_numeric["item_id"][0] if non_numeric.height else "")
    df = df.filter(pl.col("item_id").cast(pl.Int64, strict=False).is_not_null())
    return df.select(
        "item_id",
        "title",
        pl.lit("").alias("text"),
        pl.col("genres").str.replace_all(r"\|", ", ").alias("categories"),
    )


def _posters(folder: Path, item_ids: set[str], report: Report) -> pl.DataFrame:
    """One image per movie: posters/<MovieID>.<ext>; files of unknown movies are reported."""
    rows: dict[str, str] = {}
    orphans: list[str] = []
    if folder.is_dir():
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() not in POSTER_SUFFIXES or not f.is_file():
                continue
            if f.stem in item_ids and f.stem not in rows:
                rows[f.stem] = str(f.resolve())
            else:
                orphans.append(f.name)
    report.add("poster_of_unknown_movie", "dropped", len(orphans), orphans[0] if orphans else "")
    report.add("movie_without_poster", "info", len(item_ids - rows.keys()), next(iter(sorted(item_ids - rows.keys())), ""))
    return pl.DataFrame(
        {"item_id": list(rows), "image_idx": [0] * len(rows), "uri": list(rows.values())},
        schema={"item_id": pl.String, "image_idx": pl.Int32, "uri": pl.String},
    )
