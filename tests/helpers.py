"""Test helpers: tiny real files in the real layouts, and a local HTTP server for image URLs."""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image


def jpeg_bytes(w: int = 40, h: int = 60, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_bytes(mode: str = "RGBA", size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


def write_movielens(
    root: Path, ratings: list[str], movies: list[bytes], posters: dict[str, bytes]
) -> Path:
    """A MovieLens folder in the GroupLens layout (movies.dat given as raw latin-1 bytes)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "ratings.dat").write_text("\n".join(ratings) + "\n")
    (root / "movies.dat").write_bytes(b"\n".join(movies) + b"\n")
    (root / "posters").mkdir(exist_ok=True)
    for name, data in posters.items():
        (root / "posters" / name).write_bytes(data)
    return root


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, tuple] = {}
    hits: dict[str, int] = {}

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.hits[self.path] = self.hits.get(self.path, 0) + 1
        kind, *arg = self.routes.get(self.path, ("404",))
        if kind == "ok":
            body = arg[0]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif kind == "slow":
            time.sleep(arg[0])
            self.send_response(200)
            self.send_header("Content-Length", "3")
            self.end_headers()
            self.wfile.write(b"abc")
        elif kind == "drip":  # announces n bytes, then sends one every `interval` seconds
            n, interval = arg
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            try:
                for _ in range(n):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(interval)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up: expected
                self.close_connection = True
        elif kind == "truncated":  # announces more bytes than it sends, then closes
            body = arg[0]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) * 2))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            self.close_connection = True
        elif kind == "flaky":  # 503 for the first n requests, then the body
            n, body = arg
            if self.hits[self.path] <= n:
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


@contextmanager
def http_server(routes: dict[str, tuple]) -> Iterator[tuple[str, dict[str, int]]]:
    """Serve `routes` on 127.0.0.1; yields (base URL, hit counts per path)."""
    handler = type("H", (_Handler,), {"routes": routes, "hits": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.hits
    finally:
        server.shutdown()
        server.server_close()


def write_office_cut(dest: Path, n_users: int = 70) -> tuple[Path, Path]:
    """Every interaction of the first `n_users` users of the real Amazon Office
    interactions.csv, and the items.tsv rows they name, in the dataset's own layout (read at
    test time, never kept)."""
    from tests.conftest import OFFICE, require

    src = require(OFFICE)
    dest.mkdir(parents=True, exist_ok=True)
    header, *rows = (src / "interactions.csv").read_text().splitlines()
    users: list[str] = []
    for ln in rows:
        u = ln.split(",", 1)[0]
        if u not in users:
            users.append(u)
            if len(users) == n_users:
                break
    chosen = set(users)
    keep = [ln for ln in rows if ln.split(",", 1)[0] in chosen]
    items = {ln.split(",")[1] for ln in keep}
    item_header, *item_rows = (src / "items.tsv").read_text().splitlines()
    item_rows = [ln for ln in item_rows if ln.split("\t", 1)[0] in items]
    (dest / "interactions.csv").write_text("\n".join([header, *keep]) + "\n")
    (dest / "items.tsv").write_text("\n".join([item_header, *item_rows]) + "\n")
    return dest / "interactions.csv", dest / "items.tsv"


def warehouse_fingerprint(wh: Path) -> dict[str, str]:
    """sha256 of every file of a warehouse folder (catalog and Parquet data).

    SQLite's WAL side files are left out only where they hold nothing: a reader of the WAL-mode
    catalog creates an empty `-wal` and its index `-shm` (derived from the WAL, no data). A write
    that reached the catalog is in the catalog file or in a non-empty `-wal`, both fingerprinted.
    """
    return {
        str(p.relative_to(wh)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(wh.rglob("*"))
        if p.is_file()
        and not p.name.endswith("-shm")
        and not (p.name.endswith("-wal") and p.stat().st_size == 0)
    }
