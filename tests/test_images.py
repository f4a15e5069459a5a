"""Image fetching and validation against real files and a real local HTTP server."""

from __future__ import annotations

import hashlib
from pathlib import Path

from features.contract import (
    IMAGE_CORRUPT,
    IMAGE_MISSING,
    IMAGE_OK,
    IMAGE_TOO_LARGE,
    IMAGE_UNSUPPORTED,
)
from pipeline.images import ImageConfig, fetch_all, fetch_one
from tests.helpers import http_server, jpeg_bytes, png_bytes

FAST = ImageConfig(timeout_s=1.0, retries=2, backoff_s=0.05, concurrency=4)


def test_local_files_get_status_and_hash(tmp_path: Path) -> None:
    good = jpeg_bytes()
    files = {
        "ok.jpg": good,
        "zero.jpg": b"",
        "trunc.jpg": good[: len(good) // 2],
        "text.jpg": b"hello, not an image at all",
        "vector.svg": b"<svg xmlns='http://www.w3.org/2000/svg'></svg>",
        "alpha.png": png_bytes("RGBA"),
        "grey16.png": png_bytes("I;16"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    got = {p: fetch_one(str(tmp_path / p), tmp_path / "cache", FAST) for p in files}
    got["absent"] = fetch_one(str(tmp_path / "absent.jpg"), tmp_path / "cache", FAST)
    got["file_url"] = fetch_one((tmp_path / "ok.jpg").as_uri(), tmp_path / "cache", FAST)
    status = {k: v.status for k, v in got.items()}
    assert status == {
        "ok.jpg": IMAGE_OK,
        "zero.jpg": IMAGE_CORRUPT,
        "trunc.jpg": IMAGE_CORRUPT,
        "text.jpg": IMAGE_CORRUPT,
        "vector.svg": IMAGE_UNSUPPORTED,
        "alpha.png": IMAGE_OK,
        "grey16.png": IMAGE_OK,
        "absent": IMAGE_MISSING,
        "file_url": IMAGE_OK,
    }
    assert got["ok.jpg"].sha256 == hashlib.sha256(good).hexdigest()
    assert (got["ok.jpg"].width, got["ok.jpg"].height) == (40, 60)
    assert got["zero.jpg"].error == "empty file (0 bytes)"
    assert "truncated" in got["trunc.jpg"].error.lower()
    assert got["file_url"].local_path == got["ok.jpg"].local_path


def test_pixel_and_byte_caps(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    from PIL import Image

    Image.new("L", (3000, 3000)).save(big)
    r = fetch_one(str(big), tmp_path, ImageConfig(max_pixels=1_000_000))
    assert r.status == IMAGE_TOO_LARGE and "3000x3000" in r.error
    r = fetch_one(str(big), tmp_path, ImageConfig(max_bytes=10))
    assert r.status == IMAGE_TOO_LARGE


def test_http_statuses_retries_and_cache(tmp_path: Path) -> None:
    good = jpeg_bytes(color=(1, 2, 3))
    routes = {
        "/ok.jpg": ("ok", good),
        "/flaky.jpg": ("flaky", 2, good),
        "/slow.jpg": ("slow", 3.0),
        "/trunc.jpg": ("truncated", good[:300]),
        "/big.jpg": ("ok", b"x" * 5000),
        "/page.html": ("ok", b"<html><body>sorry</body></html>"),
    }
    with http_server(routes) as (base, hits):
        cfg = ImageConfig(timeout_s=0.5, retries=2, backoff_s=0.05, concurrency=3, max_bytes=4000)
        uris = [
            f"{base}{p}"
            for p in [
                "/ok.jpg",
                "/flaky.jpg",
                "/slow.jpg",
                "/trunc.jpg",
                "/big.jpg",
                "/page.html",
                "/gone.jpg",
            ]
        ]
        res = {r.uri.rsplit("/", 1)[1]: r for r in fetch_all(uris, tmp_path / "cache", cfg)}
        assert hits["/flaky.jpg"] == 3  # two 503s retried, third served
        assert hits["/gone.jpg"] == 1  # a 404 is final, not retried
        assert hits["/slow.jpg"] == 3  # timeouts are retried (1 + 2 retries)
    assert {k: v.status for k, v in res.items()} == {
        "ok.jpg": IMAGE_OK,
        "flaky.jpg": IMAGE_OK,
        "slow.jpg": IMAGE_MISSING,
        "trunc.jpg": IMAGE_CORRUPT,
        "big.jpg": IMAGE_TOO_LARGE,
        "page.html": IMAGE_UNSUPPORTED,
        "gone.jpg": IMAGE_MISSING,
    }
    assert res["gone.jpg"].error == "HTTP 404"
    sha = hashlib.sha256(good).hexdigest()
    cached = tmp_path / "cache" / sha[:2] / sha
    assert res["ok.jpg"].local_path == str(cached) and cached.read_bytes() == good
    assert res["flaky.jpg"].sha256 == sha
