"""Images: fetch (local path, file:// or http(s):// URL), validate, hash.

Downloads go into a content-addressed cache (`<cache>/<sha[:2]>/<sha>`), with a timeout per
connect / read, a total deadline per image (connect + body + retries: a server dripping one
byte at a time cannot hold an ingest), retries with backoff on transient failures (timeouts,
5xx, cut connections), a byte cap and a concurrency limit. Every image ends with a status
(features.contract.IMAGE_STATUSES) and, when bytes could be read, the sha256 of those bytes: a
file that cannot be read (permission, I/O error, a directory in its place) is `unreadable`, never
an exception that stops the other images.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from features.contract import (
    IMAGE_CORRUPT,
    IMAGE_MISSING,
    IMAGE_OK,
    IMAGE_TOO_LARGE,
    IMAGE_UNREADABLE,
    IMAGE_UNSUPPORTED,
)

# Bytes that mark a known non-raster format (we do not rasterise vector or document files).
_UNSUPPORTED_MAGIC = (b"<svg", b"<?xml", b"%PDF", b"<!DOCTYPE", b"<html")


@dataclass
class ImageConfig:
    max_bytes: int = 20 * 2**20  # larger files are `too_large` (not downloaded past the cap)
    max_pixels: int = 64_000_000  # width*height cap (a 10000x10000 image is too_large)
    timeout_s: float = 10.0  # per connect and per read of an HTTP request
    deadline_s: float = 60.0  # per image, in all: connect + body + retries and their backoff
    retries: int = 3  # extra attempts on transient HTTP failures
    backoff_s: float = 0.5  # first retry delay; doubles each time
    concurrency: int = 8  # simultaneous downloads / file checks
    user_agent: str = "msm4sr/0.1 (+image ingest)"


@dataclass
class ImageResult:
    uri: str
    local_path: str | None = None
    sha256: str | None = None
    status: str = IMAGE_MISSING
    width: int | None = None
    height: int | None = None
    n_bytes: int | None = None
    error: str | None = None


class _Transient(Exception):
    pass


class _TooLarge(Exception):
    pass


class _Deadline(Exception):
    pass


def validate_bytes(data: bytes, cfg: ImageConfig) -> tuple[str, int | None, int | None, str | None]:
    """(status, width, height, error) of image bytes; decodes fully to catch truncation."""
    if not data:
        return IMAGE_CORRUPT, None, None, "empty file (0 bytes)"
    head = data[:64].lstrip().lower()
    try:
        with Image.open(BytesIO(data)) as im:
            w, h = im.size
            if w * h > cfg.max_pixels:
                return IMAGE_TOO_LARGE, w, h, f"{w}x{h} pixels > max_pixels={cfg.max_pixels}"
            im.load()  # raises on truncated data
            return IMAGE_OK, w, h, None
    except (UnidentifiedImageError, ImportError):
        # ImportError: once ultralytics is imported it wraps Image.open and, offline, fails
        # loading an optional HEIF plugin for bytes PIL cannot identify.
        if any(head.startswith(m.lower()) for m in _UNSUPPORTED_MAGIC):
            return IMAGE_UNSUPPORTED, None, None, "not a raster image (SVG/XML/PDF/HTML)"
        return IMAGE_CORRUPT, None, None, "not a decodable image"
    except Image.DecompressionBombError as e:
        return IMAGE_TOO_LARGE, None, None, str(e)[:200]
    except Exception as e:  # PIL's decoders raise many kinds on hostile bytes
        return IMAGE_CORRUPT, None, None, f"decode failed: {type(e).__name__}: {e}"[:200]


def _local_path(uri: str) -> Path | None:
    if uri.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path))
    if "://" not in uri:
        return Path(uri)
    return None


def _download(url: str, cfg: ImageConfig, deadline: float) -> bytes:
    """GET url with the byte cap, before `deadline` (time.monotonic()); raises _Transient for
    retryable failures, _TooLarge, _Deadline, or urllib's errors."""
    req = urllib.request.Request(url, headers={"User-Agent": cfg.user_agent})
    try:
        with urllib.request.urlopen(req, timeout=_timeout(cfg, deadline)) as resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > cfg.max_bytes:
                raise _TooLarge(f"Content-Length {length} > max_bytes={cfg.max_bytes}")
            data = bytearray()
            while True:
                _set_read_timeout(resp, _timeout(cfg, deadline))
                chunk = resp.read1(1 << 16)
                if not chunk:
                    break
                data += chunk
                if len(data) > cfg.max_bytes:
                    raise _TooLarge(f"body over max_bytes={cfg.max_bytes}")
            if length and length.isdigit() and len(data) < int(length):
                raise _Transient(f"truncated download: {len(data)} of {length} bytes")
            return bytes(data)
    except urllib.error.HTTPError as e:
        if e.code >= 500 or e.code == 429:
            raise _Transient(f"HTTP {e.code}") from e
        raise
    except http.client.IncompleteRead as e:
        raise _Transient(f"truncated download: {len(e.partial)} bytes") from e
    except (TimeoutError, ConnectionError) as e:
        if time.monotonic() >= deadline:
            raise _Deadline(_deadline_error(cfg)) from e
        raise _Transient(f"{type(e).__name__}: {e}") from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, (TimeoutError, socket.timeout, ConnectionError)):
            if time.monotonic() >= deadline:
                raise _Deadline(_deadline_error(cfg)) from e
            raise _Transient(f"{e.reason}") from e
        raise


def _deadline_error(cfg: ImageConfig) -> str:
    return f"download deadline passed: not complete after deadline_s={cfg.deadline_s:g}"


def _timeout(cfg: ImageConfig, deadline: float) -> float:
    """The socket timeout for the next connect / read: timeout_s, cut to what is left."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Deadline(_deadline_error(cfg))
    return min(cfg.timeout_s, left)


def _set_read_timeout(resp: object, seconds: float) -> None:
    """Shorten the socket timeout of an open response (http.client keeps the socket inside
    the response's buffered reader); without that socket the per-read timeout_s still holds."""
    sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
    if isinstance(sock, socket.socket):
        sock.settimeout(seconds)


def _read_local(local: Path, res: ImageResult, cfg: ImageConfig) -> bytes | None:
    """The bytes of a local image, or None with res's status and error set."""
    try:
        if not local.exists():
            res.error = f"no such file: {local}"
            return None
        if not local.is_file():
            res.status, res.error = IMAGE_UNREADABLE, f"not a regular file: {local}"
            return None
        size = local.stat().st_size
        res.n_bytes = size
        if size > cfg.max_bytes:
            res.status, res.error = IMAGE_TOO_LARGE, f"{size} bytes > max_bytes={cfg.max_bytes}"
            return None
        with open(local, "rb") as f:
            data = f.read(cfg.max_bytes + 1)
    except OSError as e:
        res.status = IMAGE_UNREADABLE
        res.error = f"unreadable: {type(e).__name__}: {e.strerror or e}"[:200]
        return None
    if len(data) > cfg.max_bytes:  # grew since stat
        res.status, res.error = IMAGE_TOO_LARGE, f"over max_bytes={cfg.max_bytes}"
        return None
    res.local_path = str(local.resolve())
    return data


def _fetch_url(uri: str, res: ImageResult, cfg: ImageConfig) -> bytes | None:
    """The bytes behind an http(s) URL (retries, byte cap, deadline), or None with res set."""
    if urllib.parse.urlparse(uri).scheme not in ("http", "https"):
        res.status, res.error = IMAGE_UNSUPPORTED, f"unsupported URI scheme in {uri!r}"
        return None
    deadline = time.monotonic() + cfg.deadline_s
    delay = cfg.backoff_s
    for attempt in range(cfg.retries + 1):
        try:
            return _download(uri, cfg, deadline)
        except _Transient as e:
            res.error = str(e)
            left = deadline - time.monotonic()
            if attempt < cfg.retries and left > delay:
                time.sleep(delay)
                delay *= 2
            elif attempt < cfg.retries:
                res.error = f"{_deadline_error(cfg)} ({e})"
                break
        except _Deadline as e:
            res.error = str(e)
            return None
        except _TooLarge as e:
            res.status, res.error = IMAGE_TOO_LARGE, str(e)
            return None
        except urllib.error.HTTPError as e:
            res.error = f"HTTP {e.code}"
            return None
        except urllib.error.URLError as e:
            res.error = f"unreachable: {e.reason}"
            return None
        except (ValueError, UnicodeError, http.client.HTTPException, OSError) as e:
            res.error = f"bad URL or response: {type(e).__name__}: {e}"[:200]
            return None
    # Exhausted retries: a cut-off body is corrupt, an unreachable server is missing.
    res.status = IMAGE_CORRUPT if (res.error or "").startswith("truncated") else IMAGE_MISSING
    return None


def fetch_one(uri: str, cache_dir: Path, cfg: ImageConfig) -> ImageResult:
    """Resolve one image reference to a readable, validated, hashed file."""
    res = ImageResult(uri)
    local = _local_path(uri)
    data = _read_local(local, res, cfg) if local is not None else _fetch_url(uri, res, cfg)
    if data is None:
        return res
    res.error = None
    res.n_bytes = len(data)
    res.sha256 = hashlib.sha256(data).hexdigest()
    res.status, res.width, res.height, err = validate_bytes(data, cfg)
    res.error = err
    if local is None:
        target = cache_dir / res.sha256[:2] / res.sha256
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
            tmp.write_bytes(data)
            tmp.replace(target)  # atomic: a killed run never leaves a half-written cache file
        res.local_path = str(target)
    return res


def fetch_all(
    uris: Iterable[str],
    cache_dir: Path,
    cfg: ImageConfig | None = None,
    on_done: Callable[[ImageResult], None] | None = None,
) -> list[ImageResult]:
    """fetch_one over many URIs with `cfg.concurrency` threads; results in input order."""
    cfg = cfg or ImageConfig()
    uris = list(uris)

    def work(u: str) -> ImageResult:
        r = fetch_one(u, cache_dir, cfg)
        if on_done:
            on_done(r)
        return r

    with ThreadPoolExecutor(max_workers=max(1, cfg.concurrency)) as pool:
        return list(pool.map(work, uris))
