"""Property tests over the source adapters (issue 12): Hypothesis writes hostile files in each
supported layout (MovieLens .dat, generic CSV / TSV / Parquet, Amazon JSON lines) and checks

- no traceback: the adapter either reads the files or raises SourceError (a one-line error);
  through `msm4sr ingest` the command exits 0, or 2 with one `error:` line;
- nothing disappears: rows read = rows landed + rows in dropped report rows, for the
  interactions and the items, in memory and in the warehouse (data_report of the run).

Bounded (max_examples, no per-example deadline, derandomized, no shrinking) so CI stays well
under its 30-minute budget; the warehouse variant runs fewer examples (each is a real ingest).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory

import polars as pl
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from features import store
from features.store import WarehouseConfig
from pipeline.preprocess import preprocess
from pipeline.sources.amazon import read_amazon
from pipeline.sources.base import (
    INTERACTION_DROPS,
    ITEM_DROPS,
    RawSource,
    SourceError,
    dropped_interactions,
    dropped_items,
    is_blank,
)
from pipeline.sources.generic import ColumnMap, read_generic
from pipeline.sources.movielens import read_movielens
from tests.cli_run import msm4sr, one_line_error

FAST = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    # No shrinking: a failure is reported at once (shrinking these files can take minutes);
    # the failing files are printed in full (Written's fields and the drawn values).
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
IN_WAREHOUSE = settings(FAST, max_examples=5)

# ------------------------------------------------------------------ hostile values

CONTROL = st.sampled_from(["\x00", "\x01", "\x1b", "\x1f", "\x7f", "\x85", "\x0b", "\x0c", "\r"])
NASTY_TEXT = st.lists(
    st.one_of(
        st.characters(codec="utf-8", exclude_characters="\n"),
        CONTROL,
        st.sampled_from(["::", ",", '"', "\t", "Ã©", "Â®", "\ufffd", "\u2028", "|", " "]),
    ),
    max_size=8,
).map("".join)
NUMBERS = st.one_of(
    st.integers(-10, 10),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
)
TIMESTAMPS = st.one_of(
    st.integers(0, 4_000_000_000),
    st.integers(1_000_000_000_000, 1_700_000_000_000),  # milliseconds
    st.integers(-(2**40), 2**70),
)
ITEMS = [str(i) for i in range(1, 9)]


def hostile(valid: st.SearchStrategy, p_valid: float = 0.5) -> st.SearchStrategy:
    """The valid value with probability about p_valid, else a hostile one of any kind."""
    bad = st.one_of(NASTY_TEXT, NUMBERS.map(str), st.just(""))
    return st.tuples(st.floats(0, 1), valid, bad).map(lambda t: t[1] if t[0] < p_valid else t[2])


@st.composite
def with_shape_noise(draw: st.DrawFn, rows: list[list[str]]) -> list[list[str]]:
    """Some of the noise rows lose or gain a field."""
    out = []
    for row in rows:
        kind = draw(st.sampled_from(["same"] * 8 + ["short", "long"]))
        out.append(row[:-1] if kind == "short" else [*row, "extra"] if kind == "long" else row)
    return out


@st.composite
def valid_rows(draw: st.DrawFn, user: int) -> list[list[str]]:
    """Six ratings of six different items: a user that survives preprocessing."""
    items = draw(st.permutations(ITEMS))[:6]
    stamps = draw(st.lists(st.integers(900_000_000, 1_000_000_000), min_size=6, max_size=6))
    ratings = draw(st.lists(st.integers(1, 5), min_size=6, max_size=6))
    return [[str(user), i, str(r), str(t)] for i, r, t in zip(items, ratings, stamps, strict=True)]


def rows_of(n_users: int, shape_noise: bool = False) -> st.SearchStrategy[list[list[str]]]:
    """Interaction rows: six valid ones per user (so most examples keep data), then noise
    (with shape_noise, noise rows may lose or gain a field)."""
    base = st.tuples(*[valid_rows(u) for u in range(1, n_users + 1)])
    noise = st.lists(
        st.tuples(
            hostile(st.integers(1, n_users).map(str)),
            hostile(st.sampled_from(ITEMS)),
            hostile(st.integers(1, 5).map(str)),
            hostile(TIMESTAMPS.map(str)),
        ).map(list),
        max_size=12,
    )
    if shape_noise:
        noise = noise.flatmap(with_shape_noise)
    return st.tuples(base, noise).map(lambda t: [row for rows in t[0] for row in rows] + t[1])


# ------------------------------------------------------------------ the checks


@dataclass
class Written:
    """Hostile files on disk and what the generator knows about them."""

    read: Callable[[], RawSource]
    cli: list[str]  # `msm4sr` arguments reading the same files (dataset name appended)
    n_interactions: int  # rows of the interactions input (blank lines excluded)
    n_items: int  # rows of the items input


def check_in_memory(w: Written) -> None:
    try:
        raw = w.read()
    except SourceError as e:
        event("refused: SourceError")
        assert str(e) and "\n" not in str(e).strip()
        return
    assert (raw.n_read_interactions, raw.n_read_items) == (w.n_interactions, w.n_items)
    items, inter = preprocess(raw)
    event("read: some interactions kept" if inter.height else "read: no interaction kept")
    event(f"read: {'some' if dropped_interactions(raw.report) else 'no'} interaction dropped")
    assert w.n_interactions == inter.height + dropped_interactions(raw.report), raw.report
    assert w.n_items == items.height + dropped_items(raw.report), raw.report


def check_in_warehouse(w: Written, wh: Path, dataset: str) -> None:
    res = msm4sr("ingest", *w.cli, "--dataset", dataset)
    if res.exit_code != 0:
        one_line_error(res)
        return
    cfg = WarehouseConfig(root=wh, attach=None, data_path=None)
    with store.connect(cfg, create=False, read_only=True) as con:
        n_inter, n_items = con.execute(
            "SELECT (SELECT count(*) FROM interactions WHERE dataset = $1), "
            "(SELECT count(*) FROM items WHERE dataset = $1)",
            [dataset],
        ).fetchone()
        report = con.execute(
            "SELECT check_name, action, n FROM data_report WHERE dataset = ? AND stage = 'ingest'",
            [dataset],
        ).fetchall()
    drops = {c: n for c, a, n in report if a == "dropped"}
    inter_drops = sum(
        n for c, n in drops.items() if c in INTERACTION_DROPS or c.startswith("user_below_")
    )
    assert w.n_interactions == n_inter + inter_drops, report
    assert w.n_items == n_items + sum(n for c, n in drops.items() if c in ITEM_DROPS), report


@pytest.fixture
def warehouse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One warehouse per layout; each example ingests a dataset of its own into it."""
    monkeypatch.setenv("MSM4SR_WAREHOUSE", str(tmp_path / "wh"))
    return tmp_path / "wh"


_counter = iter(range(10**9))


def dataset_name() -> str:
    return f"hyp{next(_counter)}"


# ------------------------------------------------------------------ layouts


def _bytes_with_bad_utf8(text: str, bad: bool) -> bytes:
    data = text.encode("utf-8")
    return data.replace(b"5", b"5\xff", 1) if bad else data


@st.composite
def movielens_files(draw: st.DrawFn, root: Path) -> Written:
    rows = draw(rows_of(draw(st.integers(1, 3)), shape_noise=True))
    lines = ["::".join(r) for r in rows]
    lines += draw(st.lists(NASTY_TEXT, max_size=4)) + draw(
        st.lists(st.sampled_from(["", "  ", "\r"]), max_size=3)
    )
    lines = draw(st.permutations(lines))
    movies = [
        f"{draw(hostile(st.just(i), 0.9))}::{draw(hostile(st.just(f'Movie {i} (1999)')))}::Drama"
        for i in ITEMS
    ] + draw(st.lists(NASTY_TEXT, max_size=3))
    root.mkdir(parents=True, exist_ok=True)
    (root / "ratings.dat").write_bytes(_bytes_with_bad_utf8("\n".join(lines), draw(st.booleans())))
    (root / "movies.dat").write_bytes("\n".join(movies).encode("latin-1", "replace"))
    movie_lines = (root / "movies.dat").read_bytes().decode("latin-1").split("\n")
    return Written(
        read=lambda: read_movielens(root, "ml"),
        cli=["movielens", str(root)],
        n_interactions=sum(not is_blank(ln) for ln in lines),
        n_items=sum(not is_blank(ln) for ln in movie_lines),
    )


def _items_rows(draw: st.DrawFn) -> list[list[str]]:
    rows = [[draw(hostile(st.just(i), 0.9)), draw(hostile(st.just(f"Item {i}")))] for i in ITEMS]
    return rows + draw(st.lists(st.lists(NASTY_TEXT, min_size=1, max_size=3), max_size=3))


@st.composite
def delimited_files(draw: st.DrawFn, root: Path, sep: str) -> Written:
    """Generic CSV (written by the csv module: quoting is right, values are hostile) or TSV
    (no quoting: a tab or newline inside a value makes its own fields / lines)."""
    rows = draw(rows_of(draw(st.integers(1, 3)), shape_noise=True))
    items = _items_rows(draw)
    root.mkdir(parents=True, exist_ok=True)
    header = ["user_id", "item_id", "rating", "timestamp"]
    if sep == ",":
        n_inter, inter_text = _write_csv(header, rows, draw(st.integers(0, 3)))
        n_items, items_text = _write_csv(["id", "title"], items, 0)
        ext = "csv"
    else:
        inter_lines = ["\t".join(r).replace("\n", " ") for r in [header, *rows]]
        item_lines = ["\t".join(r).replace("\n", " ") for r in [["id", "title"], *items]]
        inter_text, items_text = "\n".join(inter_lines) + "\n", "\n".join(item_lines) + "\n"
        n_inter = sum(not is_blank(ln) for ln in inter_lines[1:])
        n_items = sum(not is_blank(ln) for ln in item_lines[1:])
        ext = "tsv"
    inter, item_file = root / f"inter.{ext}", root / f"items.{ext}"
    inter.write_bytes(_bytes_with_bad_utf8(inter_text, draw(st.booleans())))
    item_file.write_text(items_text)
    cols = ColumnMap(rating="rating", item_key="id", rating_max=5)
    return Written(
        read=lambda: read_generic(inter, item_file, "gen", cols),
        cli=[
            "generic",
            str(inter),
            str(item_file),
            "--rating-col",
            "rating",
            "--item-key-col",
            "id",
            "--rating-max",
            "5",
        ],
        n_interactions=n_inter,
        n_items=n_items,
    )


def _write_csv(header: list[str], rows: list[list[str]], blank_lines: int) -> tuple[int, str]:
    """CSV text of header + rows (+ empty lines, which are not rows); the number of rows."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r in rows:
        w.writerow(r)
    text = buf.getvalue() + "\r\n" * blank_lines
    # a record of one empty field is written as '""' (a row), never as an empty line
    return len(rows), text


PARQUET_TIMES = st.one_of(
    TIMESTAMPS.map(lambda v: pl.Series("timestamp", [v], dtype=pl.Float64)),
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1)).map(
        lambda d: pl.Series("timestamp", [d.replace(tzinfo=UTC)])
    ),
    NASTY_TEXT.map(lambda s: pl.Series("timestamp", [s])),
)


@st.composite
def parquet_files(draw: st.DrawFn, root: Path) -> Written:
    n_users = draw(st.integers(1, 3))
    rows = draw(rows_of(n_users))
    kinds = draw(
        st.fixed_dictionaries(
            {
                "user_id": st.sampled_from(["int", "float", "str", "int", "str", "list"]),
                "timestamp": st.sampled_from(
                    ["int", "datetime", "date", "str", "int", "datetime", "str", "bool"]
                ),
            }
        )
    )
    users = [_num(r[0]) for r in rows]
    if kinds["user_id"] == "int":
        user = pl.Series(
            "user_id",
            [
                int(u) if u is not None and u.is_integer() and abs(u) < 2**62 else None
                for u in users
            ],
            dtype=pl.Int64,
        )
    elif kinds["user_id"] == "float":
        user = pl.Series("user_id", users, dtype=pl.Float64)
    elif kinds["user_id"] == "list":
        user = pl.Series("user_id", [[1]] * len(rows))
    else:
        user = pl.Series("user_id", [r[0] for r in rows])
    ts_num = [_num(r[3]) for r in rows]
    if kinds["timestamp"] == "int":
        ts = pl.Series(
            "timestamp",
            [
                int(t) if t is not None and t.is_integer() and abs(t) < 2**62 else None
                for t in ts_num
            ],
            dtype=pl.Int64,
        )
    elif kinds["timestamp"] in ("datetime", "date"):
        ts = pl.Series("timestamp", [_datetime(t) for t in ts_num], dtype=pl.Datetime("us", "UTC"))
        if kinds["timestamp"] == "date":
            ts = ts.dt.date()
    elif kinds["timestamp"] == "bool":
        ts = pl.Series("timestamp", [True] * len(rows))
    else:
        ts = pl.Series("timestamp", [r[3] for r in rows])
    df = pl.DataFrame(
        [
            user,
            pl.Series("item_id", [r[1] for r in rows]),
            ts,
            pl.Series("rating", [r[2] for r in rows]),
        ]
    )
    root.mkdir(parents=True, exist_ok=True)
    inter = root / "inter.parquet"
    df.write_parquet(inter)
    items = _items_rows(draw)
    n_items, items_text = _write_csv(["id", "title"], items, 0)
    item_file = root / "items.csv"
    item_file.write_text(items_text)
    cols = ColumnMap(rating="rating", item_key="id", rating_max=5)
    return Written(
        read=lambda: read_generic(inter, item_file, "pq", cols),
        cli=[
            "generic",
            str(inter),
            str(item_file),
            "--rating-col",
            "rating",
            "--item-key-col",
            "id",
            "--rating-max",
            "5",
        ],
        n_interactions=df.height,
        n_items=n_items,
    )


def _num(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _datetime(t: float | None) -> datetime | None:
    if t is None or not -(10**10) < t < 10**11:
        return None
    return datetime.fromtimestamp(t, UTC)


@st.composite
def amazon_files(draw: st.DrawFn, root: Path) -> Written:
    layout = draw(st.sampled_from(["2014", "2018", "2023"]))
    user_key, item_key = ("user_id", "parent_asin") if layout == "2023" else ("reviewerID", "asin")
    ts_key = "timestamp" if layout == "2023" else "unixReviewTime"
    json_value = st.one_of(
        NASTY_TEXT, NUMBERS, st.none(), st.booleans(), st.lists(st.integers(), max_size=2)
    )
    reviews = []
    for user, item, rating, ts in draw(rows_of(draw(st.integers(1, 3)))):
        number = _num(ts)
        scale = 1000 if layout == "2023" else 1  # 2023 reviews carry milliseconds
        rec = {
            user_key: user,
            item_key: item,
            "overall": _num(rating) or rating,
            ts_key: number * scale if number is not None else ts,
        }
        if draw(st.floats(0, 1)) < 0.15:
            rec[draw(st.sampled_from([user_key, item_key, "overall", ts_key]))] = draw(json_value)
        reviews.append(json.dumps(rec))
    reviews += draw(
        st.lists(st.sampled_from(["not json", "[1, 2]", "{'a': 1", "", "  ", "null"]), max_size=4)
    )
    metas = []
    for i in ITEMS:
        rec = {
            item_key: draw(hostile(st.just(i), 0.9)),
            "title": draw(hostile(st.just(f"Item {i}"))),
        }
        rec |= draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "categories": json_value,
                    "description": json_value,
                    "imageURL": json_value,
                    "brand": json_value,
                },
            )
        )
        metas.append(repr(rec) if layout == "2014" else json.dumps(rec))
    metas += draw(st.lists(st.sampled_from(["{", "{'title': 'no id'}", "[]", ""]), max_size=3))
    root.mkdir(parents=True, exist_ok=True)
    rev, met = root / "reviews.jsonl.gz", root / "meta.jsonl"
    rev.write_bytes(gzip.compress("\n".join(reviews).encode("utf-8", "replace")))
    met.write_text("\n".join(metas), encoding="utf-8", errors="replace")
    return Written(
        read=lambda: read_amazon(rev, met, "amz"),
        cli=["amazon", str(rev), str(met)],
        n_interactions=sum(not is_blank(ln) for ln in reviews),
        n_items=sum(not is_blank(ln) for ln in met.read_text(encoding="utf-8").split("\n")),
    )


# ------------------------------------------------------------------ the properties

LAYOUTS: dict[str, Callable[[Path], st.SearchStrategy[Written]]] = {
    "movielens": movielens_files,
    "csv": lambda root: delimited_files(root, ","),
    "tsv": lambda root: delimited_files(root, "\t"),
    "parquet": parquet_files,
    "amazon": amazon_files,
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_adapters_read_hostile_files_without_losing_rows(layout: str) -> None:
    @FAST
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        with TemporaryDirectory() as d:
            check_in_memory(data.draw(LAYOUTS[layout](Path(d))))

    run()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_msm4sr_ingest_of_hostile_files_lands_or_reports_every_row(
    layout: str, warehouse: Path
) -> None:
    @IN_WAREHOUSE
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        with TemporaryDirectory() as d:
            check_in_warehouse(data.draw(LAYOUTS[layout](Path(d))), warehouse, dataset_name())

    run()
