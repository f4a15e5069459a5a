"""MovieLens in the GroupLens layout: ratings.dat, movies.dat (latin-1), optional posters/<id>.jpg."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from pipeline.sources.base import (
    CONTROL_CHARS,
    RawSource,
    Report,
    SourceError,
    decode_text,
    read_bytes,
    require_file,
    split_lines,
)
from pipeline.sources.columns import drop_rows, in_range, ts_in_range

POSTER_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# Star ratings: whole stars 1-5 (ml-100k / ml-1m), half stars 0.5-5 (ml-10m and later).
RATING_MIN, RATING_MAX = 0.5, 5.0


def read_movielens(path: Path, dataset: str = "ml-1m") -> RawSource:
    """Read a MovieLens folder (ml-1m layout: `::`-separated .dat files).

    Lines that do not parse (wrong field count, non-numeric ids, ratings or timestamps), hold
    control bytes, or carry values out of range (negative ids, ratings outside
    [RATING_MIN, RATING_MAX], timestamps before 1970 or after 2100) are dropped and counted in
    the report, with the first one as the example.
    """
    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"{path=} is not a folder holding ratings.dat and movies.dat")
    report = Report()
    ratings_file = require_file(path / "ratings.dat", "MovieLens ratings")
    ratings, n_ratings = _read_ratings(ratings_file, report)
    movies_file = require_file(path / "movies.dat", "MovieLens movies")
    movies, n_movies = _read_movies(movies_file, report)
    images = _posters(path / "posters", set(movies["item_id"].to_list()), report)
    return RawSource(
        dataset,
        movies,
        ratings,
        images,
        report,
        origin=str(path.resolve()),
        n_read_interactions=n_ratings,
        n_read_items=n_movies,
    )


def _lines(file: Path, encoding: str, report: Report) -> pl.DataFrame:
    """Non-blank lines of a .dat file with their 1-based line numbers (`row`, `line`)."""
    text = decode_text(read_bytes(file), encoding, report, file.name)
    lines = pl.Series("line", split_lines(text), dtype=pl.String).to_frame().with_row_index("row")
    lines = lines.with_columns(pl.col("row").cast(pl.Int64) + 1)
    return lines.filter(pl.col("line").str.strip_chars(" \t\r") != "")


def _fields(lines: pl.DataFrame, names: list[str]) -> pl.DataFrame:
    """Split `a::b::c` lines; `n` is the field count, missing fields are null."""
    parts = pl.col("line").str.split("::")
    return lines.with_columns(
        parts.list.len().alias("n"),
        *(parts.list.get(i, null_on_oob=True).alias(n) for i, n in enumerate(names)),
    )


def _first(df: pl.DataFrame, report: Report, check: str, bad: pl.Expr) -> pl.DataFrame:
    """Drop the lines where `bad` holds, counted under `check` with the first as example."""
    return drop_rows(df, bad, report, check, pl.format("line {}: {}", "row", "line"))


def _read_ratings(file: Path, report: Report) -> tuple[pl.DataFrame, int]:
    # ratings are ASCII; polars splits and parses 1M lines in well under a second.
    lines = _lines(file, "utf-8", report)
    df = _fields(lines, ["f_user", "f_item", "f_rating", "f_ts"])
    num = {"f_user": pl.Int64, "f_item": pl.Int64, "f_rating": pl.Float64, "f_ts": pl.Int64}
    df = df.with_columns(
        pl.col(c).str.strip_chars().cast(t, strict=False).alias(c[2:]) for c, t in num.items()
    )
    df = _first(
        df, report, "rating_line_with_control_bytes", pl.col("line").str.contains(CONTROL_CHARS)
    )
    parsed = (pl.col("n") == 4) & pl.all_horizontal(
        pl.col("user", "item", "rating", "ts").is_not_null()
    )
    df = _first(df, report, "unparseable_rating_line", ~parsed)
    df = _first(df, report, "rating_with_negative_id", (pl.col("user") < 0) | (pl.col("item") < 0))
    rating_ok = in_range(pl.col("rating"), RATING_MIN, RATING_MAX) & pl.col("rating").is_finite()
    df = _first(df, report, "rating_out_of_range", ~rating_ok)
    df = _first(df, report, "timestamp_out_of_range", ~ts_in_range(pl.col("ts")))
    out = df.select(
        pl.col("user").cast(pl.String).alias("user_id"),
        pl.col("item").cast(pl.String).alias("item_id"),
        "ts",
        pl.col("rating").cast(pl.Float32),
        pl.col("row").cast(pl.Int64),
    )
    return out, lines.height


def _read_movies(file: Path, report: Report) -> tuple[pl.DataFrame, int]:
    lines = _lines(file, "latin-1", report)
    df = _fields(lines, ["item_id", "title", "genres"])
    df = _first(df, report, "unparseable_movie_line", pl.col("n") != 3)
    df = df.with_columns(pl.col("item_id").str.strip_chars(" \t\r"))
    number = pl.col("item_id").cast(pl.Int64, strict=False)
    df = drop_rows(df, number.is_null(), report, "non_numeric_movie_id", pl.col("item_id"))
    df = _first(df, report, "movie_with_negative_id", number < 0)
    out = df.select(
        number.cast(pl.String).alias("item_id"),  # "007" is movie 7, as in ratings.dat
        pl.col("title").str.strip_chars(" \t\r"),
        pl.lit("").alias("text"),
        pl.col("genres").str.strip_chars(" \t\r").str.replace_all(r"\|", ", ").alias("categories"),
    )
    return out, lines.height


def _posters(folder: Path, item_ids: set[str], report: Report) -> pl.DataFrame:
    """One image per movie: posters/<MovieID>.<ext>; files of unknown movies are reported."""
    rows: dict[str, str] = {}
    orphans: list[str] = []
    try:
        entries = sorted(folder.iterdir()) if folder.is_dir() else []
    except OSError as e:
        report.add("posters_folder_unreadable", "dropped", 1, f"{folder}: {e.strerror or e}")
        entries = []
    for f in entries:
        if f.suffix.lower() not in POSTER_SUFFIXES:
            continue
        # Not a regular file (a directory, a dangling link): kept, the image stage gives it
        # a status (`unreadable` / `missing`) and a report row.
        if f.stem in item_ids and f.stem not in rows:
            rows[f.stem] = str(f.resolve())
        else:
            orphans.append(f.name)
    report.add("poster_of_unknown_movie", "dropped", len(orphans), orphans[0] if orphans else "")
    report.add(
        "movie_without_poster",
        "info",
        len(item_ids - rows.keys()),
        next(iter(sorted(item_ids - rows.keys())), ""),
    )
    return pl.DataFrame(
        {"item_id": list(rows), "image_idx": [0] * len(rows), "uri": list(rows.values())},
        schema={"item_id": pl.String, "image_idx": pl.Int32, "uri": pl.String},
    )
