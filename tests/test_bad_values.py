"""Issue 12, cases 5 and 9: a control byte in ratings.dat, negative ids, ratings of 99 or -3,
timestamps before 1970, and titles with control characters or undecoded mojibake, in a real
MovieLens cut with hostile lines added: each becomes a report row (dropped or repaired), the
rest of the data lands, and the stored titles are the repaired ones."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from features import store
from features.store import WarehouseConfig
from pipeline.ingest import ingest
from pipeline.sources.amazon import read_amazon
from pipeline.sources.generic import ColumnMap, read_generic
from pipeline.sources.movielens import read_movielens
from tests.cli_run import ok
from tests.ml_cut import write_ml_cut

HOSTILE_RATINGS = {
    "rating_line_with_control_bytes": ["1::1::4\x1f::978300760", "1::2::4::97830\x000760"],
    "rating_with_negative_id": ["-5::1::4::978300760", "1::-2::4::978300760"],
    "rating_out_of_range": ["1::3::99::978300760", "1::4::-3::978300760", "1::5::0::978300760"],
    "timestamp_out_of_range": ["1::6::4::-100", "1::7::4::99999999999"],
    "unparseable_rating_line": ["1::8::4", "1::9::4::978300760::extra"],
}


def hostile_cut(root: Path) -> Path:
    src = write_ml_cut(root, range(1, 21), max_ratings=600)
    with open(src / "ratings.dat", "a") as f:
        for lines in HOSTILE_RATINGS.values():
            f.write("".join(ln + "\n" for ln in lines))
    with open(src / "movies.dat", "ab") as f:
        f.write(b"9001::Caf\xc3\xa9 Society (1995)::Drama\n")  # UTF-8 in a latin-1 file
        f.write(b"9002::Bad\x01Title\x1f (1999)::Comedy\n")
        f.write(b"-7::Negative (1999)::Drama\n")
    return src


def test_control_bytes_negative_ids_and_out_of_range_values_are_report_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MSM4SR_WAREHOUSE", str(tmp_path / "wh"))
    clean = write_ml_cut(tmp_path / "clean", range(1, 21), max_ratings=600)
    out_clean = ok("ingest", "movielens", str(clean), "--dataset", "clean")
    out = ok("ingest", "movielens", str(hostile_cut(tmp_path / "ml")), "--dataset", "hostile")
    assert "Traceback" not in out
    wh = WarehouseConfig(root=tmp_path / "wh", attach=None, data_path=None)
    with store.connect(wh, create=False, read_only=True) as con:
        report = dict(
            con.execute(
                "SELECT check_name, n FROM data_report r JOIN pipeline_runs p USING (run_id) "
                "WHERE p.dataset = 'hostile'"
            ).fetchall()
        )
        n = dict(con.execute("SELECT dataset, count(*) FROM interactions GROUP BY 1").fetchall())
        stored = con.execute(
            "SELECT count(*) FROM interactions WHERE dataset = 'hostile' AND (rating NOT "
            "BETWEEN 1 AND 5 OR ts < 0 OR user_id LIKE '-%' OR item_id LIKE '-%')"
        ).fetchone()[0]
    for check, lines in HOSTILE_RATINGS.items():
        assert report[check] == len(lines), check
    assert report["movie_with_negative_id"] == 1
    assert n["hostile"] == n["clean"] and stored == 0  # the rest landed, nothing bad did
    assert "rating_line_with_control_bytes" not in out_clean


def test_titles_with_control_characters_and_mojibake_are_repaired_and_reported(
    tmp_path: Path, wh: WarehouseConfig
) -> None:
    summary = ingest(read_movielens(hostile_cut(tmp_path / "ml"), "hostile"), wh, progress=False)
    report = {r["check_name"]: r for r in summary.report}
    assert report["title_mojibake_repaired"]["n"] == 1
    assert report["title_control_chars_removed"]["n"] == 1
    assert "\\x01" in report["title_control_chars_removed"]["example"]  # printable example
    with store.connect(wh, create=False, read_only=True) as con:
        titles = dict(
            con.execute("SELECT item_id, title FROM items WHERE item_id LIKE '900%'").fetchall()
        )
        bad = con.execute(
            "SELECT count(*) FROM items WHERE regexp_matches(title, '[\\x00-\\x1f\\x7f]') "
            "OR title LIKE '%Ã%'"
        ).fetchone()[0]
    assert titles == {"9001": "Café Society (1995)", "9002": "Bad Title  (1999)"}
    assert bad == 0


def test_generic_and_amazon_ratings_out_of_range_are_report_rows(tmp_path: Path) -> None:
    inter = tmp_path / "inter.csv"
    rows = [f"u{u},i{k},{1000 + k},{(k % 5) + 1}" for u in range(3) for k in range(6)]
    rows += ["u9,i1,1000,99", "u9,i2,1000,-3", "u9,i3,1000,abc", "u9,i4,1000,", "u9,i5,-5,3"]
    inter.write_text("user_id,item_id,timestamp,rating\n" + "\n".join(rows) + "\n")
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\n" + "".join(f"i{k},Item {k}\n" for k in range(6)))
    cols = ColumnMap(rating="rating", rating_max=5)
    raw = read_generic(inter, items, "gen", cols)
    checks = {r.check_name: r.n for r in raw.report.rows}
    assert checks["rating_out_of_range"] == 2 and checks["unparseable_rating"] == 1
    assert checks["timestamp_out_of_range"] == 1 and checks["interaction_without_rating"] == 1
    assert "column 'rating'" in next(
        r.example for r in raw.report.rows if r.check_name == "unparseable_rating"
    )
    assert raw.interactions.height == 19 and raw.interactions["rating"].drop_nulls().max() <= 5

    import gzip
    import json

    reviews = [
        {"reviewerID": "U1", "asin": "A1", "overall": 99, "unixReviewTime": 1_400_000_000},
        {"reviewerID": "U1", "asin": "A2", "overall": -3, "unixReviewTime": 1_400_000_000},
        {"reviewerID": "U1", "asin": "A3", "overall": "five", "unixReviewTime": 1_400_000_000},
        {"reviewerID": ["U1"], "asin": "A4", "overall": 4, "unixReviewTime": 1_400_000_000},
        {"reviewerID": "U1", "asin": "A5", "overall": 4, "unixReviewTime": "soon"},
        {"reviewerID": "U1", "asin": "A5", "overall": 4, "unixReviewTime": 1_400_000_000},
    ]
    rev, met = tmp_path / "reviews.json.gz", tmp_path / "meta.json.gz"
    rev.write_bytes(gzip.compress("\n".join(map(json.dumps, reviews)).encode()))
    met.write_bytes(gzip.compress(b'{"asin": "A5", "title": "Tape"}\n{"title": "no id"}\n'))
    raw = read_amazon(rev, met, "amz")
    checks = {r.check_name: r.n for r in raw.report.rows}
    assert checks == {
        "rating_out_of_range": 2,
        "unparseable_rating": 1,
        "review_without_user_item_or_time": 2,
        "meta_without_item_id": 1,
    }
    assert raw.interactions.select(pl.len()).item() == 1 and raw.items.height == 1
