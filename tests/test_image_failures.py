"""Issue 12, cases 3 and 4: a server that drips one byte at a time cannot hold an ingest (a
total deadline per image, connect + body + retries), and an unreadable poster is a status and a
report row while everything else lands, in `msm4sr ingest` and in the features flow."""

from __future__ import annotations

import builtins
import io
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from features import store
from features.contract import IMAGE_MISSING, IMAGE_OK
from features.store import WarehouseConfig
from pipeline.images import ImageConfig, fetch_one
from pipeline.ingest import ingest
from pipeline.sources.amazon import read_amazon
from pipeline.sources.movielens import read_movielens
from tests.cli_run import ok
from tests.helpers import http_server, jpeg_bytes, write_movielens
from tests.ml_cut import write_ml_cut

# features.contract.IMAGE_UNREADABLE, spelled out so this file also runs on an older checkout
IMAGE_UNREADABLE = "unreadable"
DRIP = ("drip", 200, 0.3)  # 200 bytes at one per 0.3 s: 60 s, never a read timeout


def test_a_dripping_server_is_cut_at_the_deadline(tmp_path: Path) -> None:
    cfg = ImageConfig(timeout_s=5.0, deadline_s=1.5, retries=2, backoff_s=0.05)
    with http_server({"/drip.jpg": DRIP}) as (base, hits):
        t0 = time.monotonic()
        res = fetch_one(f"{base}/drip.jpg", tmp_path / "cache", cfg)
        took = time.monotonic() - t0
        assert hits["/drip.jpg"] == 1  # the deadline covers retries too: none after it
    assert took < 3.5, took
    assert res.status == IMAGE_MISSING and "deadline" in res.error and res.sha256 is None


def test_ingest_with_a_dripping_image_url_finishes_and_lands_the_rest(
    tmp_path: Path, wh: WarehouseConfig
) -> None:
    import gzip
    import json

    items = ["A1", "A2", "A3", "A4", "A5"]
    routes = {f"/{i}.jpg": ("ok", jpeg_bytes(color=(k * 40, 0, 0))) for k, i in enumerate(items)}
    routes["/A3.jpg"] = DRIP
    with http_server(routes) as (base, _):
        meta = [{"asin": i, "title": f"Item {i}", "imUrl": f"{base}/{i}.jpg"} for i in items]
        reviews = [
            {"reviewerID": f"U{u}", "asin": i, "overall": 4.0, "unixReviewTime": 1_400_000_000 + k}
            for u in range(3)
            for k, i in enumerate(items)
        ]
        rev, met = tmp_path / "reviews_Office.json.gz", tmp_path / "meta_Office.json.gz"
        rev.write_bytes(gzip.compress("\n".join(map(json.dumps, reviews)).encode()))
        met.write_bytes(gzip.compress("\n".join(map(json.dumps, meta)).encode()))
        t0 = time.monotonic()
        cfg = ImageConfig(timeout_s=5.0, deadline_s=2.0, backoff_s=0.05)
        summary = ingest(read_amazon(rev, met, "amz"), wh, images=cfg, progress=False)
        assert time.monotonic() - t0 < 30
    assert summary.images_by_status == {IMAGE_OK: 4, IMAGE_MISSING: 1}
    assert summary.n_interactions == 15
    report = {r["check_name"]: r for r in summary.report}
    assert "deadline" in report["image_missing"]["example"]


@pytest.fixture
def unreadable_for_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make a mode-000 file unreadable for root too. Tests run as root here, and root passes
    the kernel's permission check, so `open` is patched at the OS boundary to do that check
    (a regular file without any read bit raises PermissionError, errno 13, as it does for any
    other user); every other open goes through unchanged. Non-root: nothing to patch."""
    if os.geteuid() != 0:
        yield
        return
    real_open = io.open

    def checked_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(file, (str, os.PathLike)) and "r" in mode:
            try:
                st = os.stat(file)
            except OSError:
                st = None
            if st is not None and stat.S_ISREG(st.st_mode) and not st.st_mode & 0o444:
                raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", checked_open)
    monkeypatch.setattr(builtins, "open", checked_open)
    yield


def test_an_unreadable_poster_is_a_status_and_the_rest_lands(
    tmp_path: Path, wh: WarehouseConfig, unreadable_for_root: None
) -> None:
    good = jpeg_bytes()
    ratings = [f"{u}::{m}::4::{1000 * u + m}" for u in (1, 2) for m in range(1, 7)]
    movies = [f"{m}::Movie {m} (1999)::Drama".encode() for m in range(1, 7)]
    posters = {f"{m}.jpg": jpeg_bytes(color=(m * 30, 10, 10)) for m in (1, 3, 4)} | {"2.jpg": good}
    folder = write_movielens(tmp_path / "ml", ratings, movies, posters)
    (folder / "posters" / "2.jpg").chmod(0)
    (folder / "posters" / "5.jpg").mkdir()  # a directory where a poster should be
    with pytest.raises(PermissionError):
        open(folder / "posters" / "2.jpg", "rb")
    summary = ingest(read_movielens(folder, "ml-perm"), wh, progress=False)
    assert summary.images_by_status == {IMAGE_OK: 3, IMAGE_UNREADABLE: 2}
    assert (summary.n_items, summary.n_interactions) == (6, 12)
    report = {r["check_name"]: r for r in summary.report}
    assert report["image_unreadable"]["n"] == 2
    with store.connect(wh, create=False, read_only=True) as con:
        imgs = store.read_polars(con, "item_images", where="dataset = 'ml-perm'").sort("item_id")
        n_items = con.execute("SELECT n_images FROM items WHERE item_id = '2'").fetchone()[0]
    bad = imgs.filter(pl.col("status") == IMAGE_UNREADABLE)
    assert bad["item_id"].to_list() == ["2", "5"] and n_items == 0
    assert "Permission denied" in bad["error"][0] and "not a regular file" in bad["error"][1]


def test_msm4sr_ingest_with_an_unreadable_poster_exits_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unreadable_for_root: None
) -> None:
    monkeypatch.setenv("MSM4SR_WAREHOUSE", str(tmp_path / "wh"))
    src = write_ml_cut(tmp_path / "ml", range(1, 11), max_ratings=400)
    victim = sorted((src / "posters").iterdir())[0]
    victim.chmod(0)
    out = ok("ingest", "movielens", str(src), "--dataset", "cut")
    assert "image_unreadable" in out and "'unreadable': 1" in out


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_the_features_flow_lands_everything_but_the_unreadable_poster(
    harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unreadable_for_root: None
) -> None:
    from flows.features import features_flow

    monkeypatch.setenv("MSM4SR_WAREHOUSE", str(tmp_path / "wh"))
    src = write_ml_cut(tmp_path / "ml", range(1, 9), max_ratings=300)
    posters = sorted((src / "posters").iterdir())
    posters[0].chmod(0)
    res = features_flow(path=str(src), dataset="cut")
    assert res["ingest"]["images_by_status"] == {IMAGE_OK: len(posters) - 1, IMAGE_UNREADABLE: 1}
    assert res["tag"]["n_tagged"] == len(posters) - 1
    assert res["embed"]["n_encoded"] > 0
