"""Source adapters on tiny files in the real layouts, bad input included, and the preprocessing
of PAPER.md section 5. Every drop or repair must show up in the report."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import polars as pl
import pytest

from features import contract, store
from features.store import WarehouseConfig
from pipeline.ingest import ingest
from pipeline.preprocess import preprocess
from pipeline.sources.amazon import read_amazon
from pipeline.sources.base import SourceError
from pipeline.sources.generic import ColumnMap, read_generic
from pipeline.sources.movielens import read_movielens
from tests.helpers import http_server, jpeg_bytes, write_movielens


def ml_fixture(root: Path) -> Path:
    ratings = [f"1::{m}::4::{100 + m}" for m in (1, 2, 3, 4, 5)]  # user 1: 5 ratings
    ratings += [f"2::{m}::3::{200 + m}" for m in (1, 2, 3)]  # user 2: 3 ratings -> dropped
    ratings += [
        "garbage line without separators",
        "3::1::five::300",  # non-numeric rating
        "3::2::4",  # too few fields
    ]
    ratings += [f"3::{m}::5::{300 + m}" for m in (1, 2, 3, 4)] + [
        "3::1::2::999"
    ]  # dup (3,1): last wins
    ratings += ["3::5::4::301", "3::6::4::301"]  # a timestamp tie: source order decides
    movies = [
        b"1::Toy Story (1995)::Animation|Children's|Comedy",
        "2::Cité des enfants perdus, La (1995)::Adventure|Sci-Fi".encode("latin-1"),
        b"3::Heat (1995)::Action|Crime|Thriller",
        b"4::Sabrina (1995)::Comedy|Romance",
        b"5::Nixon (1995)::Drama",
        b"6::Casino (1995)::Drama|Thriller",
        b"not a movie line",
    ]
    good = jpeg_bytes()
    posters = {
        "1.jpg": good,
        "2.jpg": b"",  # zero bytes
        "3.jpg": good[: len(good) // 2],  # truncated JPEG
        "99.jpg": good,  # no such movie
    }
    return write_movielens(root, ratings, movies, posters)


def test_movielens_bad_input_is_reported_and_the_rest_lands(
    tmp_path: Path, wh: WarehouseConfig
) -> None:
    raw = read_movielens(ml_fixture(tmp_path / "ml"), "ml-tiny")
    summary = ingest(raw, wh, progress=False)
    report = {r["check_name"]: r for r in summary.report}
    assert report["unparseable_rating_line"]["n"] == 3
    assert report["unparseable_movie_line"]["n"] == 1
    assert report["duplicate_interaction"]["n"] == 1
    assert report["user_below_5_interactions"]["n"] == 3  # user 2's three ratings
    assert report["poster_of_unknown_movie"]["example"] == "99.jpg"
    assert report["image_corrupt"]["n"] == 2  # zero-byte + truncated
    assert summary.images_by_status == {"ok": 1, "corrupt": 2}
    with store.connect(wh) as con:
        inter = store.read_polars(con, "interactions", where="dataset = 'ml-tiny'").sort(
            "user_id", "seq"
        )
        items = store.read_polars(con, "items").sort("item_id")
        imgs = store.read_polars(con, "item_images").sort("item_id")
        runs = store.read_table(con, "pipeline_runs").num_rows
        rep = store.read_table(con, "data_report").num_rows
    assert set(inter["user_id"]) == {"1", "3"}
    u3 = inter.filter(pl.col("user_id") == "3")
    # 5 and 6 share ts 301 (source order decides); duplicate (3, 1) keeps the last (ts 999)
    assert u3["item_id"].to_list() == ["5", "6", "2", "3", "4", "1"]
    assert u3["seq"].to_list() == list(range(6))
    assert u3.filter(pl.col("item_id") == "1")["rating"][0] == 2.0
    assert (
        items.filter(pl.col("item_id") == "2")["title"][0] == "Cité des enfants perdus, La (1995)"
    )
    assert items["n_images"].to_list() == [1, 0, 0, 0, 0, 0]
    assert (
        imgs.filter(pl.col("status") == "corrupt")["error"].to_list()[0] == "empty file (0 bytes)"
    )
    assert (runs, rep) == (1, len(summary.report))


def test_reingest_of_same_files_changes_no_data(tmp_path: Path, wh: WarehouseConfig) -> None:
    folder = ml_fixture(tmp_path / "ml")
    ingest(read_movielens(folder, "ml-tiny"), wh, progress=False)
    with store.connect(wh) as con:
        before = store.snapshot_id(con)
    again = ingest(read_movielens(folder, "ml-tiny"), wh, progress=False)
    assert again.rows_changed == {"items": 0, "interactions": 0, "item_images": 0}
    with store.connect(wh) as con:
        changes = con.execute(
            "SELECT changes FROM lake.snapshots() WHERE snapshot_id > ?", [before]
        ).fetchall()
    # one snapshot, and it only logged the run (and bumped the write guards of the run tables)
    assert len(changes) == 1
    touched = {v for c in changes for vals in c[0].values() for v in vals}
    with store.connect(wh) as con:
        ids = dict(
            con.execute(
                "SELECT table_name, table_id FROM __ducklake_metadata_lake.ducklake_table "
                "WHERE end_snapshot IS NULL"
            ).fetchall()
        )
    logged = {str(ids[t]) for t in ("pipeline_runs", "data_report", contract.WRITE_GUARDS.name)}
    assert touched and touched <= logged and str(ids["pipeline_runs"]) in touched


def test_generic_items_with_duplicates_and_invalid_utf8(
    tmp_path: Path, wh: WarehouseConfig
) -> None:
    inter = tmp_path / "inter.csv"
    inter.write_text(
        "user,item,time\n"
        + "".join(f"u{u},i{k},{k}\n" for u in (1, 2) for k in range(5))
        + "u1,i9,x\nu1,ghost,7\n"
    )
    items = tmp_path / "items.tsv"
    items.write_bytes(
        b"id\ttitle\n"
        + b"".join(f"i{k}\tItem {k}\n".encode() for k in range(5))
        + b"i0\tDuplicate of i0\n"
        + b"i9\tBad \xff\xfe bytes here\n"
        + b"too\tmany\tfields\n"
    )
    cols = ColumnMap(user="user", item="item", ts="time", item_key="id", title="title")
    summary = ingest(read_generic(inter, items, "gen", cols), wh, progress=False)
    report = {r["check_name"]: r["n"] for r in summary.report}
    assert report["duplicate_item_id"] == 1
    assert report["invalid_utf8_bytes"] == 1
    assert report["item_text_with_replaced_bytes"] == 1
    assert report["ragged_items_line"] == 1
    assert report["unparseable_timestamp"] == 1  # ts "x"
    assert report["interaction_with_unknown_item"] == 1  # "ghost"
    assert summary.n_items == 6 and summary.n_interactions == 10
    with store.connect(wh) as con:
        title = con.execute("SELECT title FROM items WHERE item_id = 'i0'").fetchone()[0]
        bad = con.execute("SELECT title FROM items WHERE item_id = 'i9'").fetchone()[0]
    assert title == "Item 0"  # the first of duplicate ids is kept
    assert "\ufffd" in bad and bad.startswith("Bad ")


def test_generic_reads_amazon_office(wh: WarehouseConfig) -> None:
    from pipeline.sources.generic import OFFICE
    from tests.conftest import OFFICE as OFFICE_DIR
    from tests.conftest import require

    d = require(OFFICE_DIR)
    raw = read_generic(d / "interactions.csv", d / "items.tsv", "amazon-office", OFFICE)
    items, inter = preprocess(raw)
    assert (items.height, inter.height, inter["user_id"].n_unique()) == (2420, 53258, 4905)
    assert raw.images.height == 0


def _jsonl_gz(path: Path, rows: list[dict], literal: bool = False) -> Path:
    text = "\n".join(repr(r) if literal else json.dumps(r) for r in rows) + "\n"
    path.write_bytes(gzip.compress(text.encode()))
    return path


def _reviews(
    n_users: int, items: list[str], key_user: str, key_item: str, ts_key: str, scale: int = 1
) -> list[dict]:
    return [
        {key_user: f"U{u}", key_item: it, "overall": 5.0, ts_key: (1_400_000_000 + 10 * k) * scale}
        for u in range(n_users)
        for k, it in enumerate(items)
    ]


def test_amazon_2014_with_image_urls_including_a_404(tmp_path: Path, wh: WarehouseConfig) -> None:
    items = ["A1", "A2", "A3", "A4", "A5"]
    with http_server(
        {"/a1.jpg": ("ok", jpeg_bytes()), "/a2.jpg": ("ok", jpeg_bytes(color=(0, 9, 0)))}
    ) as (base, _):
        meta = [
            {
                "asin": "A1",
                "title": "Stapler",
                "imUrl": f"{base}/a1.jpg",
                "categories": [["Office Products", "Staplers"]],
                "brand": "Swingline",
            },
            {
                "asin": "A2",
                "title": "Pen <b>blue</b>",
                "description": "A <i>fine</i> pen.",
                "imUrl": f"{base}/a2.jpg",
            },
            {"asin": "A3", "title": "Paper", "imUrl": f"{base}/missing.jpg"},
            {"asin": "A4", "title": "Clip"},
            {"asin": "A5", "title": "Tape"},
        ]
        rev = _jsonl_gz(
            tmp_path / "reviews_Office_Products_5.json.gz",
            _reviews(2, items, "reviewerID", "asin", "unixReviewTime"),
        )
        met = _jsonl_gz(tmp_path / "meta_Office_Products.json.gz", meta, literal=True)
        summary = ingest(read_amazon(rev, met, "amz14"), wh, progress=False)
    assert summary.n_interactions == 10 and summary.images_by_status == {"ok": 2, "missing": 1}
    with store.connect(wh) as con:
        a2 = con.execute("SELECT title, text, categories FROM items WHERE item_id='A2'").fetchone()
        a1 = con.execute("SELECT categories FROM items WHERE item_id='A1'").fetchone()[0]
        err = con.execute("SELECT error FROM item_images WHERE status='missing'").fetchone()[0]
    assert a2[:2] == ("Pen blue", "A fine pen.")  # HTML stripped
    assert a1 == "Office Products, Staplers, Swingline"
    assert err == "HTTP 404"


def test_amazon_2018_and_2023_layouts(tmp_path: Path) -> None:
    items = ["B1", "B2", "B3", "B4", "B5"]
    meta18 = [
        {
            "asin": i,
            "title": f"T{i}",
            "description": ["d1", "d2"],
            "category": ["Office"],
            "imageURLHighRes": ["http://x/1.jpg", "http://x/2.jpg"],
        }
        for i in items
    ]
    r18 = read_amazon(
        _jsonl_gz(
            tmp_path / "reviews18.json.gz",
            _reviews(1, items, "reviewerID", "asin", "unixReviewTime"),
        ),
        _jsonl_gz(tmp_path / "meta18.json.gz", meta18),
        "amz18",
    )
    assert r18.images.height == 10 and r18.images["image_idx"].to_list()[:2] == [0, 1]
    assert r18.items["text"][0] == "d1 d2"
    meta23 = [
        {
            "parent_asin": i,
            "title": f"T{i}",
            "images": [{"large": "http://x/l.jpg", "hi_res": None}],
            "store": "Acme",
        }
        for i in items
    ]
    r23 = read_amazon(
        _jsonl_gz(
            tmp_path / "Office.jsonl.gz",
            _reviews(1, items, "user_id", "parent_asin", "timestamp", scale=1000),
        ),
        _jsonl_gz(tmp_path / "meta_Office.jsonl.gz", meta23),
        "amz23",
    )
    assert r23.interactions["ts"].to_list()[0] == 1_400_000_000  # milliseconds -> seconds
    assert r23.images["uri"].to_list()[0] == "http://x/l.jpg"
    assert r23.items["categories"][0] == "Acme"


def test_clear_errors_for_wrong_layouts(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not a folder"):
        read_movielens(tmp_path / "nope")
    (tmp_path / "ml").mkdir()
    with pytest.raises(SourceError, match="MovieLens ratings not found"):
        read_movielens(tmp_path / "ml")
    f = tmp_path / "i.csv"
    f.write_text("a,b\n1,2\n")
    with pytest.raises(SourceError, match="no column 'user_id'"):
        read_generic(f, f, "x")
